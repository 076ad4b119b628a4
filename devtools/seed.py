"""Builds source rows in the BigQuery emulator and ledger rows in Postgres, as tests need them."""

from __future__ import annotations

import io
import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pyarrow as pa
import pyarrow.parquet as pq
from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import bigquery

PROJECT = "backfill-test"
SEED_TENANT = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
OTHER_TENANT = "11111111-2222-3333-4444-555555555555"

INVENTORY_SCHEMA = [
    bigquery.SchemaField("tenant_id", "STRING"),
    bigquery.SchemaField("movement_date", "DATE"),
    bigquery.SchemaField("branch_id", "STRING"),
    bigquery.SchemaField("product_code", "STRING"),
    bigquery.SchemaField("quantity", "NUMERIC"),
    bigquery.SchemaField("unit_cost", "NUMERIC"),
    bigquery.SchemaField("movement_type", "STRING"),
    bigquery.SchemaField("updated_at", "TIMESTAMP"),
]
# the source's columns as BigQuerySource.source_schema gives them: what setup creates the inventory target from
INVENTORY_TYPES = {f.name: f.field_type for f in INVENTORY_SCHEMA}


def inventory_schema(model) -> dict[str, str]:
    """setup_database's source_schemas for the inventory model, without asking BigQuery."""
    if model.model_type != "inventory":
        raise LookupError(f"no seeded source schema for model {model.model_type!r}")
    return INVENTORY_TYPES


ARROW_SCHEMA = pa.schema(
    [
        ("tenant_id", pa.string()),
        ("movement_date", pa.date32()),
        ("branch_id", pa.string()),
        ("product_code", pa.string()),
        ("quantity", pa.decimal128(38, 9)),
        ("unit_cost", pa.decimal128(38, 9)),
        ("movement_type", pa.string()),
        ("updated_at", pa.timestamp("us", tz="UTC")),
    ]
)


def bq_client(endpoint: str) -> bigquery.Client:
    """A BigQuery client on the emulator's REST endpoint, for seeding and checking."""
    return bigquery.Client(
        project=PROJECT, credentials=AnonymousCredentials(), client_options=ClientOptions(api_endpoint=endpoint)
    )


def inventory_rows(tenant_id: str, n: int, *, seed: int = 0) -> list[dict]:
    """n distinct-key movements for one tenant, deterministic for a given seed."""
    start = date(2024, 1, 1)
    types = ["receipt", "sale", "transfer", "adjustment"]
    rows = []
    for i in range(n):
        rows.append(
            {
                "tenant_id": tenant_id,
                "movement_date": start + timedelta(days=(i // 40) % 700),
                "branch_id": f"BR-{(i // 8) % 5:02d}",
                "product_code": f"P{i:07d}",
                "quantity": Decimal(((i * 37 + seed) % 1000) - 300) / Decimal(4),
                "unit_cost": Decimal((i * 13 + seed) % 5000) / Decimal(100),
                "movement_type": types[(i + seed) % 4],
                "updated_at": datetime(2025, 1, 1, tzinfo=UTC) + timedelta(seconds=i * 7 + seed),
            }
        )
    return rows


def create_source(
    client: bigquery.Client, rows: list[dict] | pa.Table, table: str = "analytics.inventory_movements"
) -> None:
    """(Re)creates the source table and loads the rows (parquet, resumable upload, columns in table order)."""
    client.delete_table(table, not_found_ok=True)
    client.create_table(bigquery.Table(f"{PROJECT}.{table}", schema=INVENTORY_SCHEMA))
    append_source(client, rows, table)


def append_source(
    client: bigquery.Client, rows: list[dict] | pa.Table, table: str = "analytics.inventory_movements"
) -> None:
    if not len(rows):
        return
    buf = io.BytesIO()
    pq.write_table(rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, schema=ARROW_SCHEMA), buf)
    buf.seek(0)
    config = bigquery.LoadJobConfig(source_format=bigquery.SourceFormat.PARQUET)
    client.load_table_from_file(buf, f"{PROJECT}.{table}", job_config=config).result()


def legacy_jobs(conn, tenant_id: str, model_type: str, *, running: int, pending: int, failed: int = 0) -> list[str]:
    """Job rows as the old self-re-invoking loop left them, each with its progress row, last changed two days ago
    (the loop has stopped)."""
    ids = []
    for status, count in (("running", running), ("pending", pending), ("failed", failed)):
        for _ in range(count):
            job_id = str(uuid.uuid4())
            conn.execute(
                "INSERT INTO bigquery_backfill_jobs "
                "(id, tenant_id, model_type, status, total_records, processed_records, created_at, updated_at) "
                "VALUES (%s, %s, %s, %s, 1032601, 500, now() - interval '2 days', now() - interval '2 days')",
                (job_id, tenant_id, model_type, status),
            )
            conn.execute(
                "INSERT INTO backfill_source_progress "
                "(job_id, source_table, last_offset, records_synced, status, updated_at) "
                "VALUES (%s, 'inventory_movements', 500, 500, %s, now() - interval '2 days')",
                (job_id, status),
            )
            ids.append(job_id)
    return ids


def insert_target(conn, rows: list[dict]) -> None:
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO inventory_movements (tenant_id, movement_date, branch_id, product_code, quantity, unit_cost, "
            "movement_type, updated_at) VALUES (%(tenant_id)s, %(movement_date)s, %(branch_id)s, %(product_code)s, "
            "%(quantity)s, %(unit_cost)s, %(movement_type)s, %(updated_at)s)",
            rows,
        )


def target_rows(conn, tenant_id: str) -> list[tuple]:
    return conn.execute(
        "SELECT tenant_id::text, movement_date, branch_id, product_code, quantity, unit_cost, movement_type, "
        "updated_at FROM inventory_movements WHERE tenant_id = %s ORDER BY movement_date, branch_id, product_code",
        (tenant_id,),
    ).fetchall()


def as_tuples(rows: list[dict]) -> list[tuple]:
    out = [
        (
            r["tenant_id"],
            r["movement_date"],
            r["branch_id"],
            r["product_code"],
            r["quantity"],
            r["unit_cost"],
            r["movement_type"],
            r["updated_at"],
        )
        for r in rows
    ]
    return sorted(out, key=lambda t: (t[1], t[2], t[3]))


def inventory_table(tenant_id: str, n: int, *, seed: int = 0) -> pa.Table:
    """The same rows as inventory_rows(), built column by column (1M rows in about a second)."""
    import numpy as np
    import pyarrow.compute as pc

    i = np.arange(n, dtype=np.int64)
    day0 = (date(2024, 1, 1) - date(1970, 1, 1)).days
    codes = pc.utf8_lpad(pc.cast(pa.array(i), pa.string()), 7, "0")
    branches = pc.utf8_lpad(pc.cast(pa.array((i // 8) % 5), pa.string()), 2, "0")
    types = np.array(["receipt", "sale", "transfer", "adjustment"])
    epoch_us = int(datetime(2025, 1, 1, tzinfo=UTC).timestamp()) * 1_000_000
    return pa.table(
        {
            "tenant_id": pa.array(np.full(n, tenant_id)),
            "movement_date": pa.array(day0 + (i // 40) % 700, pa.int32()).cast(pa.date32()),
            "branch_id": pc.binary_join_element_wise("BR-", branches, ""),
            "product_code": pc.binary_join_element_wise("P", codes, ""),
            "quantity": _hundredths((((i * 37 + seed) % 1000) - 300) * 25),
            "unit_cost": _hundredths((i * 13 + seed) % 5000),
            "movement_type": pa.array(types[(i + seed) % 4]),
            "updated_at": pa.array(epoch_us + (i * 7 + seed) * 1_000_000, pa.timestamp("us", tz="UTC")),
        },
        schema=ARROW_SCHEMA,
    )


def _hundredths(values) -> pa.Array:
    """Exact decimals from integer hundredths (rendered as text, which Arrow parses exactly)."""
    import numpy as np

    sign = np.where(values < 0, "-", "")
    text = np.char.add(np.char.add(sign, (np.abs(values) // 100).astype(str)), ".")
    text = np.char.add(text, np.char.zfill((np.abs(values) % 100).astype(str), 2))
    return pa.array(text).cast(pa.decimal128(38, 9))

"""Builds source rows in the BigQuery emulator and ledger rows in Postgres, as tests need them."""

from __future__ import annotations

import io
import os
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


def bq_client() -> bigquery.Client:
    return bigquery.Client(
        project=PROJECT,
        credentials=AnonymousCredentials(),
        client_options=ClientOptions(api_endpoint=os.environ["BIGQUERY_EMULATOR_HOST"]),
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


def create_source(client: bigquery.Client, rows: list[dict], table: str = "analytics.inventory_movements") -> None:
    """(Re)creates the source table and loads the rows (parquet, resumable upload, columns in table order)."""
    client.delete_table(table, not_found_ok=True)
    client.create_table(bigquery.Table(f"{PROJECT}.{table}", schema=INVENTORY_SCHEMA))
    append_source(client, rows, table)


def append_source(client: bigquery.Client, rows: list[dict], table: str = "analytics.inventory_movements") -> None:
    if not rows:
        return
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=ARROW_SCHEMA), buf)
    buf.seek(0)
    config = bigquery.LoadJobConfig(source_format=bigquery.SourceFormat.PARQUET)
    client.load_table_from_file(buf, f"{PROJECT}.{table}", job_config=config).result()


def legacy_jobs(conn, tenant_id: str, model_type: str, *, running: int, pending: int, failed: int = 0) -> list[str]:
    """Job rows as the old self-re-invoking loop left them, each with its progress row."""
    ids = []
    for status, count in (("running", running), ("pending", pending), ("failed", failed)):
        for _ in range(count):
            job_id = str(uuid.uuid4())
            conn.execute(
                "INSERT INTO bigquery_backfill_jobs "
                "(id, tenant_id, model_type, status, total_records, processed_records) "
                "VALUES (%s, %s, %s, %s, 1032601, 500)",
                (job_id, tenant_id, model_type, status),
            )
            conn.execute(
                "INSERT INTO backfill_source_progress (job_id, source_table, last_offset, records_synced, status) "
                "VALUES (%s, 'inventory_movements', 500, 500, %s)",
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

"""Models declared in the deployment's models file, not in the package: the setup DAG checks each against its
BigQuery source and Postgres target and creates a missing target from the source's schema; the backfill DAG runs
any of them. A bad declaration is named (model and field) and leaves the others usable."""

from __future__ import annotations

import io
import json
from datetime import UTC, date, datetime
from decimal import Decimal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from airflow.dag_processing.dagbag import DagBag
from google.cloud import bigquery
from helpers import ROOT, WRITER_ROLE, jobs

from bq_backfill import model_file
from bq_backfill.models import DeclarationError
from devtools.seed import OTHER_TENANT, PROJECT, SEED_TENANT, create_source, inventory_rows

# Two models of mixed types, declared the way a deployment would. `orders`: the tenant column under another name,
# a source column renamed, one left out, a type chosen for the created table. `events`: arrays, bytes and JSON,
# every source column, its target written by the user beforehand with columns the source does not have.
ORDERS = {
    "description": "Orders per account.",
    "source_table": "analytics.orders",
    "target_table": "orders",
    "tenant_column": "account_id",
    "conflict_key": ["account_id", "order_id"],
    "order_key": ["order_id"],
    "columns": ["account_id", "order_id", "total", "placed_at", "paid", "meta"],
    "renames": {"PlacedAt": "placed_at"},
    "create_types": {"total": "numeric(20,2)"},
}
EVENTS = {
    "source_table": "analytics.events",
    "target_table": "events",
    "conflict_key": ["tenant_id", "day", "seq"],
    "order_key": ["day", "seq"],
}
ORDER_FIELDS = [
    ("account_id", "STRING", "NULLABLE", pa.string()),
    ("order_id", "INT64", "NULLABLE", pa.int64()),
    ("total", "NUMERIC", "NULLABLE", pa.decimal128(38, 9)),
    ("PlacedAt", "TIMESTAMP", "NULLABLE", pa.timestamp("us", "UTC")),
    ("paid", "BOOL", "NULLABLE", pa.bool_()),
    ("meta", "JSON", "NULLABLE", pa.string()),
    ("internal_note", "STRING", "NULLABLE", pa.string()),  # left out by `columns`
]
EVENT_FIELDS = [
    ("tenant_id", "STRING", "NULLABLE", pa.string()),
    ("day", "DATE", "NULLABLE", pa.date32()),
    ("seq", "INT64", "NULLABLE", pa.int64()),
    ("payload", "BYTES", "NULLABLE", pa.binary()),
    ("labels", "STRING", "REPEATED", pa.list_(pa.string())),
    ("scores", "FLOAT64", "REPEATED", pa.list_(pa.float64())),
]


def _load(bq, table: str, fields, rows: list[dict]) -> None:
    name = f"{PROJECT}.analytics.{table}"
    bq.delete_table(name, not_found_ok=True)
    bq.create_table(bigquery.Table(name, schema=[bigquery.SchemaField(n, t, mode=m) for n, t, m, _ in fields]))
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([(n, a) for n, _, _, a in fields])), buf)
    buf.seek(0)
    bq.load_table_from_file(buf, name, job_config=bigquery.LoadJobConfig(source_format="PARQUET")).result()


def _orders(tenant: str, n: int) -> list[dict]:
    return [
        {"account_id": tenant, "order_id": i, "total": Decimal(i) / 4,
         "PlacedAt": datetime(2025, 1, 1, i % 24, tzinfo=UTC), "paid": i % 3 == 0,
         "meta": json.dumps({"i": i, "tags": ["a", None]}), "internal_note": "secret"}
        for i in range(n)
    ]  # fmt: skip


def _events(tenant: str, n: int) -> list[dict]:
    return [
        {"tenant_id": tenant, "day": date(1999 + i % 3, 12, 31), "seq": i, "payload": bytes([i % 256, 0, 255]),
         "labels": [f"l{i}", 'q"{,}'] if i % 2 else [], "scores": [i / 2, None] if i % 5 else None}
        for i in range(n)
    ]  # fmt: skip


def _setup_dag() -> object:
    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert not bag.import_errors, bag.import_errors
    return bag.get_dag("bigquery_backfill_setup")


def _versions(pg, table: str) -> list[str]:
    return [r[0] for r in pg.execute(f"SELECT xmin::text FROM {table} ORDER BY 1").fetchall()]  # noqa: S608


def test_two_declared_models_are_set_up_and_backfilled_through_the_file_alone(pg, bq, declare_models, writer_role):
    create_source(bq, inventory_rows(SEED_TENANT, 5))  # the shipped model's source: setup checks it too
    _load(bq, "orders", ORDER_FIELDS, _orders(SEED_TENANT, 130) + _orders(OTHER_TENANT, 20))
    _load(bq, "events", EVENT_FIELDS, _events(SEED_TENANT, 90))
    # the user's own table: a column the source lacks (with a default) and a generated one, both left alone
    pg.execute(
        "CREATE TABLE events (tenant_id uuid NOT NULL, day date NOT NULL, seq bigint NOT NULL, payload bytea, "
        "labels text[], scores double precision[], synced_at timestamptz DEFAULT now(), "
        "label_count int GENERATED ALWAYS AS (cardinality(labels)) STORED, UNIQUE (tenant_id, day, seq))"
    )
    dag = declare_models({"orders": ORDERS, "events": EVENTS})
    assert dag.params.get_param("model_type").schema["enum"] == ["events", "inventory", "orders"]

    setup = _setup_dag().test(run_conf={"writer_role": WRITER_ROLE})

    assert setup.state == "success"
    granted = pg.execute(
        "SELECT has_table_privilege(%s, 'orders', 'INSERT'), has_table_privilege(%s, 'events', 'UPDATE'), "
        "has_table_privilege(%s, 'orders', 'DELETE')",
        [WRITER_ROLE] * 3,
    )
    assert granted.fetchone() == (True, True, False)  # what a run needs on the created and the user's table
    created = pg.execute(
        "SELECT column_name, format_type(atttypid, atttypmod), attnotnull FROM information_schema.columns c "
        "JOIN pg_attribute a ON a.attrelid = 'orders'::regclass AND a.attname = c.column_name "
        "WHERE table_name = 'orders' ORDER BY ordinal_position"
    ).fetchall()
    assert created == [
        ("account_id", "uuid", True), ("order_id", "bigint", True), ("total", "numeric(20,2)", False),
        ("placed_at", "timestamp with time zone", False), ("paid", "boolean", False), ("meta", "jsonb", False),
    ]  # fmt: skip
    for model, table, n in (("orders", "orders", 130), ("events", "events", 90)):
        run = dag.test(run_conf={"tenant_id": SEED_TENANT, "model_type": model, "chunk_size": 100})
        assert run.state == "success", model
        [job] = jobs(pg, model_type=model)
        assert (job["status"], job["processed_records"]) == ("completed", n)
        assert pg.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == n  # noqa: S608
    order = pg.execute("SELECT total, placed_at, paid, meta FROM orders WHERE order_id = 7").fetchone()
    assert order == (Decimal("1.75"), datetime(2025, 1, 1, 7, tzinfo=UTC), False, {"i": 7, "tags": ["a", None]})
    event = pg.execute("SELECT payload, labels, scores, label_count, synced_at IS NOT NULL FROM events WHERE seq = 3")
    assert event.fetchone() == (bytes([3, 0, 255]), ["l3", 'q"{,}'], [1.5, None], 2, True)
    recorded = pg.execute(
        "SELECT model_columns, ignored_source_columns FROM bigquery_backfill_jobs WHERE model_type = 'orders'"
    ).fetchone()
    assert recorded[0][3] == ["placed_at", "timestamp with time zone", "PlacedAt", "TIMESTAMP"]
    assert recorded[1] == ["internal_note"]

    before = {t: _versions(pg, t) for t in ("orders", "events")}
    for model in ("orders", "events"):  # nothing changed: nothing rewritten
        assert dag.test(run_conf={"tenant_id": SEED_TENANT, "model_type": model, "chunk_size": 100}).state == "success"
    assert {t: _versions(pg, t) for t in ("orders", "events")} == before


@pytest.mark.parametrize(
    ("body", "field", "says"),
    [
        ({"target_table": "t", "conflict_key": ["tenant_id"], "order_key": ["k"]}, "source_table", "is required"),
        ({**EVENTS, "conflict_keys": ["tenant_id"]}, "conflict_keys", "unknown field"),
        ({**EVENTS, "order_key": ["day"]}, "order_key", "lacks ['seq']"),
        ({**EVENTS, "conflict_key": ["day", "seq"]}, "conflict_key", "must start with the tenant column"),
        ({**EVENTS, "target_table": "backfill_chunks"}, "target_table", "reserved for the backfill's own tables"),
        ({**EVENTS, "target_table": "Events"}, "target_table", "not a plain lower-case identifier"),
        ({**EVENTS, "order_key": ["day", "seq", "_row_offset"]}, "order_key", "reserved (the snapshot query's own)"),
        ({**EVENTS, "columns": ["tenant_id", "day", "seq", "bad-name"]}, "columns", "not a plain lower-case"),
        ({**EVENTS, "columns": ["tenant_id", "day"]}, "columns", "lacks ['seq']"),
        ({**EVENTS, "source_table": "analytics.events; DROP"}, "source_table", "is not 'dataset.table'"),
        ({**EVENTS, "renames": {"a b": "c"}}, "renames", "not a plain BigQuery column name"),
        ({**EVENTS, "create_types": {"seq": "bigint); DROP TABLE x; --"}}, "create_types", "not a plain Postgres"),
        ({**EVENTS, "create_types": {"seq": "bigint primary key"}}, "create_types", "not a type any BigQuery"),
        ({**EVENTS, "create_types": {"seq": "numerc(18,4)"}}, "create_types", "not a type any BigQuery"),
    ],
)
def test_a_bad_declaration_is_named_by_model_and_field(tmp_path, body, field, says):
    path = tmp_path / "models.yaml"
    path.write_text(json.dumps({"models": {"good": EVENTS, "bad": body}}))  # JSON is YAML

    declared = model_file.load(path)

    assert list(declared.models) == ["good"]
    assert declared.problems["bad"].startswith(f"model 'bad', field {field}: ")
    assert says in declared.problems["bad"]


def test_file_level_mistakes_fail_naming_the_file(tmp_path):
    twice = tmp_path / "twice.yaml"
    twice.write_text("models:\n  a: {source_table: d.t}\n  a: {source_table: d.u}\n")
    with pytest.raises(model_file.ModelFileError, match=r"twice.yaml is not valid YAML: .*'a' is given twice"):
        model_file.load(twice)
    shape = tmp_path / "shape.yaml"
    shape.write_text("- inventory\n")
    with pytest.raises(model_file.ModelFileError, match=r"shape\.yaml must hold a mapping `models:`"):
        model_file.load(shape)
    same_target = tmp_path / "same.yaml"
    same_target.write_text(json.dumps({"models": {"a": EVENTS, "b": EVENTS}}))
    assert "field target_table: events is model a's" in model_file.load(same_target).problems["b"]


def test_the_dag_parses_for_the_other_models_and_names_the_refused_one(declare_models, pg):
    dag = declare_models({"events": EVENTS, "broken": {**EVENTS, "target_table": "broken", "order_key": ["day"]}})

    param = dag.params.get_param("model_type")
    assert param.schema["enum"] == ["events", "inventory"]
    assert "model 'broken', field order_key: must include every conflict_key column" in param.description
    with pytest.raises(DeclarationError, match="model 'broken', field declaration: refused"):
        model_file.get_declaration("broken")


def test_setup_names_each_model_that_cannot_run_and_sets_up_the_others(pg, bq, declare_models, caplog):
    create_source(bq, inventory_rows(SEED_TENANT, 5))
    _load(bq, "events", EVENT_FIELDS, _events(SEED_TENANT, 3))
    pg.execute("CREATE TABLE keyless (tenant_id uuid, day date, seq bigint)")  # no unique key
    declare_models({
        "events": EVENTS,
        "missing": {**EVENTS, "source_table": "analytics.nowhere", "target_table": "nowhere"},
        "keyless": {**EVENTS, "target_table": "keyless"},
    })  # fmt: skip

    setup = _setup_dag().test(run_conf={})

    assert setup.state == "failed"
    assert "targets events, inventory_movements (created: events)" in caplog.text
    assert "model 'missing', field source_table: analytics.nowhere: BigQuery source table" in caplog.text
    assert "model 'keyless', field conflict_key: keyless lacks unique index on keyless (tenant_id, day, seq)" in (
        caplog.text
    )
    assert pg.execute("SELECT to_regclass('events') IS NOT NULL, to_regclass('nowhere')").fetchone() == (True, None)


def test_refused_pairs_name_the_column_and_what_to_use_instead():
    from bq_backfill import type_map
    from bq_backfill.models import TargetColumn, resolve

    assert "keeps 3 fractional digits" in type_map.mismatch("at", "TIMESTAMP", "timestamp(3) with time zone")
    assert type_map.mismatch("at", "TIMESTAMP", "timestamp with time zone") is None
    assert "use numeric[] (unconstrained elements)" in type_map.mismatch("xs", "ARRAY<NUMERIC>", "numeric(18,4)[]")
    assert type_map.mismatch("xs", "ARRAY<NUMERIC>", "numeric(38,9)[]") is None
    assert type_map.mismatch("xs", "ARRAY<STRING>", "character varying(5)[]") is not None
    assert type_map.mismatch("gs", "ARRAY<GEOGRAPHY>", "jsonb") is None
    declaration = model_file.parse("m", {**EVENTS, "conflict_key": ["tenant_id", "score"], "order_key": ["score"]})
    target = [TargetColumn("tenant_id", "text"), TargetColumn("score", "double precision")]
    with pytest.raises(LookupError) as refused:
        resolve(declaration, target, {"tenant_id": "INT64", "score": "FLOAT64"})
    assert "'score' of BigQuery type FLOAT64 cannot be in a conflict_key" in str(refused.value)
    assert "tenant column 'tenant_id' must be a STRING in BigQuery and a uuid in Postgres" in str(refused.value)


def test_a_value_that_is_not_a_uuid_is_quarantined_not_a_failed_chunk():
    from bq_backfill.models import Column
    from bq_backfill.validate import split_invalid

    model = model_file.parse("m", EVENTS).resolved((Column("tenant_id", "uuid"), Column("day", "date"),
                                                      Column("seq", "bigint"), Column("ref", "uuid")))  # fmt: skip
    rows = pa.table({"tenant_id": [SEED_TENANT] * 3, "day": [date(2020, 1, 1)] * 3, "seq": [1, 2, 3],
                     "ref": [OTHER_TENANT.upper(), "not-a-uuid", None], "_row_offset": [0, 1, 2]})  # fmt: skip

    checked = split_invalid(model, rows, "_row_offset")

    assert checked.rejected.offsets == [1] and checked.rejected.reasons == ["ref is not a uuid"]


def test_setup_creates_a_target_with_renames_in_any_letter_case(pg):
    from bq_backfill.setup import create_target

    declaration = model_file.parse("m", {**EVENTS, "target_table": "renamed", "renames": {"SEQUENCE": "seq"}})
    with pg.transaction():
        create_target(pg, declaration, {"tenant_id": "STRING", "day": "DATE", "Sequence": "INT64"})
    columns = pg.execute("SELECT attname::text FROM pg_attribute WHERE attrelid = 'renamed'::regclass AND attnum > 0")
    assert sorted(c for (c,) in columns) == ["day", "seq", "tenant_id"]

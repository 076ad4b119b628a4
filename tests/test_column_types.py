"""BigQuery's column types land value for value (type_map.SUPPORTED, README "Column types"), with their edge values,
on every write path: COPY into an empty range, `proven`, `unchanged` (proofs gone), the upsert (one value changed),
and a re-run with nothing changed rewrites no row. A pair outside the table is refused before anything is billed.

The source is the emulator, loaded from Parquet; the rows are compared as Postgres gives them back through psycopg
(bytes, lists, Decimals, NaN), not through the package's own read-back.
"""

from __future__ import annotations

import io
import json
import math
from datetime import UTC, date, datetime, time
from decimal import Decimal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from google.cloud import bigquery
from helpers import chunks, jobs, scratch_tables

from bq_backfill import models
from devtools.seed import PROJECT, SEED_TENANT

# NUMERIC's extreme; negated with copy_negate (a plain minus rounds it to 28 digits)
BIG = Decimal("99999999999999999999999999999.999999999")
COLUMNS = (
    # name, BigQuery type, mode, Arrow type of the Parquet load, Postgres type
    ("tenant_id", "STRING", "NULLABLE", pa.string(), "uuid"),
    ("k", "INT64", "NULLABLE", pa.int64(), "bigint"),
    ("raw", "BYTES", "NULLABLE", pa.binary(), "bytea"),
    ("amount", "NUMERIC", "NULLABLE", pa.decimal128(38, 9), "numeric(38,9)"),
    ("tags", "STRING", "REPEATED", pa.list_(pa.string()), "text[]"),
    ("counts", "INT64", "REPEATED", pa.list_(pa.int64()), "bigint[]"),
    ("ratios", "FLOAT64", "REPEATED", pa.list_(pa.float64()), "double precision[]"),
    ("days", "DATE", "REPEATED", pa.list_(pa.date32()), "date[]"),
    ("ratio", "FLOAT64", "NULLABLE", pa.float64(), "double precision"),
    ("flag", "BOOL", "NULLABLE", pa.bool_(), "boolean"),
    ("day", "DATE", "NULLABLE", pa.date32(), "date"),
    ("at", "TIMESTAMP", "NULLABLE", pa.timestamp("us", "UTC"), "timestamptz"),
    ("local_at", "DATETIME", "NULLABLE", pa.timestamp("us"), "timestamp"),
    ("clock", "TIME", "NULLABLE", pa.time64("us"), "time"),
    ("doc", "JSON", "NULLABLE", pa.string(), "jsonb"),
    ("blobs", "BYTES", "REPEATED", pa.list_(pa.binary()), "bytea[]"),
    ("flags", "BOOL", "REPEATED", pa.list_(pa.bool_()), "boolean[]"),
    ("amounts", "NUMERIC", "REPEATED", pa.list_(pa.decimal128(38, 9)), "numeric(38,9)[]"),
    ("stamps", "TIMESTAMP", "REPEATED", pa.list_(pa.timestamp("us", "UTC")), "timestamptz[]"),
    ("locals", "DATETIME", "REPEATED", pa.list_(pa.timestamp("us")), "timestamp[]"),
    ("clocks", "TIME", "REPEATED", pa.list_(pa.time64("us")), "time[]"),
    ("label", "STRING", "NULLABLE", pa.string(), "varchar(12)"),
    ("wide", "INT64", "NULLABLE", pa.int64(), "numeric"),
)
TZ_MAX = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
ARRAYS = [
    {"doc": '{"b": [1, 2.5, null, {"c": "x\\"y"}], "a": "ü"}', "blobs": [b"\x00\xff", b"", None, b'"{,}\\'],
     "flags": [True, False, None], "amounts": [BIG, BIG.copy_negate(), None, Decimal("0.000000001")],
     "stamps": [datetime(1, 1, 1, tzinfo=UTC), TZ_MAX, None], "locals": [datetime(1969, 12, 31, 23, 59, 59, 999999)],
     "clocks": [time(0, 0), time(23, 59, 59, 999999), None]},
    {"doc": "null", "blobs": [], "flags": [], "amounts": [], "stamps": [], "locals": [], "clocks": []},
    {"doc": None, "blobs": None, "flags": None, "amounts": None, "stamps": None, "locals": None, "clocks": None},
    {"doc": '""', "blobs": [b"a"], "flags": [None], "amounts": [Decimal(1)], "stamps": [None],
     "locals": [datetime(2200, 1, 1)], "clocks": [time(12, 0, 0, 1)]},
]  # fmt: skip
EDGES = [
    {"raw": b"\x00\xff\xfe\x80", "amount": BIG, "tags": ['a"b', "c,d", "{e}", "back\\slash", "", None, "NULL", " sp "],
     "counts": [-(2**63), 2**63 - 1, None], "ratios": [math.nan, math.inf, -math.inf, -0.0, 5e-324],
     "days": [date(1, 1, 1), date(9999, 12, 31), None], "ratio": math.nan, "flag": True, "day": date(1969, 12, 31),
     "at": datetime(1900, 1, 1, 0, 0, 0, 1, tzinfo=UTC), "local_at": datetime(2200, 2, 28, 23, 59, 59, 999999),
     "clock": time(23, 59, 59, 999999), "label": "ünïcode €€€€", "wide": -(2**63)},
    {"raw": b"", "label": "", "wide": 2**63 - 1,
     "amount": BIG.copy_negate(), "tags": [], "counts": [], "ratios": [], "days": [], "ratio": -math.inf,
     "flag": False, "day": date(2100, 3, 1), "at": datetime(2262, 4, 11, 23, 47, 16, 854775, tzinfo=UTC),
     "local_at": datetime(1, 1, 1), "clock": time(0, 0)},
    {"raw": None, "amount": Decimal("0.000000001"), "tags": None, "counts": None, "ratios": None, "days": None,
     "ratio": -0.0, "flag": None, "day": None, "at": None, "local_at": None, "clock": None},
    {"raw": "ünïcode €".encode(), "amount": Decimal("-0.000000001"), "tags": ["ünïcode €", "tab\there", "new\nline"],
     "counts": [0], "ratios": [1.5], "days": [date(2024, 2, 29)], "ratio": 1e308, "flag": True,
     "day": date(2024, 2, 29), "at": datetime(2024, 2, 29, 12, 0, tzinfo=UTC), "local_at": datetime(2024, 2, 29),
     "clock": time(12, 30, 0, 1)},
]  # fmt: skip


def _rows(n: int = 60) -> list[dict]:
    """Each edge row, then ordinary ones, keyed 0..n-1."""
    out = []
    for k in range(n):
        i = min(k, len(EDGES) - 1)
        row = {**EDGES[i], **ARRAYS[i]}
        if k >= len(EDGES):
            row |= {"amount": Decimal(k), "counts": [k, k * k], "doc": f'{{"k": {k}}}'}
        out.append({"tenant_id": SEED_TENANT, "k": k, **row})
    return out


# declared as a deployment would: the columns and their types come from the two tables
TYPED = {"source_table": "analytics.typed", "target_table": "typed", "conflict_key": ["tenant_id", "k"],
         "order_key": ["k"]}  # fmt: skip


@pytest.fixture
def typed_dag(declare_models):
    return declare_models({"types_test": TYPED})


def _load(bq, rows: list[dict]) -> None:
    table = f"{PROJECT}.analytics.typed"
    bq.delete_table(table, not_found_ok=True)
    bq.create_table(bigquery.Table(table, schema=[bigquery.SchemaField(n, t, mode=m) for n, t, m, _, _ in COLUMNS]))
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([(n, a) for n, _, _, a, _ in COLUMNS])), buf)
    buf.seek(0)
    bq.load_table_from_file(buf, table, job_config=bigquery.LoadJobConfig(source_format="PARQUET")).result()


def _target(pg) -> list[tuple]:
    # jsonb as a one-element array, so that JSON null and SQL NULL stay apart through psycopg
    doc = "CASE WHEN doc IS NOT NULL THEN jsonb_build_array(doc) END AS doc"
    names = ", ".join(doc if n == "doc" else n for n, *_ in COLUMNS[1:])
    return pg.execute(f"SELECT {names} FROM typed ORDER BY k").fetchall()  # noqa: S608


def _comparable(value):
    """NaN equal to NaN, -0.0 apart from 0.0, bytes as bytes (psycopg gives memoryview-free bytes)."""
    if isinstance(value, float):
        return ("nan",) if math.isnan(value) else (value, math.copysign(1, value))
    if isinstance(value, list):
        return [_comparable(v) for v in value]
    return value


def _expected(rows: list[dict]) -> list[tuple]:
    def value(row: dict, name: str):
        if name == "doc":
            return None if row[name] is None else [json.loads(row[name])]
        return _comparable(row.get(name))

    return [tuple(value(r, n) for n, *_ in COLUMNS[1:]) for r in rows]


def _landed(pg) -> list[tuple]:
    return [tuple(_comparable(v) for v in row) for row in _target(pg)]


def _versions(pg) -> list[str]:
    return [r[0] for r in pg.execute("SELECT xmin::text FROM typed ORDER BY k").fetchall()]


def _paths(pg) -> set[str]:
    [job] = [j for j in jobs(pg, model_type="types_test") if j["status"] == "completed"][-1:]
    return {path for c in chunks(pg, job["id"]) for path in (c["write_path"] or "").split("+")}


def _run(dag, **conf):
    dr = dag.test(run_conf={"tenant_id": SEED_TENANT, "model_type": "types_test", "chunk_size": 100, **conf})
    assert dr.state == "success"


@pytest.fixture
def typed_target(pg, typed_dag):
    """The target as a user would write its DDL (the setup DAG's own creation is tested in test_declared_models)."""
    ddl = ", ".join(f"{n} {pg_type}" for n, *_, pg_type in COLUMNS)
    pg.execute(f"CREATE TABLE typed ({ddl}, UNIQUE (tenant_id, k))")
    pg.execute("ALTER TABLE typed ALTER tenant_id SET NOT NULL, ALTER k SET NOT NULL")
    return typed_dag


def test_every_supported_type_lands_value_for_value_on_every_path(pg, bq, typed_target, monkeypatch):
    backfill_dag = typed_target
    monkeypatch.setenv("BACKFILL_SLICE_ROWS", "7")  # slices cut at offsets inside the read's record batches
    rows = _rows()
    _load(bq, rows)

    _run(backfill_dag)  # cold: COPY into the empty range
    assert _landed(pg) == _expected(rows)
    assert "copy" in _paths(pg)
    versions = _versions(pg)

    _run(backfill_dag)  # nothing changed: the proofs hold
    assert _versions(pg) == versions and _landed(pg) == _expected(rows)
    assert _paths(pg) == {"proven"}

    pg.execute("DELETE FROM backfill_range_proofs")
    _run(backfill_dag)  # nothing changed, no proof: compared value for value with what the target holds
    assert _versions(pg) == versions and _landed(pg) == _expected(rows)
    assert _paths(pg) == {"unchanged"}

    rows[0] = {**rows[0], "tags": [*rows[0]["tags"], "new"], "raw": b"\x01"}  # one value changed
    rows[1] = {**rows[1], "ratios": [-0.0]}
    rows[3] = {**rows[3], "doc": '"changed"'}
    rows[4] = {**rows[4], "doc": '{ "k" :  4.0 }'}  # the same jsonb value as {"k": 4}, as Postgres compares them
    _load(bq, rows)
    _run(backfill_dag)
    assert _landed(pg) == _expected(rows)
    after = _versions(pg)
    assert [i for i, (a, b) in enumerate(zip(versions, after, strict=True)) if a != b] == [0, 1, 3]  # only those
    assert "upsert" in _paths(pg)

    rows[5] = {**rows[5], "doc": '{"k": 5, "more": [true]}'}  # only a JSON value, in a slice otherwise unchanged
    _load(bq, rows)
    _run(backfill_dag)
    assert _landed(pg) == _expected(rows)
    assert [i for i, (a, b) in enumerate(zip(after, _versions(pg), strict=True)) if a != b] == [5]


def test_a_type_pair_outside_the_table_is_refused_before_anything_is_billed(pg, bq, typed_dag, caplog):
    backfill_dag = typed_dag
    ddl = ", ".join(f"{n} {'text' if n == 'raw' else pg_type}" for n, *_, pg_type in COLUMNS)
    pg.execute(f"CREATE TABLE typed ({ddl}, UNIQUE (tenant_id, k))")
    _load(bq, _rows(5))

    dr = backfill_dag.test(run_conf={"tenant_id": SEED_TENANT, "model_type": "types_test"})

    assert dr.state == "failed"
    assert jobs(pg, model_type="types_test") == []  # refused by cleanup's first check, before it claims a job
    assert "column 'raw': BigQuery BYTES does not land in Postgres text; it lands in bytea" in caplog.text
    assert pg.execute("SELECT count(*) FROM typed").fetchone()[0] == 0
    assert scratch_tables(bq) == []  # no snapshot was made


def test_numbers_too_big_for_their_column_and_nul_in_array_elements_are_rejected_not_landed():
    """A rounding that overflows the source's decimal(38,9) gives garbage in Arrow: such a value must still be found
    out of range (not land as 0); an element Postgres text cannot hold rejects its row, naming the column."""
    from bq_backfill.validate import split_invalid

    model = models.Model(
        model_type="checks_test",
        source_table="analytics.t",
        target_table="t",
        columns=tuple(
            models.Column(n, t)
            for n, t in (("tenant_id", "uuid"), ("k", "bigint"), ("amount", "numeric(18,4)"), ("tags", "text[]"))
        ),
        conflict_key=("tenant_id", "k"),
        order_key=("k",),
    )
    amounts = [BIG, Decimal("99999999999999.99995"), Decimal("99999999999999.99994"), Decimal("1.5"), None, None]
    tags = [[], None, ["a"], [None, "b"], ["ok", "n\x00ul"], None]
    rows = pa.table({
        "tenant_id": [SEED_TENANT] * 6, "k": list(range(6)),
        "amount": pa.array(amounts, pa.decimal128(38, 9)), "tags": pa.array(tags, pa.list_(pa.string())),
        "_row_offset": list(range(6)),
    })  # fmt: skip
    for rounding in ("reject", "round"):
        checked = split_invalid(model, rows, "_row_offset", rounding)

        assert checked.rejected.offsets == [0, 1, 4] if rounding == "round" else [0, 1, 2, 4]
        assert all(r.startswith("amount out of range for numeric(18,4)") for r in checked.rejected.reasons[:2])
        assert "tags has an element with a NUL character" in checked.rejected.reasons[-1]
        assert checked.good["k"].to_pylist() == ([2, 3, 5] if rounding == "round" else [3, 5])
    sliced = split_invalid(model, rows.slice(3, 3), "_row_offset")  # a slice of a larger read, as chunks cut them
    assert sliced.rejected.offsets == [4] and sliced.good["k"].to_pylist() == [3, 5]


def test_bignumeric_lands_and_reads_back_at_the_arrow_level(pg):
    """BIGNUMERIC as the Storage Read API sends it (decimal256(76, 38)), which the emulator cannot create: COPY into
    `numeric`, then read back as the unchanged path reads it, equal value for value."""
    from psycopg import sql

    from bq_backfill import sink, target_rows

    model = models.Model(
        model_type="bignumeric_test",
        source_table="analytics.b",
        target_table="bignum",
        columns=(models.Column("tenant_id", "uuid"), models.Column("k", "bigint"), models.Column("v", "numeric"),
                 models.Column("vs", "numeric[]")),
        conflict_key=("tenant_id", "k"),
        order_key=("k",),
    )  # fmt: skip
    pg.execute("CREATE TABLE bignum (tenant_id uuid, k bigint, v numeric, vs numeric[], UNIQUE (tenant_id, k))")
    big = Decimal("5" * 38 + "." + "7" * 38)
    values = [big, big.copy_negate(), Decimal("1E-38"), Decimal(0), None]
    decimal = pa.decimal256(76, 38)
    rows = pa.table({
        "tenant_id": [SEED_TENANT] * 5, "k": list(range(5)), "v": pa.array(values, decimal),
        "vs": pa.array([values[:2], [], None, [None, values[2]], [values[3]]], pa.list_(decimal)),
    })  # fmt: skip

    assert sink.copy_arrow(pg, sql.Identifier("bignum"), rows) == 5
    assert pg.execute("SELECT v FROM bignum ORDER BY k").fetchall() == [(v,) for v in values]
    keys = target_rows.key_range(model, rows)
    with pg.transaction():  # the read-back's settings are the transaction's
        back = target_rows.rows_in_range(pg, model, SEED_TENANT, keys, ["k", "v", "vs"], rows.schema)
    assert back is not None and all(back[c].equals(rows[c]) for c in ("k", "v", "vs"))


def test_a_column_added_in_bigquery_is_ignored_and_reported(pg, bq, typed_target, caplog):
    backfill_dag = typed_target
    pg.execute("ALTER TABLE typed DROP COLUMN clocks, DROP COLUMN doc")  # the target never had them
    _load(bq, _rows(5))

    _run(backfill_dag)

    ignored = pg.execute("SELECT ignored_source_columns FROM bigquery_backfill_jobs WHERE model_type = 'types_test'")
    assert ignored.fetchone()[0] == ["clocks", "doc"]
    assert "has columns model types_test does not read: clocks, doc. They are ignored" in caplog.text
    assert pg.execute("SELECT count(*) FROM typed").fetchone()[0] == 5


def test_a_column_the_model_needs_gone_from_bigquery_refuses_the_run_before_anything_is_written(
    pg, bq, typed_target, caplog
):
    backfill_dag = typed_target
    _load(bq, _rows(5))
    table = bq.get_table(f"{PROJECT}.analytics.typed")
    kept = [f for f in table.schema if f.name != "clocks"]
    bq.delete_table(table)
    bq.create_table(bigquery.Table(f"{PROJECT}.analytics.typed", schema=kept))  # the column dropped in BigQuery

    dr = backfill_dag.test(run_conf={"tenant_id": SEED_TENANT, "model_type": "types_test"})

    assert dr.state == "failed"
    assert "model 'types_test': source columns ['clocks'] are not in the source table analytics.typed" in caplog.text
    assert jobs(pg, model_type="types_test") == [] and pg.execute("SELECT count(*) FROM typed").fetchone()[0] == 0


# STRUCT and ARRAY<STRUCT> through the emulator, into jsonb by the snapshot query's TO_JSON_STRING. (The emulator
# writes a float NaN inside a struct as bare NaN, which is not JSON; BigQuery writes "NaN": no NaN here.)
NESTED_FIELDS = [
    bigquery.SchemaField("tenant_id", "STRING"),
    bigquery.SchemaField("k", "INT64"),
    bigquery.SchemaField("s", "RECORD", fields=[
        bigquery.SchemaField("a", "INT64"), bigquery.SchemaField("b", "STRING"),
        bigquery.SchemaField("c", "DATE", mode="REPEATED"), bigquery.SchemaField("n", "NUMERIC"),
        bigquery.SchemaField("deep", "RECORD", fields=[bigquery.SchemaField("x", "BOOL")]),
    ]),
    bigquery.SchemaField("xs", "RECORD", mode="REPEATED", fields=[bigquery.SchemaField("x", "INT64")]),
]  # fmt: skip
NESTED_ARROW = pa.schema([
    ("tenant_id", pa.string()), ("k", pa.int64()),
    ("s", pa.struct([("a", pa.int64()), ("b", pa.string()), ("c", pa.list_(pa.date32())),
                     ("n", pa.decimal128(38, 9)), ("deep", pa.struct([("x", pa.bool_())]))])),
    ("xs", pa.list_(pa.struct([("x", pa.int64())]))),
])  # fmt: skip


def _nested_rows(n: int) -> list[dict]:
    edge = [
        {"s": {"a": -(2**63), "b": 'q"{,}\\ ü', "c": [date(1, 1, 1), date(9999, 12, 31)], "n": BIG,
               "deep": {"x": True}}, "xs": [{"x": 1}, {"x": None}]},
        {"s": None, "xs": []},
        {"s": {"a": None, "b": None, "c": [], "n": None, "deep": None}, "xs": [{"x": 2}]},
    ]  # fmt: skip
    return [
        {"tenant_id": SEED_TENANT, "k": k, **(edge[k] if k < len(edge) else {"s": {"a": k, "b": f"b{k}", "c": [],
         "n": Decimal(k) / 8, "deep": {"x": k % 2 == 0}}, "xs": [{"x": k}]})}
        for k in range(n)
    ]  # fmt: skip


def _load_nested(bq, rows: list[dict]) -> None:
    table = f"{PROJECT}.analytics.nested"
    bq.delete_table(table, not_found_ok=True)
    bq.create_table(bigquery.Table(table, schema=NESTED_FIELDS))
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=NESTED_ARROW), buf)
    buf.seek(0)
    bq.load_table_from_file(buf, table, job_config=bigquery.LoadJobConfig(source_format="PARQUET")).result()


def _as_json(value):
    """A source value as TO_JSON_STRING writes it and jsonb holds it: dates as strings, numbers as numbers."""
    if isinstance(value, dict):
        return {k: _as_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_json(v) for v in value]
    return value.isoformat() if isinstance(value, date) else value


def test_structs_land_as_jsonb_on_every_path(pg, bq, declare_models, monkeypatch):
    monkeypatch.setenv("BACKFILL_SLICE_ROWS", "7")
    dag = declare_models({"nested_test": {"source_table": "analytics.nested", "target_table": "nested",
                                          "conflict_key": ["tenant_id", "k"], "order_key": ["k"]}})  # fmt: skip
    pg.execute(
        "CREATE TABLE nested (tenant_id uuid NOT NULL, k bigint NOT NULL, s jsonb, xs jsonb, UNIQUE (tenant_id, k))"
    )
    rows = _nested_rows(30)
    _load_nested(bq, rows)

    def landed():  # jsonb as text, its numbers as Decimals: every digit Postgres holds
        rows = pg.execute("SELECT k, s::text, xs::text, xmin::text FROM nested ORDER BY k").fetchall()
        return [(k, s and json.loads(s, parse_float=Decimal), json.loads(xs, parse_float=Decimal), v)
                for k, s, xs, v in rows]  # fmt: skip

    def paths():
        [job] = [j for j in jobs(pg, model_type="nested_test") if j["status"] == "completed"][-1:]
        return {p for c in chunks(pg, job["id"]) for p in (c["write_path"] or "").split("+")}

    def run():
        dr = dag.test(run_conf={"tenant_id": SEED_TENANT, "model_type": "nested_test", "chunk_size": 100})
        assert dr.state == "success"

    run()
    first = landed()
    expected = [(r["k"], None if r["s"] is None else _as_json(r["s"]), _as_json(r["xs"])) for r in rows]
    # NUMERIC's extreme keeps all its digits
    assert [(k, s, xs) for k, s, xs, _ in first] == expected
    assert paths() == {"copy"}
    run()
    assert landed() == first and paths() == {"proven"}
    pg.execute("DELETE FROM backfill_range_proofs")
    run()
    assert landed() == first and paths() == {"unchanged"}  # compared as jsonb: key order and spacing do not count
    rows[4]["s"]["deep"] = {"x": None}
    _load_nested(bq, rows)
    run()
    after = landed()
    assert [r[0] for r, f in zip(after, first, strict=True) if r[3] != f[3]] == [4]
    assert after[4][1]["deep"] == {"x": None}


def test_geography_interval_and_range_land_from_the_text_the_snapshot_query_makes(pg):
    """GEOGRAPHY, INTERVAL and RANGE as the snapshot query turns them into text (BigQuery's ST_ASTEXT, ST_ASGEOJSON,
    its canonical INTERVAL string, a composed range literal), which the emulator cannot produce as BigQuery does:
    the query it sends, then the text landing on each write path, equal as Postgres compares the types."""
    from bq_backfill import range_proofs, sink
    from bq_backfill.models import Column
    from bq_backfill.source import BigQuerySource, TableRef

    columns = (Column("tenant_id", "uuid", source_type="STRING"), Column("k", "bigint", source_type="INT64"),
               Column("wkt", "text", "geo", "GEOGRAPHY"), Column("geojson", "jsonb", "geo", "GEOGRAPHY"),
               Column("span", "interval", source_type="INTERVAL"),
               Column("days", "daterange", source_type="RANGE<DATE>"),
               Column("locals", "tsrange", source_type="RANGE<DATETIME>"),
               Column("stamps", "tstzrange", source_type="RANGE<TIMESTAMP>"),
               Column("xs", "jsonb", source_type="ARRAY<STRUCT>"))  # fmt: skip
    declaration = models_declaration("exotic_test", "exotic")
    model = declaration.resolved(columns)
    sent = BigQuerySource.snapshot_select(model, TableRef("p", "d", "t"), datetime(2026, 1, 1, tzinfo=UTC))
    for expression in ("ST_ASTEXT(`geo`) AS `wkt`", "ST_ASGEOJSON(`geo`) AS `geojson`",
                       "CAST(`span` AS STRING) AS `span`", "IF(`xs` IS NULL, NULL, TO_JSON_STRING(`xs`)) AS `xs`",
                       "IF(`days` IS NULL, NULL, CONCAT('[', IFNULL(CAST(RANGE_START(`days`) AS STRING), ''), ',', "
                       "IFNULL(CAST(RANGE_END(`days`) AS STRING), ''), ')')) AS `days`"):  # fmt: skip
        assert expression in sent
    pg.execute(
        "CREATE TABLE exotic (tenant_id uuid NOT NULL, k bigint NOT NULL, wkt text, geojson jsonb, span interval, "
        "days daterange, locals tsrange, stamps tstzrange, xs jsonb, UNIQUE (tenant_id, k))"
    )
    values = {
        "wkt": ["POINT(1.5 2)", "POLYGON((0 0, 1 0, 1 1, 0 0))", None, "LINESTRING(-180 -90, 180 90)"],
        "geojson": ['{ "type": "Point", "coordinates": [1.5, 2] }', None, '{"type":"Point","coordinates":[0,0]}',
                    None],
        "span": ["1-2 3 4:5:6.789", "-1-2 -3 -4:5:6.789", "10000-0 3660000 87840000:0:0", None],
        "days": ["[2020-01-01,2020-02-01)", "[,2020-02-01)", "[2020-01-01,)", "[,)"],
        "locals": ["[0001-01-01 00:00:00,9999-12-31 23:59:59.999999)", None, "[2020-01-01 10:00:00,)", "[,)"],
        "stamps": ["[2020-01-01 00:00:00.5+00,)", "[,2020-01-01 00:00:00+00)", None, "[,)"],
        "xs": ['[{"x":1},{"x":null}]', "[]", '[{"x":2}]', "[]"],
    }  # fmt: skip
    rows = pa.table({"tenant_id": [SEED_TENANT] * 4, "k": [0, 1, 2, 3], **values,
                     sink.OFFSET_COLUMN: [0, 1, 2, 3]})  # fmt: skip

    def land(table, proof=None):
        with pg.transaction():
            return sink.land_rows(pg, model, SEED_TENANT, table, proof=proof)

    def versions():
        return [r[0] for r in pg.execute("SELECT xmin::text FROM exotic ORDER BY k").fetchall()]

    proof = range_proofs.ProofKey(SEED_TENANT, "exotic_test", range_proofs.digest(model, rows), "0" * 32)
    assert land(rows, proof).path == "copy"
    for name, texts in values.items():
        pg_type = next(c.pg_type for c in columns if c.name == name)
        same = pg.execute(
            f"SELECT bool_and(e.v::{pg_type} IS NOT DISTINCT FROM x.{name}) FROM exotic x "  # noqa: S608
            "JOIN unnest(%s::text[]) WITH ORDINALITY AS e(v, n) ON e.n - 1 = x.k",
            [texts],
        ).fetchone()[0]
        assert same, name
    before = versions()
    assert land(rows, proof).path == "proven" and versions() == before
    pg.execute("DELETE FROM backfill_range_proofs")
    again = land(rows)  # nothing changed: Postgres compares interval and range values, and rewrites no row
    assert (again.inserted, again.updated, again.unchanged) == (0, 0, 4) and versions() == before
    changed = rows.set_column(
        rows.schema.get_field_index("span"),
        "span",
        pa.array(["1-2 3 4:5:6.789", "0-0 1 0:0:0", "10000-0 3660000 87840000:0:0", None]),
    )
    assert land(changed).updated == 1
    assert [a == b for a, b in zip(before, versions(), strict=True)] == [True, False, True, True]
    assert pg.execute("SELECT span::text FROM exotic WHERE k = 1").fetchone() == ("1 day",)


def test_a_range_field_is_read_with_its_element_type():
    from bq_backfill.source import BigQuerySource

    field = bigquery.SchemaField("r", "RANGE", range_element_type="TIMESTAMP")
    assert BigQuerySource.column_type(field) == "RANGE<TIMESTAMP>"
    assert BigQuerySource.column_type(bigquery.SchemaField("xs", "RECORD", mode="REPEATED")) == "ARRAY<STRUCT>"


def models_declaration(name: str, table: str):
    from bq_backfill.models import Declaration

    return Declaration(name, f"analytics.{table}", table, ("tenant_id", "k"), ("k",))

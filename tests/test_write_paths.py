"""How a chunk reaches the target: one COPY into an empty key range, nothing at all when every row is already there
with the same values, the upsert otherwise. The cheap paths must never hide a difference, however small."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from decimal import Decimal

import psycopg
import pyarrow as pa
import pytest
from helpers import INVENTORY, chunks, conf, jobs, table_state
from psycopg import sql

from bq_backfill import ledger, sink
from devtools.seed import (
    ARROW_SCHEMA,
    SEED_TENANT,
    as_tuples,
    create_source,
    insert_target,
    inventory_rows,
    target_rows,
)

MODEL = INVENTORY


def _source_with_edge_values() -> list[dict]:
    rows = inventory_rows(SEED_TENANT, 1_500)
    rows[10]["movement_type"] = None
    rows[270]["movement_type"] = ""
    rows[520]["updated_at"] = rows[520]["updated_at"].replace(microsecond=123_456)
    rows[780]["quantity"] = Decimal("1.2345")
    return rows


def test_a_rerun_rewrites_exactly_the_rows_that_differ_however_slightly(pg, bq, backfill_dag):
    source = _source_with_edge_values()
    create_source(bq, source)
    assert backfill_dag.test(run_conf=conf()).state == "success"
    assert {c["write_path"] for c in chunks(pg, jobs(pg)[0]["id"])} == {"copy"}
    assert target_rows(pg, SEED_TENANT) == as_tuples(source)

    def set_value(i: int, assignment: str, *values) -> None:
        r = source[i]
        pg.execute(
            f"UPDATE inventory_movements SET {assignment} "  # noqa: S608 - fixed test text
            "WHERE tenant_id = %s AND movement_date = %s AND branch_id = %s AND product_code = %s",
            (*values, SEED_TENANT, r["movement_date"], r["branch_id"], r["product_code"]),
        )

    set_value(10, "movement_type = ''")  # source NULL, target empty string (chunk 0)
    set_value(270, "movement_type = NULL")  # source empty string, target NULL (chunk 1)
    set_value(520, "updated_at = updated_at + interval '1 microsecond'")  # (chunk 2)
    set_value(780, "quantity = quantity + 0.0001")  # (chunk 3)
    extra = {**source[1100], "product_code": source[1100]["product_code"] + "x"}  # a key not in the source, in
    pg.execute(  # chunk 4's key range: the target keeps it, the chunk must not be called unchanged
        "INSERT INTO inventory_movements SELECT tenant_id, movement_date, branch_id, %s, quantity, unit_cost, "
        "movement_type, updated_at FROM inventory_movements WHERE tenant_id = %s AND product_code = %s",
        (extra["product_code"], SEED_TENANT, source[1100]["product_code"]),
    )
    last_chunk = table_state(pg, "inventory_movements", "product_code >= %s", (source[1250]["product_code"],))

    dr = backfill_dag.test(run_conf=conf())

    assert dr.state == "success"
    done = chunks(pg, jobs(pg)[1]["id"])
    assert [c["write_path"] for c in done] == ["upsert"] * 5 + ["proven"]  # the last range as the COPY left it
    assert [c["rows_updated"] for c in done] == [1, 1, 1, 1, 0, 0]
    assert [c["rows_inserted"] for c in done] == [0] * 6
    assert target_rows(pg, SEED_TENANT) == as_tuples([*source, extra])
    assert table_state(pg, "inventory_movements", "product_code >= %s", (source[1250]["product_code"],)) == last_chunk


TRICKY_TEXT = ["a,b", 'say "hi"', "(paren", "paren)", "()", "multi\nline", "back\\slash", " padded ", "ünï€ødé", "",
               None, "NULL", "\\N", "tab\there"]  # fmt: skip


def test_text_that_needs_quoting_compares_equal_on_a_rerun(pg, bq, backfill_dag):
    source = inventory_rows(SEED_TENANT, 600)
    for i, r in enumerate(source):
        r["movement_type"] = TRICKY_TEXT[i % len(TRICKY_TEXT)]
        r["branch_id"] = f"({r['branch_id']}, x)" if i % 7 == 0 else r["branch_id"]  # in the key too
    create_source(bq, source)
    assert backfill_dag.test(run_conf=conf()).state == "success"
    assert target_rows(pg, SEED_TENANT) == as_tuples(source)
    before = table_state(pg, "inventory_movements")
    pg.execute("DELETE FROM backfill_range_proofs")  # the rows must be fetched and compared, not taken as proven

    assert backfill_dag.test(run_conf=conf()).state == "success"

    assert {c["write_path"] for c in chunks(pg, jobs(pg)[1]["id"])} == {"unchanged"}
    assert table_state(pg, "inventory_movements") == before


def _chunk_rows(rows: list[dict]) -> pa.Table:
    table = pa.Table.from_pylist(rows, schema=ARROW_SCHEMA)
    return table.append_column(sink.OFFSET_COLUMN, pa.array(range(len(rows)), pa.int64()))


def test_a_row_written_by_someone_else_during_the_copy_turns_it_into_an_upsert(pg, pg_server):
    ledger.apply_schema(pg)
    rows = inventory_rows(SEED_TENANT, 500)
    # Another session writes a key of the chunk and has not committed when the chunk checks its key range.
    other = psycopg.connect(pg_server)
    theirs = {**rows[300], "movement_type": "theirs"}
    insert_target(other, [theirs])
    landed: list[sink.Landed] = []

    def land() -> None:
        with psycopg.connect(pg_server) as conn, conn.transaction():
            landed.append(sink.land_rows(conn, MODEL, SEED_TENANT, _chunk_rows(rows)))

    writer = threading.Thread(target=land)
    writer.start()
    deadline = time.monotonic() + 30
    while not pg.execute(  # the chunk's COPY waits on the other session's uncommitted key
        "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE 'COPY%%'"
    ).fetchone():
        assert time.monotonic() < deadline and writer.is_alive(), "the COPY never waited on the other writer"
        time.sleep(0.05)
    other.commit()
    other.close()
    writer.join(30)

    assert landed == [sink.Landed("upsert", inserted=499, updated=1, unchanged=0)]
    assert target_rows(pg, SEED_TENANT) == as_tuples(rows)  # the chunk's value won: it is the source's


def test_a_session_in_another_time_zone_writes_and_compares_the_same_instants(pg, pg_server):
    ledger.apply_schema(pg)
    rows = inventory_rows(SEED_TENANT, 300)
    for i, r in enumerate(rows):
        r["updated_at"] += timedelta(microseconds=i)
    for expected in ("copy", "unchanged"):
        with psycopg.connect(pg_server, options="-c TimeZone=Asia/Kolkata") as conn, conn.transaction():
            assert sink.land_rows(conn, MODEL, SEED_TENANT, _chunk_rows(rows)).path == expected
        assert target_rows(pg, SEED_TENANT) == as_tuples(rows)


def test_a_chunk_larger_than_a_slice_lands_slice_by_slice_in_one_transaction(pg, bq, backfill_dag, monkeypatch):
    monkeypatch.setenv("BACKFILL_SLICE_ROWS", "100")  # chunks of 250 read and write 100 + 100 + 50 rows
    source = inventory_rows(SEED_TENANT, 1_000)
    # rows 99 and 100 share a key (they would straddle a slice boundary): the snapshot keeps the later by updated_at
    source[100] = {**source[100], "product_code": source[99]["product_code"], "movement_type": "later"}
    create_source(bq, source)
    ledger.apply_schema(pg)
    insert_target(pg, source[150:200] + source[210:220])  # the second and third slices of chunk 0 are partly there

    dr = backfill_dag.test(run_conf=conf())

    assert dr.state == "success"
    done = chunks(pg, jobs(pg)[0]["id"])
    assert [c["write_path"] for c in done] == ["copy+upsert", "copy", "copy", "copy"]
    first = done[0]
    assert (first["rows_read"], first["rows_inserted"], first["rows_updated"], first["rows_unchanged"]) == (
        250,
        190,
        0,  # the duplicate never reaches a chunk
        60,
    )
    assert target_rows(pg, SEED_TENANT) == as_tuples(source[:99] + source[100:])


def test_a_target_value_arrow_cannot_read_takes_the_exact_sql_paths(pg, bq, backfill_dag):
    source = inventory_rows(SEED_TENANT, 600)
    create_source(bq, source)
    ledger.apply_schema(pg)
    # a row outside the source with dates Arrow has no value for: every range holding it, and the final key
    # check, must fall back to Postgres's own comparison
    pg.execute(
        "INSERT INTO inventory_movements VALUES (%s, 'infinity', 'BR-00', 'P-far', 1, 1, 'x', 'infinity'), "
        "(%s, %s, %s, 'P0000001a', 1, 1, 'x', '-infinity')",
        (SEED_TENANT, SEED_TENANT, source[1]["movement_date"], source[1]["branch_id"]),
    )

    dr = backfill_dag.test(run_conf=conf())

    assert dr.state == "success"
    assert [c["write_path"] for c in chunks(pg, jobs(pg)[0]["id"])] == ["upsert", "copy", "copy"]
    assert pg.execute("SELECT count(*) FROM inventory_movements").fetchone() == (602,)


def test_text_keys_in_a_linguistic_collation_land_and_reconcile(pg, bq, backfill_dag):
    """Chunks are key ranges in byte order (as BigQuery sorts); a target whose key text sorts otherwise must still
    get every row, pass the final key check, and see nothing rewritten on a re-run."""
    collation = pg.execute(
        "SELECT collname FROM pg_collation WHERE collname IN ('und-x-icu', 'en_US.utf8') ORDER BY collname DESC"
    ).fetchone()
    if collation is None:
        pytest.skip("this PostgreSQL server has neither an ICU nor an en_US collation")
    ledger.apply_schema(pg)
    pg.execute(
        sql.SQL("ALTER TABLE inventory_movements ALTER COLUMN branch_id TYPE text COLLATE {}").format(
            sql.Identifier(collation[0])
        )
    )
    source = inventory_rows(SEED_TENANT, 1_000)
    for i, r in enumerate(source):  # byte order: BR-B < BR-D < br-a < br-c < br-e; linguistic: br-a < BR-B < ...
        r["branch_id"] = ["br-a", "BR-B", "br-c", "BR-D", "br-e"][(i // 8) % 5]
    create_source(bq, source)
    insert_target(pg, source[100:110])

    assert backfill_dag.test(run_conf=conf()).state == "success"
    assert sorted(target_rows(pg, SEED_TENANT)) == as_tuples(source)  # the server sorts them its own way
    before = table_state(pg, "inventory_movements")
    pg.execute("DELETE FROM backfill_range_proofs")  # compared, not taken as proven

    assert backfill_dag.test(run_conf=conf()).state == "success"
    assert table_state(pg, "inventory_movements") == before
    assert backfill_dag.test(run_conf=conf()).state == "success"  # again, with the proofs the last run recorded
    assert table_state(pg, "inventory_movements") == before
    assert sorted(target_rows(pg, SEED_TENANT)) == as_tuples(source)


def test_one_slice_of_several_tenants_lands_each_by_its_own_path_and_a_refused_row_names_its_tenant(pg):
    """A fleet's slice holds several tenants' rows: those with empty key ranges land by one COPY, a proven one is left
    alone, one already there is unchanged, one that differs is upserted, each counted as its own; every tenant ends
    as the upsert would leave it. A row the target refuses in the shared COPY is pinned on its tenant."""
    from bq_backfill import range_proofs

    ledger.apply_schema(pg)
    tenants = [f"{i:08x}-3333-4000-8000-000000000000" for i in range(6)]
    rows = {t: _chunk_rows(inventory_rows(t, 40 + 10 * i)) for i, t in enumerate(tenants)}

    def proof(t: str) -> range_proofs.ProofKey:
        return range_proofs.ProofKey(t, "inventory", range_proofs.digest(MODEL, rows[t]), "0" * 32)

    def slices(*which: str) -> list[sink.TenantRows]:
        return [sink.TenantRows(t, rows[t], proof=proof(t)) for t in which]

    with pg.transaction():  # tenants 2, 3, 4 landed earlier (2 with its proof recorded); 4 then changed
        sink.land_slices(pg, MODEL, slices(*tenants[2:5]))
    pg.execute("DELETE FROM backfill_range_proofs WHERE tenant_id <> %s", [tenants[2]])
    changed = tenants[4]
    pg.execute("UPDATE inventory_movements SET quantity = quantity + 1 WHERE tenant_id = %s", [changed])

    with pg.transaction():
        landed = sink.land_slices(pg, MODEL, slices(*tenants[:5]))

    assert [x.path for x in landed] == ["copy", "copy", "proven", "unchanged", "upsert"]
    assert [(x.inserted, x.updated, x.unchanged) for x in landed] == [
        (40, 0, 0), (50, 0, 0), (0, 0, 60), (0, 0, 70), (0, 80, 0),
    ]  # fmt: skip
    for t in tenants[:5]:
        assert target_rows(pg, t) == as_tuples(rows[t].drop_columns([sink.OFFSET_COLUMN]).to_pylist())
    # the two COPYd tenants share one COPY, so one row version; each records its own proof of it
    assert len({*landed[0].versions, *landed[1].versions}) == 1
    assert [sum(x.versions.values()) for x in landed[:2]] == [40, 50]

    # a constraint that refuses one row of the last tenant: the shared COPY is undone, the refusal is that tenant's
    code = rows[tenants[5]]["product_code"][7].as_py()
    pg.execute(
        sql.SQL(
            "ALTER TABLE inventory_movements ADD CONSTRAINT refuse_one "
            "CHECK (NOT (tenant_id = {} AND product_code = {}))"
        ).format(sql.Literal(tenants[5]), sql.Literal(code))
    )
    pg.execute("DELETE FROM inventory_movements WHERE tenant_id = ANY(%s::uuid[])", [tenants[:2]])
    with pytest.raises(sink.SliceFailedError) as failed, pg.transaction():
        sink.land_slices(pg, MODEL, slices(tenants[0], tenants[5], tenants[1]))
    assert failed.value.index == 1 and isinstance(failed.value.__cause__, psycopg.errors.CheckViolation)
    pg.execute("ALTER TABLE inventory_movements DROP CONSTRAINT refuse_one")

"""Range proofs: a re-run neither fetches nor compares a slice whose source rows (by digest) and whose target range
(by row versions) are as an earlier run proved them. Any write to the range since, by anyone, or any change of the
source rows, must send the slice back to the comparison; a proof is never recorded for a range that does not hold
exactly the slice's rows."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import psycopg
import pyarrow as pa
import pytest
from helpers import INVENTORY, chunks, conf, jobs, table_state
from test_reconciliation import _swallow
from test_write_paths import _chunk_rows

from bq_backfill import ledger, range_proofs, sink
from bq_backfill.target_rows import key_range
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


def _where(row: dict) -> tuple[str, tuple]:
    return "tenant_id = %s AND product_code = %s", (SEED_TENANT, row["product_code"])


def test_a_write_by_a_transaction_older_than_the_proof_is_seen(pg, pg_server, bq, backfill_dag):
    source = inventory_rows(SEED_TENANT, 1_000)
    create_source(bq, source)
    older = psycopg.connect(pg_server)
    older.execute("SELECT pg_current_xact_id()")  # this transaction's xid is older than the backfill's
    assert backfill_dag.test(run_conf=conf()).state == "success"
    where, params = _where(source[600])
    older.execute(f"UPDATE inventory_movements SET movement_type = 'theirs' WHERE {where}", params)  # noqa: S608
    older.commit()
    older.close()
    [(theirs,)] = pg.execute(f"SELECT xmin::text::bigint FROM inventory_movements WHERE {where}", params)  # noqa: S608
    [(ours,)] = pg.execute("SELECT min(xmin::text::bigint) FROM inventory_movements WHERE movement_type <> 'theirs'")
    assert theirs < ours  # newer than the proof, yet a smaller xid: "no xmin above the newest seen" would miss it

    assert backfill_dag.test(run_conf=conf()).state == "success"

    done = chunks(pg, jobs(pg)[1]["id"])
    assert [c["write_path"] for c in done] == ["proven", "proven", "upsert", "proven"]
    assert [c["rows_updated"] for c in done] == [0, 0, 1, 0]
    # a proven chunk proved its key range for finalize too; the upserted one did not (finalize read its keys)
    assert [c["key_proof"] is not None for c in done] == [True, True, False, True]
    assert target_rows(pg, SEED_TENANT) == as_tuples(source)


def test_a_deleted_row_is_seen_and_written_back(pg, bq, backfill_dag):
    source = inventory_rows(SEED_TENANT, 1_000)
    create_source(bq, source)
    assert backfill_dag.test(run_conf=conf()).state == "success"
    where, params = _where(source[10])
    pg.execute(f"DELETE FROM inventory_movements WHERE {where}", params)  # noqa: S608

    assert backfill_dag.test(run_conf=conf()).state == "success"

    done = chunks(pg, jobs(pg)[1]["id"])
    assert [c["write_path"] for c in done] == ["upsert", "proven", "proven", "proven"]
    assert [c["rows_inserted"] for c in done] == [1, 0, 0, 0]
    assert target_rows(pg, SEED_TENANT) == as_tuples(source)


def test_a_changed_source_row_sends_its_slice_to_the_comparison(pg, bq, backfill_dag):
    source = inventory_rows(SEED_TENANT, 1_000)
    create_source(bq, source)
    assert backfill_dag.test(run_conf=conf()).state == "success"
    source[300]["quantity"] += Decimal("0.0001")
    source[800]["updated_at"] += timedelta(microseconds=1)
    create_source(bq, source)

    assert backfill_dag.test(run_conf=conf()).state == "success"

    done = chunks(pg, jobs(pg)[1]["id"])
    assert [c["write_path"] for c in done] == ["proven", "upsert", "proven", "upsert"]
    assert [c["rows_updated"] for c in done] == [0, 1, 0, 1]
    assert target_rows(pg, SEED_TENANT) == as_tuples(source)


def test_only_the_latest_completed_runs_proofs_are_kept(pg, bq, backfill_dag):
    create_source(bq, inventory_rows(SEED_TENANT, 1_000))
    assert backfill_dag.test(run_conf=conf()).state == "success"
    assert backfill_dag.test(run_conf=conf()).state == "success"
    before = table_state(pg, "inventory_movements")
    latest = jobs(pg)[1]["id"]

    kept = pg.execute("SELECT job_id::text, count(*) FROM backfill_range_proofs GROUP BY 1").fetchall()

    assert kept == [(latest, 4)]  # one per slice: 4 chunks of 250 rows, one slice each
    assert table_state(pg, "inventory_movements") == before


def _proof(rows: pa.Table) -> range_proofs.ProofKey:
    return range_proofs.ProofKey(SEED_TENANT, "inventory", range_proofs.digest(MODEL, rows), "0" * 32)


def test_a_range_that_holds_someone_elses_row_is_never_taken_as_proven(pg):
    ledger.apply_schema(pg)
    source = inventory_rows(SEED_TENANT, 300)
    rows = _chunk_rows(source)
    theirs = {**source[150], "product_code": source[150]["product_code"] + "x"}  # inside the slice's key range
    insert_target(pg, [theirs])
    for _ in range(2):
        with pg.transaction():
            assert sink.land_rows(pg, MODEL, SEED_TENANT, rows, proof=_proof(rows)).path == "upsert"
    assert pg.execute("SELECT count(*) FROM backfill_range_proofs").fetchone() == (0,)

    # a COPY whose range gains someone else's row before its proof is recorded: the proof is never used, and the
    # next run compares the rows (and finds someone else's row in the range: the upsert)
    pg.execute("DELETE FROM inventory_movements")
    other = _chunk_rows(source[:100])
    with pg.transaction():
        landed = sink.land_rows(pg, MODEL, SEED_TENANT, other)
        assert landed.path == "copy"
        insert_target(pg, [{**source[50], "product_code": source[50]["product_code"] + "x"}])
        range_proofs.record_copied(pg, MODEL, [(_proof(other), other)])  # recorded or not: never used
    keys = key_range(MODEL, other)
    assert range_proofs.holds(pg, MODEL, [(_proof(other), keys, other.num_rows)]) == [None]
    with pg.transaction():
        assert sink.land_rows(pg, MODEL, SEED_TENANT, other, keys, _proof(other)).path == "upsert"


def test_a_copy_a_trigger_cut_short_fails_and_records_no_proof(pg):
    """A trigger the caller did not name (load_chunk names them: write_guards): the short COPY is not taken as
    landed."""
    source = inventory_rows(SEED_TENANT, 100)
    rows = _chunk_rows(source)
    _swallow(pg, source[10]["product_code"])
    with pytest.raises(sink.TargetRowsDifferError, match="1 of 100 rows in inventory_movements"):
        with pg.transaction():
            sink.land_rows(pg, MODEL, SEED_TENANT, rows, proof=_proof(rows))
    assert pg.execute("SELECT count(*) FROM backfill_range_proofs").fetchone() == (0,)
    assert pg.execute("SELECT count(*) FROM inventory_movements").fetchone() == (0,)


def test_the_digest_is_of_the_values_not_of_the_batching():
    source = inventory_rows(SEED_TENANT, 500)
    whole = pa.Table.from_pylist(source, schema=ARROW_SCHEMA)
    batched = pa.Table.from_batches(whole.to_batches(max_chunksize=77))
    with_offsets = _chunk_rows(source)

    assert range_proofs.digest(MODEL, whole) == range_proofs.digest(MODEL, batched)
    assert range_proofs.digest(MODEL, whole) == range_proofs.digest(MODEL, with_offsets)  # offsets are not content
    assert range_proofs.digest(MODEL, whole.slice(1)) == range_proofs.digest(MODEL, batched.slice(1))
    # a slice cut from a larger batch, against the same rows in buffers of their own
    cut = pa.Table.from_pylist(source[100:150], schema=ARROW_SCHEMA)
    assert range_proofs.digest(MODEL, whole.slice(100, 50)) == range_proofs.digest(MODEL, cut)
    assert range_proofs.digest(MODEL, batched.slice(100, 50)) == range_proofs.digest(MODEL, cut)

    def changed(i: int, **values) -> bytes:
        rows = [dict(r) for r in source]
        rows[i].update(values)
        return range_proofs.digest(MODEL, pa.Table.from_pylist(rows, schema=ARROW_SCHEMA))

    base = range_proofs.digest(MODEL, whole)
    assert changed(3, updated_at=source[3]["updated_at"] + timedelta(microseconds=1)) != base
    assert changed(4, movement_type=None) != changed(4, movement_type="")
    assert changed(5, quantity=source[5]["quantity"] + Decimal("0.0001")) != base


def _paths(pg) -> set[str]:
    return {p for c in chunks(pg, jobs(pg)[-1]["id"]) for p in (c["write_path"] or "").split("+")}


def test_a_proof_is_used_only_on_the_cluster_and_within_the_id_epoch_that_took_it(pg, bq, backfill_dag):
    """After a move to another cluster (another system identifier), or with its 32-bit row versions aged past
    MAX_XID_AGE, or stamped later than now (a restore into a cluster whose ids are behind), a proof is not used:
    the slice is compared row for row instead. The chunk key proofs finalize uses are stamped the same way."""
    create_source(bq, inventory_rows(SEED_TENANT, 600))
    assert backfill_dag.test(run_conf=conf()).state == "success"
    assert backfill_dag.test(run_conf=conf()).state == "success"
    assert _paths(pg) == {"proven"}
    stamped = pg.execute("SELECT key_proof->'epoch' FROM backfill_chunks WHERE key_proof IS NOT NULL LIMIT 1")
    epoch = stamped.fetchone()[0]
    assert range_proofs.trusted(pg, epoch)
    assert not range_proofs.trusted(pg, {**epoch, "system": epoch["system"] + 1})
    assert not range_proofs.trusted(pg, {**epoch, "xid": epoch["xid"] - range_proofs.MAX_XID_AGE})
    assert not range_proofs.trusted(pg, {**epoch, "xid": epoch["xid"] + 1_000_000})
    for change in (
        "system_identifier = system_identifier + 1",
        f"recorded_xid = recorded_xid - {range_proofs.MAX_XID_AGE}",
        "recorded_xid = recorded_xid + 1000000",
    ):
        pg.execute(f"UPDATE backfill_range_proofs SET {change}")  # noqa: S608
        versions = pg.execute("SELECT xmin::text FROM inventory_movements ORDER BY ctid").fetchall()
        assert backfill_dag.test(run_conf=conf()).state == "success"
        assert _paths(pg) == {"unchanged"}, change  # compared instead; nothing rewritten either way
        assert pg.execute("SELECT xmin::text FROM inventory_movements ORDER BY ctid").fetchall() == versions

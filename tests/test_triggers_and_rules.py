"""A user trigger or rule on the target: every write path gives the plain upsert's result, or the chunk fails naming
the trigger; a run never ends `success` with target values that differ from the snapshot.

Each kind on a cold load (empty key range), a re-run (the rows already there, the trigger added since) and a load
after source changes, at the chunk's own level (its transaction, write_guards, land_rows); then whole runs."""

from __future__ import annotations

import re

import pytest
from helpers import INVENTORY, chunks, conf, jobs, table_state
from test_reconciliation import _swallow
from test_write_paths import _chunk_rows

from bq_backfill import ledger, range_proofs, sink, target_checks
from devtools.seed import SEED_TENANT, as_tuples, create_source, insert_target, inventory_rows, target_rows

MODEL = INVENTORY


def _stamp(pg) -> None:
    """The common audit trigger: every written row gets a value the source does not have."""
    pg.execute(
        "CREATE FUNCTION stamp() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "NEW.movement_type := 'audited'; RETURN NEW; END $$"
    )
    pg.execute(
        "CREATE TRIGGER stamp BEFORE INSERT OR UPDATE ON inventory_movements FOR EACH ROW EXECUTE FUNCTION stamp()"
    )


def _swallow_updates_too(pg, product_code: str) -> None:
    _swallow(pg, product_code)
    pg.execute(
        "CREATE TRIGGER swallow_update BEFORE UPDATE ON inventory_movements FOR EACH ROW "
        f"EXECUTE FUNCTION swallow('{product_code}')"
    )


def _rule(pg) -> None:
    pg.execute("CREATE TABLE movement_log (product_code text)")
    pg.execute(
        "CREATE RULE log_movements AS ON INSERT TO inventory_movements "
        "DO ALSO INSERT INTO movement_log VALUES (NEW.product_code)"
    )


def _land(pg, rows):
    """One chunk's write, as load_chunk does it: guards, then the slice with its proof key."""
    table = _chunk_rows(rows)
    proof = range_proofs.ProofKey(SEED_TENANT, "inventory", range_proofs.digest(MODEL, table), "0" * 32)
    with pg.transaction():
        triggers = target_checks.write_guards(pg, MODEL, ledger.LEDGER_TABLES)
        return sink.land_rows(pg, MODEL, SEED_TENANT, table, proof=proof, triggers=triggers)


KINDS = {
    "value-changing trigger": (_stamp, "trigger(s) stamp on inventory_movements changed or skipped them"),
    "row-swallowing trigger": (
        lambda pg: _swallow_updates_too(pg, "P0000010"),
        "trigger(s) swallow, swallow_update on inventory_movements changed or skipped them",
    ),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_trigger_that_changes_or_skips_rows_fails_the_chunk_on_every_path(pg, kind):
    ledger.apply_schema(pg)
    add, message = KINDS[kind]
    source = inventory_rows(SEED_TENANT, 200)
    add(pg)

    with pytest.raises(sink.TargetRowsDifferError, match="rows in inventory_movements do not hold") as cold:
        _land(pg, source)  # cold: the key range is empty
    assert message in str(cold.value) and "DISABLE TRIGGER" in str(cold.value)
    assert pg.execute("SELECT count(*) FROM inventory_movements").fetchone() == (0,)  # nothing half-written
    assert pg.execute("SELECT count(*) FROM backfill_range_proofs").fetchone() == (0,)

    pg.execute("ALTER TABLE inventory_movements DISABLE TRIGGER USER")
    assert _land(pg, source).path == "copy"  # landed while the triggers are off
    pg.execute("ALTER TABLE inventory_movements ENABLE TRIGGER USER")
    before = table_state(pg, "inventory_movements")
    rerun = _land(pg, source)  # re-run: every row already there, nothing to write, nothing fires
    assert rerun.path in ("proven", "unchanged") and rerun.unchanged == 200
    assert table_state(pg, "inventory_movements") == before

    changed = [dict(r) for r in source]
    changed[10]["movement_type"] = "recount"  # P0000010: the swallowed product
    with pytest.raises(sink.TargetRowsDifferError, match=re.escape(message)):
        _land(pg, changed)  # after source changes: the upsert fires the trigger
    assert table_state(pg, "inventory_movements") == before


def test_a_trigger_that_leaves_the_models_values_alone_is_upserted_and_checked(pg):
    """An audit trigger that writes elsewhere: rows land by the (checked) upsert, never by the unchecked COPY."""
    ledger.apply_schema(pg)
    pg.execute("CREATE TABLE audit (n int)")
    pg.execute(
        "CREATE FUNCTION audit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "INSERT INTO audit VALUES (1); RETURN NEW; END $$"
    )
    pg.execute("CREATE TRIGGER audit AFTER INSERT ON inventory_movements FOR EACH ROW EXECUTE FUNCTION audit()")
    source = inventory_rows(SEED_TENANT, 200)

    landed = _land(pg, source)

    assert (landed.path, landed.inserted) == ("upsert", 200)
    assert target_rows(pg, SEED_TENANT) == as_tuples(source)
    assert _land(pg, source).path in ("proven", "unchanged")


def test_a_rule_is_refused_by_cleanup_and_by_a_chunk(pg):
    ledger.apply_schema(pg)
    source = inventory_rows(SEED_TENANT, 200)
    _land(pg, source[:100])
    _rule(pg)
    with (
        pg.transaction(),
        pytest.raises(target_checks.TargetRefusedError, match="has rules \\(log_movements\\)") as refused,
    ):
        target_checks.check_target(pg, MODEL, ledger.LEDGER_TABLES)
    assert "COPY ignores rules" in str(refused.value) and "DROP RULE" in str(refused.value)
    changed = [{**r, "movement_type": "recount"} for r in source[:100]]
    for rows in (source[100:], source[:100], changed):  # cold (an empty range), a re-run, after source changes
        with pytest.raises(target_checks.TargetRefusedError, match="has rules \\(log_movements\\)"):
            _land(pg, rows)
    assert pg.execute("SELECT count(*) FROM movement_log").fetchone() == (0,)
    assert target_rows(pg, SEED_TENANT) == as_tuples(source[:100])


def test_runs_on_a_target_with_a_trigger_or_a_rule_never_end_success_with_other_values(pg, bq, backfill_dag):
    source = inventory_rows(SEED_TENANT, 600)
    create_source(bq, source)
    ledger.apply_schema(pg)
    _stamp(pg)

    cold = backfill_dag.test(run_conf=conf())

    assert cold.state == "failed"
    [job] = jobs(pg)
    assert "trigger(s) stamp on inventory_movements changed or skipped them" in job["error_message"]
    assert {c["status"] for c in chunks(pg, job["id"])} == {"failed"}
    assert pg.execute("SELECT count(*) FROM inventory_movements").fetchone() == (0,)

    pg.execute("DROP TRIGGER stamp ON inventory_movements")
    insert_target(pg, source[:10])
    _rule(pg)
    refused = backfill_dag.test(run_conf=conf())  # a rule: refused before anything is read
    assert refused.state == "failed"
    assert {ti.task_id: ti.state for ti in refused.get_task_instances()}["cleanup_stale_jobs"] == "failed"
    assert target_rows(pg, SEED_TENANT) == as_tuples(source[:10])


def test_a_trigger_that_keeps_rows_delete_missing_deletes_fails_the_run_and_deletes_nothing(pg, bq, backfill_dag):
    source = inventory_rows(SEED_TENANT, 300)
    create_source(bq, source[:290])
    ledger.apply_schema(pg)
    insert_target(pg, source)  # 10 rows whose key is no longer in the source
    pg.execute("CREATE FUNCTION keep() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$")
    pg.execute("CREATE TRIGGER keep_rows BEFORE DELETE ON inventory_movements FOR EACH ROW EXECUTE FUNCTION keep()")

    dr = backfill_dag.test(run_conf=conf(delete_missing=True, max_deleted_rows=10))

    assert dr.state == "failed"
    [job] = jobs(pg)
    assert job["status"] == "failed"
    assert (
        "delete_missing deleted 0 of 10 target rows missing from the source; 10 are still in inventory_movements: "
        "trigger(s) keep_rows kept them"
    ) in job["error_message"]
    assert target_rows(pg, SEED_TENANT) == as_tuples(source)

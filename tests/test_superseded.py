"""A run never writes data older than what a later completed run of the same tenant+model wrote."""

from __future__ import annotations

from airflow_run import clear_with_downstream, drive
from helpers import conf, jobs, table_state
from test_resume import cure_poison, poison

from bq_backfill import ledger
from devtools.seed import SEED_TENANT, as_tuples, create_source, inventory_rows, target_rows


def _newer_values(bq, rows: list[dict]) -> list[dict]:
    """The source moves on: every quantity changes (an UPDATE, so time travel still reaches earlier states)."""
    bq.query("UPDATE `analytics.inventory_movements` SET quantity = quantity + 1000 WHERE TRUE").result()
    return [dict(r, quantity=r["quantity"] + 1000) for r in rows]


def test_clearing_a_failed_run_after_a_newer_run_completed_writes_no_old_data(pg, bq, backfill_dag):
    rows = inventory_rows(SEED_TENANT, 1_200)
    create_source(bq, rows)
    ledger.apply_schema(pg)
    poison(pg)
    run_a = backfill_dag.test(run_conf=conf())  # fails at chunk 3, its snapshot (old values) left in scratch
    assert run_a.state == "failed"
    cure_poison(pg)
    newer = _newer_values(bq, rows)
    run_b = backfill_dag.test(run_conf=conf())  # its cleanup deletes A's failed job
    assert run_b.state == "success"
    [job_b] = jobs(pg)
    b_as_of = pg.execute("SELECT snapshot_at FROM bigquery_backfill_jobs WHERE id = %s", (job_b["id"],)).fetchone()[0]

    # within the time-travel window, someone clears A's whole run
    clear_with_downstream(backfill_dag, run_a.run_id, ["cleanup_stale_jobs"], only_failed=False)
    run_a = drive(backfill_dag, run_a.run_id)

    assert target_rows(pg, SEED_TENANT) == as_tuples(newer)  # nothing older than B's data written over it
    a_job = pg.execute(
        "SELECT status, snapshot_at FROM bigquery_backfill_jobs WHERE dag_run_id = %s", (run_a.run_id,)
    ).fetchone()
    assert run_a.state == "success" and a_job[0] == "completed"
    assert a_job[1] > b_as_of  # A took a snapshot of its own, as of its clear, and recorded that time


def test_clearing_an_old_completed_run_after_a_newer_one_is_refused(pg, bq, backfill_dag, caplog):
    rows = inventory_rows(SEED_TENANT, 700)
    create_source(bq, rows)
    run_a = backfill_dag.test(run_conf=conf())
    assert run_a.state == "success"
    _newer_values(bq, rows)
    assert backfill_dag.test(run_conf=conf()).state == "success"
    ledger_before = table_state(pg, "bigquery_backfill_jobs")
    proofs_before = table_state(pg, "backfill_range_proofs")
    target_before = table_state(pg, "inventory_movements")

    clear_with_downstream(backfill_dag, run_a.run_id, ["cleanup_stale_jobs"], only_failed=False)
    run_a = drive(backfill_dag, run_a.run_id)

    assert run_a.state == "failed"
    assert "a newer run completed at" in caplog.text and "trigger a new run instead" in caplog.text
    assert [j["status"] for j in jobs(pg)] == ["completed", "completed"]
    assert table_state(pg, "bigquery_backfill_jobs") == ledger_before  # nothing claimed, nothing marked
    assert table_state(pg, "backfill_range_proofs") == proofs_before  # the newer run's proofs kept
    assert table_state(pg, "inventory_movements") == target_before

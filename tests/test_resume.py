"""A chunk that fails on purpose fails the run and the job; clearing it with downstream finishes the run."""

from __future__ import annotations

from airflow_run import clear_with_downstream, drive
from helpers import chunks, conf, jobs, table_state, ti_states
from psycopg import sql

from bq_backfill import ledger
from devtools.seed import SEED_TENANT, as_tuples, create_source, inventory_rows, target_rows

POISON = "P0000777"  # lands in chunk 3 of [0, 250), [250, 500), ... at chunk_size 250


def poison(pg, product_code: str = POISON) -> None:
    """A check constraint that refuses one product: the chunk holding it fails with a database error, every time
    (a constraint, not a trigger: the chunks around it take the paths they would without it)."""
    pg.execute(
        sql.SQL("ALTER TABLE inventory_movements ADD CONSTRAINT refuse_poison CHECK (product_code <> {})").format(
            sql.Literal(product_code)
        )
    )


def cure_poison(pg) -> None:
    pg.execute("ALTER TABLE inventory_movements DROP CONSTRAINT refuse_poison")


REFUSED = 'violates check constraint "refuse_poison"'


def _failed_run(pg, bq, backfill_dag):
    source = inventory_rows(SEED_TENANT, 1_200)
    create_source(bq, source)
    ledger.apply_schema(pg)
    poison(pg)
    dr = backfill_dag.test(run_conf=conf())
    return source, dr


def test_failed_chunk_fails_the_run_and_the_job(pg, bq, backfill_dag):
    _, dr = _failed_run(pg, bq, backfill_dag)

    assert dr.state == "failed"
    states = ti_states(dr)
    assert states[("load_chunk", 3)] == "failed"
    assert [i for (t, i), st in states.items() if t == "load_chunk" and st == "success"] == [0, 1, 2, 4]
    assert states[("finalize", -1)] == "failed"
    [job] = jobs(pg)
    assert job["status"] == "failed"
    assert "load_chunk[3]" in job["error_message"] and REFUSED in job["error_message"]
    assert [c["status"] for c in chunks(pg, job["id"])] == ["done", "done", "done", "failed", "done"]
    assert job["processed_records"] == 1_200 - 250  # the failed chunk left nothing behind
    assert pg.execute(
        "SELECT count(*) FROM inventory_movements WHERE product_code BETWEEN 'P0000750' AND 'P0000999'"
    ).fetchone() == (0,)
    # no range proof either: one per slice of the four chunks that committed, none for the one that rolled back
    assert pg.execute("SELECT count(*) FROM backfill_range_proofs").fetchone() == (4,)


def test_clearing_the_failed_chunk_with_downstream_resumes(pg, bq, backfill_dag):
    source, dr = _failed_run(pg, bq, backfill_dag)
    [job] = jobs(pg)
    finished_before = {c["chunk_index"]: c["completed_at"] for c in chunks(pg, job["id"]) if c["status"] == "done"}
    cure_poison(pg)

    cleared = clear_with_downstream(backfill_dag, dr.run_id, [("load_chunk", 3)])
    assert cleared == [("finalize", -1), ("load_chunk", 3)]
    dr = drive(backfill_dag, dr.run_id)

    assert dr.state == "success"
    [job_after] = jobs(pg)
    assert job_after["id"] == job["id"] and job_after["status"] == "completed"
    assert job_after["processed_records"] == job_after["total_records"] == 1_200
    after = {c["chunk_index"]: c["completed_at"] for c in chunks(pg, job["id"])}
    assert all(after[i] == finished_before[i] for i in finished_before)  # finished chunks not redone
    assert target_rows(pg, SEED_TENANT) == as_tuples(source)


def test_clearing_the_whole_run_reuses_the_job_and_skips_finished_chunks(pg, bq, backfill_dag):
    source, dr = _failed_run(pg, bq, backfill_dag)
    [job] = jobs(pg)
    finished_before = {c["chunk_index"]: c["completed_at"] for c in chunks(pg, job["id"]) if c["status"] == "done"}
    cure_poison(pg)

    # every task of the run, cleanup included, as "Clear" on the dag run does
    clear_with_downstream(backfill_dag, dr.run_id, ["cleanup_stale_jobs"], only_failed=False)
    dr = drive(backfill_dag, dr.run_id)

    assert dr.state == "success"
    [job_after] = jobs(pg)
    assert job_after["id"] == job["id"] and job_after["status"] == "completed"
    after = {c["chunk_index"]: c["completed_at"] for c in chunks(pg, job["id"])}
    assert all(after[i] == finished_before[i] for i in finished_before)
    ran = [ti.map_index for ti in dr.get_task_instances() if ti.task_id == "load_chunk" and ti.state == "success"]
    assert ran == [0]  # re-planned: only chunk 3 was left to do
    assert target_rows(pg, SEED_TENANT) == as_tuples(source)


def test_clearing_a_finished_run_changes_nothing(pg, bq, backfill_dag):
    source = inventory_rows(SEED_TENANT, 700)
    create_source(bq, source)
    dr = backfill_dag.test(run_conf=conf())
    assert dr.state == "success"
    [job] = jobs(pg)
    before = {c["chunk_index"]: c["completed_at"] for c in chunks(pg, job["id"])}
    rows_before = table_state(pg, "inventory_movements")

    clear_with_downstream(backfill_dag, dr.run_id, ["cleanup_stale_jobs"], only_failed=False)
    dr = drive(backfill_dag, dr.run_id)

    assert dr.state == "success"
    [again] = jobs(pg)  # the same job, completed again: no duplicate
    assert again["id"] == job["id"] and again["status"] == "completed" and again["processed_records"] == 700
    assert {c["chunk_index"]: c["completed_at"] for c in chunks(pg, job["id"])} == before  # nothing re-read
    assert table_state(pg, "inventory_movements") == rows_before  # nothing deleted or rewritten


def test_resuming_a_run_whose_snapshot_is_older_than_the_limit_is_refused_and_a_new_run_is_not(pg, bq, backfill_dag):
    """A run cleared a day and a half after its plan would write its day-old data over what changed since: refused
    by the chunk (clearing it) and by cleanup (clearing the whole run), naming the age; a new run completes."""
    source, dr = _failed_run(pg, bq, backfill_dag)
    assert len(jobs(pg)) == 1
    cure_poison(pg)
    pg.execute("UPDATE bigquery_backfill_jobs SET snapshot_at = snapshot_at - interval '36 hours'")
    rows_before = target_rows(pg, SEED_TENANT)

    clear_with_downstream(backfill_dag, dr.run_id, [("load_chunk", 3)])
    dr = drive(backfill_dag, dr.run_id)

    assert dr.state == "failed"
    [job_after] = jobs(pg)
    assert "36.0 hours ago, over max_snapshot_age_hours=24" in job_after["error_message"]
    assert "Trigger a new run" in job_after["error_message"]
    assert target_rows(pg, SEED_TENANT) == rows_before  # nothing written
    clear_with_downstream(backfill_dag, dr.run_id, ["cleanup_stale_jobs"], only_failed=False)
    assert drive(backfill_dag, dr.run_id).state == "failed"
    assert "over max_snapshot_age_hours=24" in jobs(pg)[0]["error_message"]

    assert backfill_dag.test(run_conf=conf(chunk_size=300)).state == "success"
    assert target_rows(pg, SEED_TENANT) == as_tuples(source)

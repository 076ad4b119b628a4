"""Cleanup deletes another run's job only when that run is over: Airflow's own run state and the chunks being written
right now decide, not how long ago the job last made progress."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime

import psycopg
from helpers import conf, jobs, table_state

from bq_backfill import ledger
from devtools.seed import SEED_TENANT, create_source, inventory_rows, legacy_jobs


def _other_job(pg, run_id: str, status: str) -> str:
    """A job of another dag run whose last progress was an hour ago (one slow chunk), with one chunk row."""
    job_id = str(uuid.uuid4())
    pg.execute(
        "INSERT INTO bigquery_backfill_jobs (id, tenant_id, model_type, status, dag_id, dag_run_id, total_records, "
        "updated_at) VALUES (%s, %s, 'inventory', %s, 'bigquery_backfill', %s, 600, now() - interval '1 hour')",
        (job_id, SEED_TENANT, status, run_id),
    )
    pg.execute(
        "INSERT INTO backfill_chunks (job_id, chunk_index, start_offset, end_offset) VALUES (%s, 0, 0, 600)", (job_id,)
    )
    return job_id


def _airflow_run(dag, run_id: str, state: str) -> None:
    """A dag run in Airflow's metadata database, as the scheduler would have it."""
    from airflow import settings
    from airflow.models.dagrun import DagRun

    now = datetime.now(UTC)
    with settings.Session() as session:
        session.add(
            DagRun(dag_id=dag.dag_id, run_id=run_id, run_type="manual", state=state, run_after=now, start_date=now)
        )
        session.commit()


def test_a_run_airflow_says_is_running_keeps_its_job_however_old_its_progress(pg, bq, backfill_dag, caplog):
    create_source(bq, inventory_rows(SEED_TENANT, 600))
    ledger.apply_schema(pg)
    assert backfill_dag.test(run_conf=conf(dry_run=True)).state == "success"  # the DAG is known to Airflow
    backfill_dag.params["dry_run"] = False  # dag.test keeps the last run's conf in the DAG object
    run_id = f"manual__slow_{uuid.uuid4().hex[:8]}"
    _airflow_run(backfill_dag, run_id, "running")
    _other_job(pg, run_id, "failed")  # failed by one chunk while its sibling chunks still run
    before = table_state(pg, "bigquery_backfill_jobs")

    dr = backfill_dag.test(run_conf=conf())

    assert dr.state == "failed"
    assert f"is being backfilled by dag run {run_id}" in caplog.text
    assert "Airflow says its run is still queued or running" in caplog.text
    assert table_state(pg, "bigquery_backfill_jobs") == before  # nothing deleted, nothing claimed


def test_a_job_whose_chunk_is_being_written_is_kept_and_deleted_once_it_is_not(pg, bq, backfill_dag, caplog):
    create_source(bq, inventory_rows(SEED_TENANT, 600))
    ledger.apply_schema(pg)
    job_id = _other_job(pg, "manual__elsewhere", "failed")  # a run this Airflow does not know, marked failed
    before = table_state(pg, "bigquery_backfill_jobs")
    locked, release = threading.Event(), threading.Event()

    def writing_chunk() -> None:  # a chunk of that job mid-transaction, as load_chunk holds it
        with psycopg.connect(pg.info.dsn) as conn:
            conn.execute("SELECT 1 FROM backfill_chunks WHERE job_id = %s FOR UPDATE", (job_id,))
            locked.set()
            release.wait(60)

    writer = threading.Thread(target=writing_chunk)
    writer.start()
    try:
        assert locked.wait(10)
        dr = backfill_dag.test(run_conf=conf())
    finally:
        release.set()
        writer.join()

    assert dr.state == "failed"
    assert "1 of its chunks being written right now" in caplog.text
    assert table_state(pg, "bigquery_backfill_jobs") == before
    # that chunk's session gone, the failed job of a run Airflow does not know is stale
    assert backfill_dag.test(run_conf=conf()).state == "success"
    assert [j["status"] for j in jobs(pg)] == ["completed"]


def test_a_legacy_job_the_old_loop_keeps_updating_is_kept_and_the_run_says_to_stop_the_loop(
    pg, bq, backfill_dag, caplog
):
    create_source(bq, inventory_rows(SEED_TENANT, 600))
    ledger.apply_schema(pg)
    [live] = legacy_jobs(pg, SEED_TENANT, "inventory", running=1, pending=0)
    legacy_jobs(pg, SEED_TENANT, "inventory", running=0, pending=3)  # its stale duplicates of two days ago
    stop = threading.Event()

    def old_loop() -> None:  # still running: it records progress on its job every 200 ms
        with psycopg.connect(pg.info.dsn, autocommit=True) as conn:
            while not stop.is_set():
                conn.execute(
                    "UPDATE bigquery_backfill_jobs SET updated_at = now(), processed_records = processed_records + 500 "
                    "WHERE id = %s",
                    [live],
                )
                stop.wait(0.2)

    loop = threading.Thread(target=old_loop)
    loop.start()
    try:
        dr = backfill_dag.test(run_conf=conf())
    finally:
        stop.set()
        loop.join()

    assert dr.state == "failed"
    assert f"job {live} of the old backfill loop (no dag run, running) changed at" in caplog.text
    assert "Stop the old loop first (README: Migrating from the old loop)" in caplog.text
    assert len(jobs(pg)) == 4  # nothing deleted, nothing claimed

    # stopped, and still for longer than the liveness window: its jobs are stale, and go
    pg.execute("UPDATE bigquery_backfill_jobs SET updated_at = now() - interval '1 hour' WHERE id = %s", [live])
    assert backfill_dag.test(run_conf=conf()).state == "success"
    assert [j["status"] for j in jobs(pg)] == ["completed"]


def test_the_old_loop_writing_during_a_run_fails_its_finalize(pg, bq, backfill_dag):
    """The old loop starts again after cleanup: it creates a job row on each continue, as it did 207 times."""
    create_source(bq, inventory_rows(SEED_TENANT, 600))
    ledger.apply_schema(pg)
    pg.execute(
        "CREATE FUNCTION old_loop_continues() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "IF NEW.chunk_index = 1 THEN INSERT INTO bigquery_backfill_jobs (tenant_id, model_type, status) "
        "SELECT tenant_id, model_type, 'failed' FROM bigquery_backfill_jobs WHERE id = NEW.job_id; END IF; "
        "RETURN NULL; END $$"
    )
    pg.execute(
        "CREATE TRIGGER old_loop_continues AFTER UPDATE OF status ON backfill_chunks FOR EACH ROW "
        "WHEN (NEW.status = 'done') EXECUTE FUNCTION old_loop_continues()"
    )

    dr = backfill_dag.test(run_conf=conf())

    assert dr.state == "failed"
    job = next(j for j in jobs(pg) if j["dag_run_id"] == dr.run_id)
    assert job["status"] == "failed"
    assert "the old backfill loop wrote while this run did" in job["error_message"]
    assert "Stop the old loop" in job["error_message"]

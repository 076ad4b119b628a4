"""Faults: the tool fails loudly, names what broke, and loses nothing."""

from __future__ import annotations

import itertools
import json
import threading

import psycopg
import pytest
from airflow_run import clear_with_downstream, drive
from helpers import chunks, conf, jobs, stall_first_write, table_state, wait_for_stalled_chunk
from test_resume import cure_poison, poison

from bq_backfill import ledger
from bq_backfill.setup import setup_database
from devtools import services
from devtools.seed import (
    PROJECT,
    SEED_TENANT,
    append_source,
    as_tuples,
    create_source,
    inventory_rows,
    inventory_schema,
    legacy_jobs,
    target_rows,
)
from devtools.tcp_proxy import FlakyProxy


def _stuck(pg, bq, n=600):
    rows = inventory_rows(SEED_TENANT, n)
    create_source(bq, rows)
    ledger.apply_schema(pg)
    legacy_jobs(pg, SEED_TENANT, "inventory", running=1, pending=5)
    return rows


@pytest.mark.parametrize(
    ("overrides", "env", "message"),
    [
        ({"postgres_conn_id": "no_such_pg"}, {}, "Postgres connection 'no_such_pg'"),
        ({"postgres_conn_id": "closed_pg"}, {"AIRFLOW_CONN_CLOSED_PG": "postgresql://postgres@127.0.0.1:1/x"},
         "cannot connect to Postgres connection 'closed_pg'"),
        ({"gcp_conn_id": "no_such_gcp"}, {}, "BigQuery connection 'no_such_gcp'"),
        ({"source_table": "analytics.nope"}, {}, "BigQuery source table backfill-test.analytics.nope not found"),
    ],
)  # fmt: skip
def test_a_missing_or_wrong_connection_fails_the_first_task_naming_it(
    pg, bq, backfill_dag, monkeypatch, capfd, overrides, env, message
):
    _stuck(pg, bq)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    before = table_state(pg, "bigquery_backfill_jobs")

    dr = backfill_dag.test(run_conf=conf(**overrides))

    assert dr.state == "failed"
    states = {ti.task_id: ti.state for ti in dr.get_task_instances()}
    assert states["cleanup_stale_jobs"] == "failed" and states["plan_chunks"] == "upstream_failed"
    assert message in "".join(capfd.readouterr())  # the task's error, as its log shows it
    assert table_state(pg, "bigquery_backfill_jobs") == before  # nothing deleted


def test_cleanup_refuses_to_delete_the_job_of_another_live_run(pg, bq, backfill_dag, caplog):
    _stuck(pg, bq)
    pg.execute(
        "INSERT INTO bigquery_backfill_jobs (tenant_id, model_type, status, dag_id, dag_run_id, total_records) "
        "VALUES (%s, 'inventory', 'running', 'bigquery_backfill', 'manual__other', 600)",
        (SEED_TENANT,),
    )
    before = table_state(pg, "bigquery_backfill_jobs")

    dr = backfill_dag.test(run_conf=conf())

    assert dr.state == "failed"
    assert "is being backfilled by dag run manual__other" in caplog.text
    assert table_state(pg, "bigquery_backfill_jobs") == before
    # the same job, abandoned (no progress for an hour), is stale: the next run cleans it up and succeeds
    pg.execute(
        "UPDATE bigquery_backfill_jobs SET updated_at = now() - interval '1 hour' WHERE dag_run_id = 'manual__other'"
    )
    assert backfill_dag.test(run_conf=conf()).state == "success"
    assert [j["status"] for j in jobs(pg)] == ["completed"]


def test_a_legacy_writer_cannot_add_a_second_active_job(pg, bq, backfill_dag):
    _stuck(pg, bq)
    poison(pg)
    backfill_dag.test(run_conf=conf())  # fails at the poisoned chunk; its cleanup removed the legacy duplicates
    setup_database(pg, None, False, inventory_schema)  # run again then, as README says: now it creates the index
    pg.execute("UPDATE bigquery_backfill_jobs SET status = 'running'")  # as while the run is active

    with pytest.raises(psycopg.errors.UniqueViolation, match="bigquery_backfill_jobs_one_active"):
        legacy_jobs(pg, SEED_TENANT, "inventory", running=0, pending=1)
    assert len(jobs(pg)) == 1


def _storage_behind(proxy_port: int, emulator: dict) -> str:
    conn = json.loads(services.gcp_connection(PROJECT, emulator))
    conn["extra"]["storage_read_endpoint"] = f"127.0.0.1:{proxy_port}"
    return json.dumps(conn)


def test_bigquery_down_for_a_while_is_retried_with_backoff(pg, bq, bq_emulator, backfill_dag, monkeypatch):
    rows = _stuck(pg, bq)
    host, port = bq_emulator["storage"].split(":")
    proxy = FlakyProxy((host, int(port)))
    monkeypatch.setenv("AIRFLOW_CONN_FLAKY_GCP", _storage_behind(proxy.port, bq_emulator))
    proxy.down.set()
    proxy.up_after(2.5)  # chunk reads fail for 2.5 s; task retries start at 1 s and double
    try:
        dr = backfill_dag.test(run_conf=conf(gcp_conn_id="flaky_gcp"))
    finally:
        proxy.close()

    assert dr.state == "success"
    assert proxy.refused > 0
    assert max(ti.try_number for ti in dr.get_task_instances() if ti.task_id == "load_chunk") > 1
    # each retry waited its backoff (1 s, then at least 2 s: Airflow's exponential retry_delay), measured between
    # one try's end and the next one's start
    for waited, least in _retry_waits(dr.run_id):
        assert waited >= least - 0.05, (waited, least)
    assert target_rows(pg, SEED_TENANT) == as_tuples(rows)
    [job] = jobs(pg)
    assert job["processed_records"] == job["total_records"] == 600


def _retry_waits(run_id: str) -> list[tuple[float, float]]:
    """(seconds between a load_chunk try's end and its next try's start, the least backoff for that retry)."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.taskinstancehistory import TaskInstanceHistory
    from airflow.utils.session import create_session

    with create_session() as session:
        tries = [(h.map_index, h.try_number, h.start_date, h.end_date) for h in session.query(TaskInstanceHistory)
                 .filter_by(run_id=run_id, task_id="load_chunk")]  # fmt: skip
        tries += [(t.map_index, t.try_number, t.start_date, t.end_date) for t in session.query(TaskInstance)
                  .filter_by(run_id=run_id, task_id="load_chunk")]  # fmt: skip
    waits = []
    for (index, number, _, ended), (index2, number2, started, _) in itertools.pairwise(sorted(tries)):
        if index == index2 and number2 == number + 1:
            waits.append(((started - ended).total_seconds(), 1.0 * 2 ** (number - 1)))
    assert waits, "no chunk was retried"
    return waits


def test_bigquery_down_for_good_fails_naming_bigquery_and_writes_nothing(
    pg, bq, bq_emulator, backfill_dag, monkeypatch, caplog
):
    _stuck(pg, bq)
    host, port = bq_emulator["storage"].split(":")
    proxy = FlakyProxy((host, int(port)))
    monkeypatch.setenv("AIRFLOW_CONN_FLAKY_GCP", _storage_behind(proxy.port, bq_emulator))
    proxy.down.set()
    try:
        dr = backfill_dag.test(run_conf=conf(gcp_conn_id="flaky_gcp"))
    finally:
        proxy.close()

    assert dr.state == "failed"
    [job] = jobs(pg)
    assert job["status"] == "failed"
    assert "BigQuery" in job["error_message"] and "flaky_gcp" in job["error_message"]
    assert all(c["status"] != "done" for c in chunks(pg, job["id"]))
    assert pg.execute("SELECT count(*) FROM inventory_movements").fetchone() == (0,)
    assert max(ti.try_number for ti in dr.get_task_instances() if ti.task_id == "load_chunk") == 4  # 1 + 3 retries


def test_postgres_connections_terminated_mid_chunk_are_retried(pg, bq, backfill_dag):
    rows = _stuck(pg, bq)
    stall_first_write(pg, "P0000300", seconds=60)  # inside the chunk's transaction
    terminated = []

    def terminator() -> None:
        with psycopg.connect(pg.info.dsn, autocommit=True) as admin:
            stalled = wait_for_stalled_chunk(admin, timeout=60)
            if stalled:
                terminated.append(admin.execute("SELECT pg_terminate_backend(%s)", (stalled[0],)).fetchone())

    watcher = threading.Thread(target=terminator)
    watcher.start()
    dr = backfill_dag.test(run_conf=conf())
    watcher.join()

    assert terminated, "the stalled chunk was never seen"
    assert dr.state == "success"
    assert target_rows(pg, SEED_TENANT) == as_tuples(rows)
    [job] = jobs(pg)
    assert job["processed_records"] == job["total_records"] == 600
    assert sum(c["rows_inserted"] for c in chunks(pg, job["id"])) == 600  # counted once, not per attempt


def test_source_changes_after_plan_do_not_move_rows_between_chunks(pg, bq, backfill_dag):
    rows = _stuck(pg, bq, n=1_200)
    poison(pg)  # the run stops at chunk 3 with the other chunks done
    dr = backfill_dag.test(run_conf=conf())
    assert dr.state == "failed"
    # the source moves on: rows inserted before, between and after the chunks, values updated
    changed = [dict(r, quantity=r["quantity"] + 1000) for r in rows[:50]]
    extra = inventory_rows(SEED_TENANT, 1_300)[1_200:]
    bq.query("DELETE FROM `analytics.inventory_movements` WHERE product_code < 'P0000050'").result()
    append_source(bq, changed + extra)
    cure_poison(pg)

    clear_with_downstream(backfill_dag, dr.run_id, [("load_chunk", 3)])
    dr = drive(backfill_dag, dr.run_id)

    assert dr.state == "success"
    assert target_rows(pg, SEED_TENANT) == as_tuples(rows)  # exactly the snapshot: nothing skipped or doubled
    [job] = jobs(pg)
    assert job["processed_records"] == job["total_records"] == 1_200


def test_a_row_deleted_after_its_chunk_landed_fails_finalize_with_the_count(pg, bq, backfill_dag):
    rows = _stuck(pg, bq)
    # someone else deletes two landed rows, committed with chunk 1 (the trigger runs in its transaction)
    pg.execute(
        "CREATE FUNCTION lose_rows() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "DELETE FROM inventory_movements WHERE product_code IN ('P0000300', 'P0000301'); RETURN NULL; END $$"
    )
    pg.execute(
        "CREATE TRIGGER lose_rows AFTER UPDATE OF status ON backfill_chunks FOR EACH ROW "
        "WHEN (NEW.status = 'done' AND NEW.chunk_index = 1) EXECUTE FUNCTION lose_rows()"
    )

    dr = backfill_dag.test(run_conf=conf())

    assert dr.state == "failed"
    [job] = jobs(pg)
    assert job["status"] == "failed"
    assert "2 source keys of the snapshot have no row in inventory_movements" in job["error_message"]
    assert len(target_rows(pg, SEED_TENANT)) == len(rows) - 2

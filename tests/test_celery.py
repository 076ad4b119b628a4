"""Under CeleryExecutor, as docker-compose.yaml's celery profile runs it: a real Redis broker (Debian's
redis-server on a free loopback port), two Celery workers, api-server + scheduler + dag-processor. A worker dies
(SIGKILL to its whole process group, as when its machine goes) while one of its tasks is writing a chunk: the
scheduler stops hearing the task's heartbeat, fails that try, and the retry runs on the other worker."""

from __future__ import annotations

import os
import time

import psycopg
import pytest
from helpers import chunks, conf, jobs, stall_first_write, wait_for_stalled_chunk

from bq_backfill import ledger
from devtools import services
from devtools.airflow_stack import airflow_stack
from devtools.seed import SEED_TENANT, as_tuples, create_source, inventory_rows, target_rows

DAG = "bigquery_backfill"
HEARTBEAT_TIMEOUT_S = 10  # production: [scheduler] task_instance_heartbeat_timeout, 300 s by default (docs/failures.md)


@pytest.fixture(scope="module")
def celery_stack(tmp_path_factory, bq_emulator, pg_admin):
    home = tmp_path_factory.mktemp("airflow-celery")
    with services.redis_server(home / "redis.log") as broker:
        env = {k: v for k, v in os.environ.items() if k.startswith("AIRFLOW_CONN_")}
        env.update(
            {
                "AIRFLOW__CELERY__BROKER_URL": broker,
                "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT_S),
                "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "2",
                "BACKFILL_CHUNK_RETRIES": "2",
                "BACKFILL_CHUNK_RETRY_DELAY_SECONDS": "1",
            }
        )
        meta_db = f"bq_backfill_airflow_celery_{os.getpid()}"
        with airflow_stack(home, services.free_port(), pg_admin, meta_db, env, celery_workers=2) as running:
            running.wait_for_dag(DAG)
            yield running


def test_a_celery_worker_killed_mid_chunk_is_recovered_by_a_retry_on_the_other_worker(pg, pg_server, bq, celery_stack):
    stack = celery_stack
    source = inventory_rows(SEED_TENANT, 3_000)
    create_source(bq, source)
    ledger.apply_schema(pg)
    stall_first_write(pg, "P0000777", seconds=8)  # chunk 1 of [0, 500), [500, 1000), ...: its first try sleeps
    run_id = stack.trigger(DAG, conf(chunk_size=500))
    watch = psycopg.connect(pg_server, autocommit=True)
    stalled = wait_for_stalled_chunk(watch, timeout=180)
    assert stalled, "the stalled chunk never showed up"
    backend, app = stalled
    task_pid = int(app.rsplit(" ", 1)[1])
    worker = stack.process_of(task_pid)
    assert worker in ("worker-1", "worker-2"), f"chunk task pid {task_pid} runs under {worker}"
    killed_at = time.monotonic()
    stack.kill(worker)  # the worker, its pool and the task process: nothing of it says goodbye

    assert stack.wait_run(DAG, run_id, timeout=300) == "success"
    recovered_s = time.monotonic() - killed_at
    tries = stack.api("GET", f"/dags/{DAG}/dagRuns/{run_id}/taskInstances/load_chunk/1")
    assert tries["try_number"] == 2 and tries["state"] == "success"  # the killed try, then the one that finished
    [job] = jobs(pg)
    assert job["status"] == "completed" and job["processed_records"] == job["total_records"] == 3_000
    assert all(c["status"] == "done" for c in chunks(pg, job["id"]))
    assert target_rows(pg, SEED_TENANT) == as_tuples(source)  # every row once
    assert pg.execute("SELECT count(*) FROM bigquery_backfill_jobs").fetchone()[0] == 1
    # the killed try's transaction was rolled back when Postgres found its client gone: its backend is gone too
    assert not watch.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (backend,)).fetchone()
    watch.close()
    print(f"recovered {recovered_s:.0f} s after the worker was killed (heartbeat timeout {HEARTBEAT_TIMEOUT_S} s)")

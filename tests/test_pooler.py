"""Through a connection pooler in transaction mode, as a hosted Postgres' pooled port is reached: Debian's PgBouncer
with two server connections, fewer than a run's chunks, so each server connection serves one task after another.
Behind it the embedded server (PostgreSQL 16), so the end-to-end core also runs on a second major version.

Slices of 25 rows make every chunk repeat its statements ten times: psycopg would prepare them on the server after
five, and the next task handed the same server connection would meet those prepared statements (it does: the cold
run fails with `prepared statement "_pg3_0" already exists` without the package's prepare_threshold = None).
"""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from airflow_run import clear_with_downstream, drive
from helpers import chunks, conf, jobs, table_state
from test_resume import REFUSED, cure_poison, poison

from bq_backfill.connections import postgres
from bq_backfill.errors import is_transient
from devtools.seed import SEED_TENANT, as_tuples, create_source, inventory_rows, target_rows

POOL_SIZE = 2
POOLED = "pooled_pg"


@pytest.fixture
def pooled_db(pooler, airflow_db, bq):
    """The pooled database, emptied, then set up by the setup DAG through the pooler (the inventory source in place:
    setup checks it); a direct connection to it."""
    from airflow.dag_processing.dagbag import DagBag
    from helpers import ROOT

    create_source(bq, inventory_rows(SEED_TENANT, 1))

    with psycopg.connect(pooler["direct"], autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        setup = DagBag(dag_folder=str(ROOT / "dags")).get_dag("bigquery_backfill_setup")
        assert setup.test(run_conf={"postgres_conn_id": POOLED}).state == "success"
        yield conn


def _transactions(pooler) -> int:
    """Transactions the pooler has served for the pooled database since it started (its totals are updated every
    stats_period, 1 s)."""
    time.sleep(1.5)
    with psycopg.connect(pooler["admin"], autocommit=True, prepare_threshold=None) as admin:
        cur = admin.execute("SHOW STATS")
        names = [d.name for d in cur.description]
        stats = [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
        return sum(int(s["total_xact_count"]) for s in stats if s["database"] == "backfill_pooled")


def test_the_pooled_server_is_another_major_than_the_suites(pooler, pg):
    """The end-to-end core runs on two majors: here (the embedded server) and everywhere else (the suite's)."""
    with psycopg.connect(pooler["direct"]) as conn:
        pooled = conn.info.server_version // 10_000
    assert pooled == 16
    assert pg.info.server_version // 10_000 != pooled, "the suite's server should be another major (15 here)"


def test_setup_cold_run_rerun_changes_and_deletions_through_a_transaction_pooler(
    pooler, pooled_db, bq, backfill_dag, monkeypatch
):
    monkeypatch.setenv("BACKFILL_SLICE_ROWS", "25")
    source = inventory_rows(SEED_TENANT, 1_100)
    create_source(bq, source)
    run = conf(postgres_conn_id=POOLED)
    served = _transactions(pooler)

    cold = backfill_dag.test(run_conf=run)

    assert cold.state == "success"
    assert target_rows(pooled_db, SEED_TENANT) == as_tuples(source)
    [job] = jobs(pooled_db)
    assert job["status"] == "completed" and job["processed_records"] == 1_100
    assert len(chunks(pooled_db, job["id"])) == 5 > POOL_SIZE
    # every task's transactions went through the pooler: one per chunk at least, and cleanup's, plan's, finalize's
    assert _transactions(pooler) - served >= 5 + 3

    before = table_state(pooled_db, "inventory_movements")
    assert backfill_dag.test(run_conf=run).state == "success"  # nothing changed
    assert table_state(pooled_db, "inventory_movements") == before  # not a row rewritten
    _, job = jobs(pooled_db)
    assert {c["write_path"] for c in chunks(pooled_db, job["id"])} == {"proven"}

    changed = [dict(r) for r in source[:1_000]]  # 100 rows gone from the source, 10 changed
    for r in changed[::100]:
        r["movement_type"] = "recount"
    create_source(bq, changed)
    assert backfill_dag.test(
        run_conf=conf(postgres_conn_id=POOLED, delete_missing=True, max_deleted_rows=100)
    ).state == ("success")
    assert target_rows(pooled_db, SEED_TENANT) == as_tuples(changed)
    *_, job = jobs(pooled_db)
    done = chunks(pooled_db, job["id"])
    assert sum(c["rows_updated"] for c in done) == 10
    assert pooled_db.execute(
        "SELECT deleted_records FROM bigquery_backfill_jobs WHERE id = %s", [job["id"]]
    ).fetchone() == (100,)


def test_a_failed_chunk_cleared_resumes_through_the_pooler_and_a_lost_server_connection_is_retried(
    pooler, pooled_db, bq, backfill_dag, monkeypatch
):
    monkeypatch.setenv("BACKFILL_SLICE_ROWS", "25")
    source = inventory_rows(SEED_TENANT, 1_200)
    create_source(bq, source)
    poison(pooled_db)
    run = conf(postgres_conn_id=POOLED)

    dr = backfill_dag.test(run_conf=run)

    assert dr.state == "failed"
    [job] = jobs(pooled_db)
    assert "load_chunk[3]" in job["error_message"] and REFUSED in job["error_message"]
    cure_poison(pooled_db)
    # the resumed chunk's server connection is cut once while it writes: the pooler's error is retried
    killed = []

    def cut_the_chunk_once():
        with psycopg.connect(pooler["direct"], autocommit=True) as watch:
            for _ in range(2_000):
                row = watch.execute(
                    "SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'bigquery_backfill chunk 3 %%'"
                ).fetchone()
                if row:
                    killed.append(watch.execute("SELECT pg_terminate_backend(%s)", row).fetchone()[0])
                    return
                threading.Event().wait(0.01)

    watcher = threading.Thread(target=cut_the_chunk_once)
    watcher.start()
    clear_with_downstream(backfill_dag, dr.run_id, [("load_chunk", 3)])
    dr = drive(backfill_dag, dr.run_id)
    watcher.join()

    assert killed == [True]
    assert dr.state == "success"
    tries = {(ti.task_id, ti.map_index): ti.try_number for ti in dr.get_task_instances()}
    assert tries[("load_chunk", 3)] == 3  # failed, cleared and cut once, then retried
    assert target_rows(pooled_db, SEED_TENANT) == as_tuples(source)
    [job_after] = jobs(pooled_db)
    assert job_after["id"] == job["id"] and job_after["status"] == "completed"


def test_the_pooler_errors_are_transient(pooler, pooled_db):
    """What PgBouncer answers when its pool is busy, its server connection is lost or it takes no more clients."""
    admin = psycopg.connect(pooler["admin"], autocommit=True, prepare_threshold=None)
    holders = [psycopg.connect(pooler["dsn"], prepare_threshold=None) for _ in range(POOL_SIZE)]
    try:
        admin.execute("SET query_wait_timeout = 1")
        for holder in holders:  # every server connection inside an open transaction
            holder.execute("SELECT 1")
        with pytest.raises(psycopg.OperationalError, match="query_wait_timeout") as waited:
            with postgres(POOLED):
                pass
        assert is_transient(waited.value)
        for holder in holders:
            holder.rollback()

        with pytest.raises(psycopg.OperationalError) as lost:
            with postgres(POOLED) as conn:
                pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
                pooled_db.execute("SELECT pg_terminate_backend(%s)", [pid])
                conn.execute("SELECT 1")
        assert is_transient(lost.value)

        admin.execute("SET max_client_conn = 1")  # the admin console's own connection is the one
        with pytest.raises(ConnectionError, match="no more connections allowed") as full:
            with postgres(POOLED):
                pass
        assert is_transient(full.value)
    finally:
        admin.execute("SET max_client_conn = 200")
        admin.execute("SET query_wait_timeout = 120")
        for holder in holders:
            holder.close()
        admin.close()


def test_a_server_connection_cut_under_any_statement_is_transient(pooler, pooled_db):
    """Cut behind PgBouncer, a session's last statement can fail as a driver InternalError ("received 2 results from
    command 'SAVEPOINT'") or a protocol violation, not only as a lost connection: every such failure of a
    connection of the package's is one to retry, since the session, not the statement, is what went."""
    from collections import Counter

    seen: Counter = Counter()
    for round_ in range(60):

        def cut(delay: float = 0.002 + (round_ % 10) * 0.001) -> None:
            time.sleep(delay)
            with psycopg.connect(pooler["direct"], autocommit=True) as watch:
                watch.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
                )

        cutter = threading.Thread(target=cut)
        try:
            with postgres(POOLED) as conn:
                cutter.start()
                for _ in range(5_000):
                    with conn.transaction():  # a savepoint, as each slice's COPY into an empty range takes
                        conn.execute("SELECT 1")
            seen["finished"] += 1
        except Exception as exc:
            assert is_transient(exc), f"{type(exc).__name__} (from {type(exc.__cause__).__name__}): {exc}"
            seen[type(exc.__cause__ or exc).__name__] += 1
        finally:
            if cutter.is_alive() or cutter.ident:
                cutter.join()
    assert sum(n for kind, n in seen.items() if kind != "finished") >= 30, seen

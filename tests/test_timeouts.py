"""Every wait is bounded: a chunk behind another session's lock fails after the lock timeout, as transient, and its
retry succeeds once the lock is gone. Nothing of the timed-out attempt is left behind."""

from __future__ import annotations

import threading
import time

import psycopg
from helpers import chunks, conf, jobs, wait_for_chunk_session

from bq_backfill import ledger
from devtools.seed import SEED_TENANT, as_tuples, create_source, inventory_rows, target_rows


def _blocked_chunk(admin: psycopg.Connection, timeout: float = 60) -> str | None:
    """application_name of a chunk session waiting on a lock, once one is."""
    found = wait_for_chunk_session(admin, "wait_event_type = 'Lock'", timeout)
    return found[1] if found else None


def _hold(dsn: str, grab, seen: list, ready: threading.Event) -> None:
    """Holds what `grab` locks until a chunk has waited on it longer than the lock timeout (1 s), then lets go."""
    with psycopg.connect(dsn) as holder, psycopg.connect(dsn, autocommit=True) as admin:
        grab(holder)
        ready.set()
        seen.append(_blocked_chunk(admin))
        time.sleep(2)
        holder.rollback()


def _run_with(pg, bq, backfill_dag, monkeypatch, grab, *, hold_before_run: bool):
    monkeypatch.setenv("BACKFILL_PG_LOCK_TIMEOUT_SECONDS", "1")
    rows = inventory_rows(SEED_TENANT, 600)
    create_source(bq, rows)
    ledger.apply_schema(pg)
    seen: list = []
    ready = threading.Event()
    holder = threading.Thread(target=_hold, args=(pg.info.dsn, grab, seen, ready))
    holder.start()
    if hold_before_run:
        assert ready.wait(60)
    try:
        dr = backfill_dag.test(run_conf=conf())
    finally:
        holder.join()
    return rows, dr, seen


def test_a_chunk_behind_a_leftover_session_holding_its_row_times_out_and_is_retried(pg, bq, backfill_dag, monkeypatch):
    def lock_chunk_rows(holder: psycopg.Connection) -> None:
        # as the open transaction of a killed attempt would: every chunk row of the run, once plan wrote them
        deadline = time.monotonic() + 60
        while not holder.execute("SELECT 1 FROM backfill_chunks FOR UPDATE").fetchall():
            holder.rollback()
            assert time.monotonic() < deadline, "plan never wrote the chunk rows"
            time.sleep(0.005)

    # starts holding once the chunk rows exist, which happens inside the run
    rows, dr, seen = _run_with(pg, bq, backfill_dag, monkeypatch, lock_chunk_rows, hold_before_run=False)

    assert seen[0] and seen[0].startswith("bigquery_backfill chunk"), "no chunk ever waited on the lock"
    assert dr.state == "success"
    assert max(ti.try_number for ti in dr.get_task_instances() if ti.task_id == "load_chunk") > 1
    assert target_rows(pg, SEED_TENANT) == as_tuples(rows)
    [job] = jobs(pg)
    assert job["processed_records"] == 600 and sum(c["rows_inserted"] for c in chunks(pg, job["id"])) == 600


def test_a_copy_behind_another_sessions_uncommitted_key_times_out_and_is_retried(pg, bq, backfill_dag, monkeypatch):
    target = inventory_rows(SEED_TENANT, 600)[300]  # in chunk 1

    def insert_uncommitted(holder: psycopg.Connection) -> None:
        holder.execute(
            "INSERT INTO inventory_movements VALUES (%(tenant_id)s, %(movement_date)s, %(branch_id)s, "
            "%(product_code)s, %(quantity)s, %(unit_cost)s, %(movement_type)s, %(updated_at)s)",
            target,
        )

    rows, dr, seen = _run_with(pg, bq, backfill_dag, monkeypatch, insert_uncommitted, hold_before_run=True)

    assert seen[0] and seen[0].startswith("bigquery_backfill chunk 1 "), seen
    assert dr.state == "success"
    tries = {ti.map_index: ti.try_number for ti in dr.get_task_instances() if ti.task_id == "load_chunk"}
    assert tries[1] > 1 and tries[0] == tries[2] == 1
    assert target_rows(pg, SEED_TENANT) == as_tuples(rows)
    [job] = jobs(pg)
    assert job["status"] == "completed" and job["processed_records"] == 600


def test_every_transaction_sets_its_timeouts_and_keepalives(pg_server, monkeypatch):
    from bq_backfill.connections import postgres

    monkeypatch.setenv("BACKFILL_PG_STATEMENT_TIMEOUT_SECONDS", "42")
    with postgres("postgres_default") as conn:
        shown = {
            name: conn.execute(f"SHOW {name}").fetchone()[0]
            for name in ("statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout",
                         "tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count")
        }  # fmt: skip
    assert shown == {
        "statement_timeout": "42s",
        "lock_timeout": "2min",
        "idle_in_transaction_session_timeout": "10min",
        "tcp_keepalives_idle": "30",
        "tcp_keepalives_interval": "10",
        "tcp_keepalives_count": "3",
    }

"""What the Backfills page shows: the latest jobs from the ledger, with progress, rate and ETA."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from psycopg.rows import dict_row

from bq_backfill.sqlfiles import sql_text

ACTIVE = ("pending", "running")
MAX_JOBS = 100


MAX_RUNS = 10


def latest_jobs(
    conn: Any,
    tenant_id: str | None = None,
    limit: int = 50,
    *,
    dag_id: str = "bigquery_backfill",
    dag_run_id: str | None = None,
    status: str | None = None,
) -> list[dict[str, Any]]:
    """The latest `limit` jobs (at most MAX_JOBS), newest first, as the page shows them: of one tenant, one dag run
    (a fleet's tenants), one status, if asked."""
    limit = max(1, min(int(limit), MAX_JOBS))
    params = {"tenant_id": tenant_id, "limit": limit, "dag_id": dag_id, "dag_run_id": dag_run_id, "status": status}
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(sql_text("ui_jobs.sql"), params)
        rows = cur.fetchall()
    now = datetime.now(UTC)
    return [_shown(row, now) for row in rows]


def latest_runs(conn: Any, dag_id: str = "bigquery_backfill", limit: int = MAX_RUNS) -> list[dict[str, Any]]:
    """The latest dag runs, newest first, each with its tenants counted by status (done, running, failed,
    pending), its rows done of its total, rows/s and ETA for the whole fleet."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(sql_text("ui_runs.sql"), {"dag_id": dag_id, "limit": max(1, min(int(limit), MAX_RUNS))})
        rows = cur.fetchall()
    now = datetime.now(UTC)
    shown = []
    for row in rows:
        status = "running" if row["running"] or row["pending"] else "failed" if row["failed"] else "completed"
        ended = None if status == "running" else row["completed_at"]  # a fleet's rate runs until its last tenant
        shown.append(_shown({**row, "status": status, "completed_at": ended}, now))
    return shown


def _shown(row: dict[str, Any], now: datetime) -> dict[str, Any]:
    started, total, done = row["started_at"], row["total_records"], row["processed_records"] or 0
    until = row["completed_at"] or (now if row["status"] in ACTIVE else row["updated_at"])
    seconds = (until - started).total_seconds() if started and until else None
    rate = done / seconds if seconds and seconds > 0 and done else None
    eta = None
    if row["status"] in ACTIVE and rate and total is not None:
        eta = max(0.0, (total - done) / rate)
    out = {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in row.items()}
    out.update(
        rows_per_second=round(rate) if rate else None,
        eta_seconds=round(eta) if eta is not None else None,
        percent=round(100 * done / total, 1) if total else (100.0 if row["status"] == "completed" else None),
        active=row["status"] in ACTIVE,
        paths=row.get("paths") or [],
        reasons=row.get("reasons") or [],
    )
    return out

"""The backfill ledger in Postgres: bigquery_backfill_jobs, backfill_source_progress, backfill_chunks.

Every function takes an open psycopg 3 connection and leaves transaction control to the caller, so that a
chunk's rows and its progress commit together.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

from bq_backfill.sqlfiles import sql_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunKey:
    """Identifies the dag run a job belongs to."""

    dag_id: str
    run_id: str

    def params(self) -> dict[str, str]:
        return {"dag_id": self.dag_id, "dag_run_id": self.run_id}


@dataclass(frozen=True)
class Job:
    id: str
    total_records: int
    chunk_size: int
    source_table: str
    snapshot_table: str
    snapshot_at: datetime


def _one(conn: psycopg.Connection, name: str, params: dict[str, Any]) -> dict[str, Any] | None:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(sql_text(name), params)
        return cur.fetchone()


def _all(conn: psycopg.Connection, name: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(sql_text(name), params)
        return cur.fetchall()


def apply_schema(conn: psycopg.Connection) -> None:
    conn.execute(sql_text("schema.sql"))


class ActiveRunError(RuntimeError):
    """Another dag run is actively working on the same tenant+model."""


# A job of another run that made progress this recently is alive; older ones are abandoned (a crashed worker).
LIVE_JOB_SECONDS = 15 * 60


def delete_stale_jobs(conn: psycopg.Connection, run: RunKey, tenant_id: str, model_type: str) -> dict[str, int]:
    live = _all(
        conn,
        "live_jobs_of_other_runs.sql",
        {"tenant_id": tenant_id, "model_type": model_type, "live_seconds": LIVE_JOB_SECONDS, **run.params()},
    )
    if live:
        other = live[0]
        raise ActiveRunError(
            f"tenant {tenant_id} model {model_type!r} is being backfilled by dag run {other['dag_run_id']} "
            f"(job {other['id']}, {other['status']}, last progress {other['updated_at']:%Y-%m-%d %H:%M:%S%z}); "
            "nothing deleted. Wait for that run to end, or mark it failed, then trigger again."
        )
    row = _one(conn, "cleanup_stale_jobs.sql", {"tenant_id": tenant_id, "model_type": model_type, **run.params()})
    assert row is not None
    return {k: int(v) for k, v in row.items()}


def ensure_active_job_index(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """Creates the one-active-job index; returns the tenant+model pairs whose duplicates still block it."""
    try:
        with conn.transaction():  # a savepoint: a failed CREATE INDEX must not undo the cleanup
            conn.execute(sql_text("ensure_active_job_index.sql"))
        return []
    except psycopg.errors.UniqueViolation:
        return _all(conn, "duplicate_active_jobs.sql", {})


def claim_job(
    conn: psycopg.Connection,
    run: RunKey,
    *,
    tenant_id: str,
    model_type: str,
    total_records: int,
    chunk_size: int,
    source_table: str,
    snapshot_table: str,
    snapshot_at: datetime,
) -> tuple[Job, bool]:
    """Creates the run's job row or takes the existing one back. Returns (job, created)."""
    try:
        row = _one(
            conn,
            "claim_job.sql",
            {
                "tenant_id": tenant_id,
                "model_type": model_type,
                "total_records": total_records,
                "chunk_size": chunk_size,
                "source_table": source_table,
                "snapshot_table": snapshot_table,
                "snapshot_at": snapshot_at,
                **run.params(),
            },
        )
    except psycopg.errors.UniqueViolation as exc:
        raise RuntimeError(
            f"another pending/running backfill job exists for tenant {tenant_id} model {model_type!r} "
            f"(created after cleanup, by another writer); refusing to create a second one: {exc.diag.message_detail}"
        ) from exc
    assert row is not None
    return _job(row), bool(row["created"])


def find_run_job(conn: psycopg.Connection, run: RunKey) -> Job | None:
    row = _one(conn, "find_run_job.sql", run.params())
    return _job(row) if row else None


def _job(row: dict[str, Any]) -> Job:
    return Job(
        id=str(row["id"]),
        total_records=int(row["total_records"]),
        chunk_size=int(row["chunk_size"]),
        source_table=row["source_table"],
        snapshot_table=row["snapshot_table"],
        snapshot_at=row["snapshot_at"],
    )


def plan_chunks(conn: psycopg.Connection, job: Job) -> list[dict[str, int]]:
    """Writes the job's chunk rows (once) and returns those not done yet, in order."""
    chunk_count = -(-job.total_records // job.chunk_size)
    conn.execute(
        sql_text("plan_chunk_rows.sql"),
        {"job_id": job.id, "chunk_size": job.chunk_size, "total": job.total_records, "chunk_count": chunk_count},
    )
    conn.execute(sql_text("ensure_progress_row.sql"), {"job_id": job.id, "source_table": job.source_table})
    return [
        {"chunk_index": r["chunk_index"], "start": r["start_offset"], "end": r["end_offset"]}
        for r in _all(conn, "pending_chunks.sql", {"job_id": job.id})
    ]


def lock_chunk(conn: psycopg.Connection, job_id: str, chunk_index: int) -> str | None:
    row = _one(conn, "lock_chunk.sql", {"job_id": job_id, "chunk_index": chunk_index})
    return row["status"] if row else None


def complete_chunk(
    conn: psycopg.Connection, job_id: str, chunk_index: int, counts: dict[str, float], write_path: str
) -> dict[str, int]:
    params = {"job_id": job_id, "chunk_index": chunk_index, "write_path": write_path, **counts}
    row = _one(conn, "complete_chunk.sql", params)
    if row is None:
        raise RuntimeError(f"chunk {chunk_index} of job {job_id} was not pending when it completed")
    conn.execute(sql_text("update_progress.sql"), {"job_id": job_id, "read": counts["read"]})
    return row


def chunk_totals(conn: psycopg.Connection, job_id: str) -> dict[str, int]:
    row = _one(conn, "chunk_totals.sql", {"job_id": job_id})
    assert row is not None
    return {k: int(v) for k, v in row.items()}


def unfinished_chunks(conn: psycopg.Connection, job_id: str) -> list[dict[str, Any]]:
    return _all(conn, "unfinished_chunks.sql", {"job_id": job_id})


def complete_job(conn: psycopg.Connection, job_id: str) -> None:
    conn.execute(sql_text("complete_job.sql"), {"job_id": job_id})


def fail_job(conn: psycopg.Connection, run: RunKey, error_message: str, chunk_index: int = -1) -> None:
    conn.execute(
        sql_text("fail_job.sql"), {"error_message": error_message[:4000], "chunk_index": chunk_index, **run.params()}
    )


def find_job_by_id(conn: psycopg.Connection, job_id: str) -> Job:
    row = _one(conn, "find_job.sql", {"job_id": job_id})
    if row is None:
        raise LookupError(f"backfill job {job_id} no longer exists (deleted by a later cleanup?)")
    return _job(row)

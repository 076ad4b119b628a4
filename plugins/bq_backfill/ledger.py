"""The backfill ledger in Postgres: bigquery_backfill_jobs, backfill_source_progress, backfill_chunks.

Every function takes an open psycopg 3 connection and leaves transaction control to the caller, so that a
chunk's rows and its progress commit together.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from bq_backfill.models import Declaration, Model, ModelMismatchError
from bq_backfill.sqlfiles import sql_text

log = logging.getLogger(__name__)


LEDGER_TABLES = (
    "bigquery_backfill_jobs",
    "backfill_source_progress",
    "backfill_chunks",
    "backfill_quarantine",
    "backfill_range_proofs",
)


@dataclass(frozen=True)
class RunKey:
    """Identifies the dag run a job belongs to."""

    dag_id: str
    run_id: str

    def params(self) -> dict[str, str]:
        return {"dag_id": self.dag_id, "dag_run_id": self.run_id}


@dataclass(frozen=True)
class Job:
    """A run's job row: one per tenant of the run's fleet. The snapshot fields are None until plan_chunks has taken
    the snapshot; the tenant's rows in it are offsets [snapshot_offset, snapshot_offset + total_records)."""

    id: str
    tenant_id: str
    status: str
    total_records: int | None
    chunk_size: int | None
    source_table: str | None
    snapshot_table: str | None
    snapshot_at: datetime | None
    error_message: str | None = None
    target_snapshot: str | None = None  # Postgres's pg_current_snapshot() as the plan fixed the as-of time
    model_columns: list[list[str]] | None = None  # the model's columns as cleanup resolved them (Model.as_record)
    snapshot_offset: int = 0


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


def missing_schema(conn: psycopg.Connection, model: Declaration) -> list[str]:
    """What a run needs that the catalog does not have: ledger columns and indexes, the model's target table, its
    key columns and a unique index on exactly its conflict key. Empty when the setup step has run."""
    missing = [f"{m['kind']} {m['table_name']}.{m['name']}" for m in _all(conn, "schema_missing.sql", {})]
    return missing + missing_target(conn, model)


def missing_target(conn: psycopg.Connection, model: Declaration) -> list[str]:
    """What the model's target table lacks: the table itself, its key columns, a unique index on exactly its
    conflict key (what ON CONFLICT needs)."""
    shape = _all(conn, "target_shape.sql", {"target_table": model.target_table})
    columns = {r["name"] for r in shape if r["kind"] == "column"}
    if not columns:
        return [f"table {model.target_table}"]
    missing = [f"column {model.target_table}.{c}" for c in model.conflict_key if c not in columns]
    if sorted(model.conflict_key) not in [r["key_columns"] for r in shape if r["kind"] == "unique"]:
        missing.append(f"unique index on {model.target_table} ({', '.join(model.conflict_key)})")
    return missing


class SchemaNotReadyError(RuntimeError):
    """The tables a run needs are missing or out of date: the setup step has not run (since an upgrade)."""


SETUP_HINT = (
    "run the setup once, as a role that may change the schema: trigger the DAG bigquery_backfill_setup "
    "(or `airflow dags test bigquery_backfill_setup`), then trigger this run again"
)


def check_schema(conn: psycopg.Connection, model: Declaration) -> None:
    """Fails naming what is missing; a run changes no DDL (it would need the privilege, and its locks would wait for
    every open transaction on the table)."""
    missing = missing_schema(conn, model)
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise SchemaNotReadyError(f"the backfill tables are not set up: missing {shown}; {SETUP_HINT}")


def active_job_index_exists(conn: psycopg.Connection) -> bool:
    return conn.execute("SELECT to_regclass('bigquery_backfill_jobs_one_active') IS NOT NULL").fetchone()[0]


class ActiveRunError(RuntimeError):
    """Another dag run is actively working on the same tenant+model."""


class LegacyLoopRunningError(ActiveRunError):
    """A job row of the old backfill loop (no dag run) changed recently: that loop is still running."""


class ClaimRefusedError(RuntimeError):
    """Another writer holds a pending/running job of the tenant+model."""


class SupersededError(RuntimeError):
    """A later run of the same tenant+model completed with newer data: this run must not write its older data."""


# A job whose dag run Airflow does not know (another Airflow, a dag.test), or a job of the old loop (no dag run), is
# alive while it or its progress changed this recently; a job whose run Airflow knows is alive exactly while Airflow
# says the run is queued or running.
LIVE_JOB_SECONDS = 15 * 60

# (dag_id, run_id) -> True: queued or running; False: known to Airflow and finished; None: unknown to Airflow
RunState = Callable[[str, str], "bool | None"]


def lock_tenant_model(conn: psycopg.Connection, tenant_id: str, model_type: str) -> None:
    conn.execute(sql_text("lock_tenant_model.sql"), {"tenant_id": tenant_id, "model_type": model_type})


def delete_stale_jobs(
    conn: psycopg.Connection, run: RunKey, tenant_id: str, model_type: str, run_active: RunState
) -> dict[str, int]:
    """Deletes the tenant+model's pending/running/failed jobs of other runs, refusing (deleting nothing) if one of
    them belongs to a run that is still alive."""
    params = {"tenant_id": tenant_id, "model_type": model_type, **run.params()}
    for other in _all(conn, "other_runs_jobs.sql", {**params, "live_seconds": LIVE_JOB_SECONDS}):
        if other["dag_run_id"] is None:
            if other["status"] != "failed" and other["recent"]:
                raise LegacyLoopRunningError(
                    f"tenant {tenant_id} model {model_type!r}: job {other['id']} of the old backfill loop (no dag "
                    f"run, {other['status']}) changed at {other['last_activity']:%Y-%m-%d %H:%M:%S%z}, less than "
                    f"{LIVE_JOB_SECONDS // 60} minutes ago: the old loop is still running, and would write over "
                    "this run. Nothing deleted. Stop the old loop first (README: Migrating from the old loop), "
                    "wait until its jobs stop changing, then trigger again."
                )
            continue
        why = _alive(conn, other, run_active)
        if why:
            raise ActiveRunError(
                f"tenant {tenant_id} model {model_type!r} is being backfilled by dag run {other['dag_run_id']} "
                f"(job {other['id']}, {other['status']}: {why}); nothing deleted. "
                "Wait for that run to end, or mark it failed, then trigger again."
            )
    row = _one(conn, "cleanup_stale_jobs.sql", {**params, "live_seconds": LIVE_JOB_SECONDS})
    assert row is not None
    return {k: int(v) for k, v in row.items()}


def _alive(conn: psycopg.Connection, job: dict[str, Any], run_active: RunState) -> str | None:
    """Why another run's job is still alive, or None if it is stale."""
    locked = _one(conn, "locked_chunks.sql", {"job_id": job["id"]})
    if locked and locked["locked"]:
        return f"{locked['locked']} of its chunks being written right now"
    active = run_active(job["dag_id"], job["dag_run_id"])
    if active:
        return "Airflow says its run is still queued or running"
    if active is None and job["status"] != "failed" and job["recent"]:
        return f"a run Airflow does not know, last progress {job['last_activity']:%Y-%m-%d %H:%M:%S%z}"
    return None


def ensure_active_job_index(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """Creates the one-active-job index; returns the tenant+model pairs whose duplicates still block it."""
    try:
        with conn.transaction():  # a savepoint: a failed CREATE INDEX must not undo the cleanup
            conn.execute(sql_text("ensure_active_job_index.sql"))
        return []
    except psycopg.errors.UniqueViolation:
        return _all(conn, "duplicate_active_jobs.sql", {})


def claim_job(conn: psycopg.Connection, run: RunKey, tenant_id: str, model_type: str) -> tuple[Job, bool]:
    """Creates the run's job row or takes the existing one back, as `running`. Returns (job, created)."""
    try:
        row = _one(conn, "claim_job.sql", {"tenant_id": tenant_id, "model_type": model_type, **run.params()})
    except psycopg.errors.UniqueViolation as exc:
        raise ClaimRefusedError(
            f"another pending/running backfill job exists for tenant {tenant_id} model {model_type!r} "
            f"(written by another writer); refusing to create a second one: {exc.diag.message_detail}"
        ) from exc
    assert row is not None
    return _job(row), bool(row["created"])


def record_model(conn: psycopg.Connection, job: Job, model: Model, ignored: list[str]) -> None:
    """Records on the job the model's columns as resolved now, which every later task of the run uses, and the
    source columns no model column reads (empty: none). A job already planned keeps the columns its snapshot was
    taken with: a change since refuses the run."""
    record = model.as_record()
    if job.snapshot_table is not None and job.model_columns is not None and job.model_columns != record:
        changed = [c for c in (*job.model_columns, *record) if (c in record) != (c in job.model_columns)]
        raise ModelMismatchError(
            f"job {job.id}: model {model.model_type!r}'s columns changed since this run's snapshot was taken "
            f"({'; '.join(' '.join(c) for c in changed)}): its snapshot no longer fits the target. Trigger a new run"
        )
    conn.execute(sql_text("record_model.sql"), {"job_id": job.id, "model_columns": Jsonb(record), "ignored": ignored})


def run_model(declaration: Declaration, job: Job) -> Model:
    """The model as the job's cleanup resolved it."""
    if job.model_columns is None:
        raise ModelMismatchError(
            f"job {job.id} has no model columns recorded (cleanup_stale_jobs did not finish, or an older version "
            "ran it): clear the run from cleanup_stale_jobs, or trigger a new run"
        )
    return Model.from_record(declaration, job.model_columns)


def record_plan(
    conn: psycopg.Connection,
    job: Job,
    *,
    total_records: int,
    chunk_size: int,
    source_table: str,
    snapshot_table: str,
    snapshot_at: datetime,
    target_snapshot: str,
    estimated_bytes: int | None = None,
    duplicate_source_rows: int = 0,
    snapshot_offset: int = 0,
) -> Job:
    """Records the snapshot the job reads (and BigQuery's estimate of the bytes its query bills); once per job."""
    row = _one(
        conn,
        "record_plan.sql",
        {
            "job_id": job.id,
            "total_records": total_records,
            "chunk_size": chunk_size,
            "source_table": source_table,
            "snapshot_table": snapshot_table,
            "snapshot_at": snapshot_at,
            "target_snapshot": target_snapshot,
            "estimated_bytes": estimated_bytes,
            "duplicate_source_rows": duplicate_source_rows,
            "snapshot_offset": snapshot_offset,
        },
    )
    if row is None:
        raise RuntimeError(f"job {job.id} was planned meanwhile, or deleted: not recording a second plan")
    return _job(row)


def refuse_old_snapshot(
    conn: psycopg.Connection, job: Job, tenant_id: str, model_type: str, max_age_hours: int
) -> None:
    """Fails if writing this job's snapshot now would put old data over newer: a later run of the tenant+model
    completed with a newer snapshot (SupersededError), or the snapshot is older than `max_age_hours`
    (SnapshotTooOldError). Every task checks it before it writes or deletes anything."""
    _refuse_if_superseded(conn, job, tenant_id, model_type)
    _refuse_if_too_old(conn, job, max_age_hours)


def _refuse_if_superseded(conn: psycopg.Connection, job: Job, tenant_id: str, model_type: str) -> None:
    if job.snapshot_at is None:
        return  # not planned yet: its snapshot will be taken now, newer than any
    newer = _one(
        conn,
        "newer_completed_job.sql",
        {"tenant_id": tenant_id, "model_type": model_type, "job_id": job.id, "snapshot_at": job.snapshot_at},
    )
    if newer:
        raise SupersededError(
            f"a newer run completed at {newer['completed_at']:%Y-%m-%d %H:%M:%S%z} (dag run {newer['dag_run_id']}, "
            f"job {newer['id']}, data as of {newer['snapshot_at']:%Y-%m-%d %H:%M:%S%z}) for tenant {tenant_id} "
            f"model {model_type!r}; this run's snapshot is older ({job.snapshot_at:%Y-%m-%d %H:%M:%S%z}), so it "
            "writes nothing: trigger a new run instead"
        )


class SnapshotTooOldError(RuntimeError):
    """The job's snapshot is older than the run's max_snapshot_age_hours: resuming it would write old data."""


def _refuse_if_too_old(conn: psycopg.Connection, job: Job, max_age_hours: int) -> None:
    # by the database's clock: resuming would write the snapshot's rows over everything written to the target since,
    # and delete_missing would delete by it
    if job.snapshot_at is None:
        return  # not planned yet: its snapshot will be taken now
    row = conn.execute("SELECT extract(epoch FROM now() - %s)::float8 / 3600", [job.snapshot_at]).fetchone()
    age = float(row[0]) if row else 0.0
    if age > max_age_hours:
        raise SnapshotTooOldError(
            f"job {job.id} reads a snapshot taken {job.snapshot_at:%Y-%m-%d %H:%M:%S%z}, {age:.1f} hours ago, over "
            f"max_snapshot_age_hours={max_age_hours}: resuming it would write data that old over what changed "
            "since, so it writes nothing. Trigger a new run (it takes a new snapshot; rows already right are left "
            "as they are)"
        )


def find_run_jobs(conn: psycopg.Connection, run: RunKey) -> list[Job]:
    """The run's jobs, one per tenant of its fleet, by tenant."""
    return [_job(row) for row in _all(conn, "find_run_job.sql", run.params())]


def _job(row: dict[str, Any]) -> Job:
    return Job(
        id=str(row["id"]),
        tenant_id=str(row["tenant_id"]),
        status=row["status"],
        total_records=None if row["total_records"] is None else int(row["total_records"]),
        chunk_size=None if row["chunk_size"] is None else int(row["chunk_size"]),
        source_table=row["source_table"],
        snapshot_table=row["snapshot_table"],
        snapshot_at=row["snapshot_at"],
        error_message=row.get("error_message"),
        target_snapshot=row.get("target_snapshot"),
        model_columns=row.get("model_columns"),
        snapshot_offset=int(row.get("snapshot_offset") or 0),
    )


def plan_chunks(conn: psycopg.Connection, job: Job) -> list[dict[str, int]]:
    """Writes the job's chunk rows (once) and returns those not done yet, in order. The run's chunks cut the whole
    snapshot every chunk_size offsets; a job's chunk rows are its tenant's part of each chunk its rows are in."""
    if job.total_records is None or job.chunk_size is None:
        raise RuntimeError(f"job {job.id} has no snapshot recorded yet: plan_chunks records it")
    first, size, total = job.snapshot_offset, job.chunk_size, job.total_records
    conn.execute(
        sql_text("plan_chunk_rows.sql"),
        {
            "job_id": job.id,
            "chunk_size": size,
            "first_offset": first,
            "total": total,
            "first_chunk": first // size,
            "last_chunk": (first + total - 1) // size if total else first // size - 1,
        },
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
    conn: psycopg.Connection,
    job_id: str,
    chunk_index: int,
    counts: dict[str, float],
    write_path: str,
    key_proof: dict[str, Any] | None = None,
) -> dict[str, int]:
    proof = Jsonb(key_proof) if key_proof is not None else None
    params = {"job_id": job_id, "chunk_index": chunk_index, "write_path": write_path, "key_proof": proof, **counts}
    row = _one(conn, "complete_chunk.sql", params)
    if row is None:
        raise RuntimeError(f"chunk {chunk_index} of job {job_id} was not pending when it completed")
    conn.execute(sql_text("update_progress.sql"), {"job_id": job_id, "read": counts["read"]})
    return row


def chunk_totals(conn: psycopg.Connection, job_id: str) -> dict[str, int]:
    row = _one(conn, "chunk_totals.sql", {"job_id": job_id})
    assert row is not None
    return {k: int(v) for k, v in row.items()}


def chunk_key_proofs(conn: psycopg.Connection, job_id: str) -> dict[int, tuple[int, dict[str, Any]]]:
    """start offset -> (rows read, key proof) of the job's done chunks that recorded one."""
    rows = _all(conn, "chunk_key_proofs.sql", {"job_id": job_id})
    return {r["start_offset"]: (r["rows_read"], r["key_proof"]) for r in rows}


def legacy_jobs_during_run(conn: psycopg.Connection, job_id: str) -> list[dict[str, Any]]:
    """Jobs of the old loop of the job's tenant+model that changed since the job started (at most 5, latest first)."""
    return _all(conn, "legacy_jobs_during_run.sql", {"job_id": job_id})


def unfinished_chunks(conn: psycopg.Connection, job_id: str) -> list[dict[str, Any]]:
    return _all(conn, "unfinished_chunks.sql", {"job_id": job_id})


def complete_job(conn: psycopg.Connection, job_id: str, missing_from_source: int | None, deleted: int) -> None:
    conn.execute(
        sql_text("complete_job.sql"),
        {"job_id": job_id, "missing_from_source": missing_from_source, "deleted_records": deleted},
    )


def record_missing(conn: psycopg.Connection, job_id: str, missing_from_source: int) -> None:
    conn.execute(
        "UPDATE bigquery_backfill_jobs SET missing_from_source = %s, updated_at = now() WHERE id = %s",
        [missing_from_source, job_id],
    )


def fail_job(
    conn: psycopg.Connection, run: RunKey, error_message: str, chunk_index: int = -1, job_id: str | None = None
) -> None:
    """Marks failed the run's jobs that are not completed: all of them, or only the one `job_id`, or (a chunk's
    failure, `chunk_index` >= 0) those with that chunk not done; and that chunk of each, with the message."""
    conn.execute(
        sql_text("fail_job.sql"),
        {"error_message": error_message[:4000], "chunk_index": chunk_index, "job_id": job_id, **run.params()},
    )


def job_chunk_ranges(conn: psycopg.Connection, job_id: str) -> list[tuple[int, int]]:
    """The job's chunks' offset ranges [start, end), in order."""
    rows = conn.execute(
        "SELECT start_offset, end_offset FROM backfill_chunks WHERE job_id = %s ORDER BY chunk_index", [job_id]
    ).fetchall()
    return [(int(a), int(b)) for a, b in rows]


def find_job_by_id(conn: psycopg.Connection, job_id: str) -> Job:
    row = _one(conn, "find_job.sql", {"job_id": job_id})
    if row is None:
        raise LookupError(f"backfill job {job_id} no longer exists (deleted by a later cleanup?)")
    return _job(row)

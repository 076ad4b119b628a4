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


def _each(conn: psycopg.Connection, name: str, params: list[dict[str, Any]]) -> list[dict[str, Any] | None]:
    """The first row the statement returns for each set of parameters (None: none), pipelined: one round trip."""
    rows: list[dict[str, Any] | None] = []
    if not params:
        return rows
    with conn.cursor(row_factory=dict_row) as cur:
        cur.executemany(sql_text(name), params, returning=True)
        while True:
            rows.append(cur.fetchone())
            if not cur.nextset():
                return rows


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


def lock_tenant_models(conn: psycopg.Connection, tenant_ids: list[str], model_type: str) -> None:
    conn.execute(sql_text("lock_tenant_model.sql"), {"tenant_ids": sorted(tenant_ids), "model_type": model_type})


def stale_job_refusals(
    conn: psycopg.Connection, run: RunKey, tenant_ids: list[str], model_type: str, run_active: RunState
) -> dict[str, ActiveRunError]:
    """The tenants whose pending/running/failed jobs of other runs must not be deleted, each with why: one belongs
    to a run that is still alive, or to the old loop while it still runs. Reads every tenant's jobs in one
    statement, their locked chunks in another, and asks Airflow about each other run once."""
    params = {"tenant_ids": tenant_ids, "model_type": model_type, "live_seconds": LIVE_JOB_SECONDS, **run.params()}
    others = _all(conn, "other_runs_jobs.sql", params)
    of_runs = [str(o["id"]) for o in others if o["dag_run_id"] is not None]
    locked = {str(r["job_id"]): int(r["locked"]) for r in _all(conn, "locked_chunks.sql", {"job_ids": of_runs})}
    said: dict[tuple[str, str], bool | None] = {}
    refusals: dict[str, ActiveRunError] = {}
    for other in others:  # by tenant, latest activity first
        tenant_id = str(other["tenant_id"])
        if tenant_id in refusals:
            continue
        if other["dag_run_id"] is None:
            if other["status"] != "failed" and other["recent"]:
                refusals[tenant_id] = LegacyLoopRunningError(
                    f"tenant {tenant_id} model {model_type!r}: job {other['id']} of the old backfill loop (no dag "
                    f"run, {other['status']}) changed at {other['last_activity']:%Y-%m-%d %H:%M:%S%z}, less than "
                    f"{LIVE_JOB_SECONDS // 60} minutes ago: the old loop is still running, and would write over "
                    "this run. Nothing deleted. Stop the old loop first (README: Migrating from the old loop), "
                    "wait until its jobs stop changing, then trigger again."
                )
            continue
        key = (other["dag_id"], other["dag_run_id"])
        if key not in said:
            said[key] = run_active(*key)
        why = _alive(other, locked.get(str(other["id"]), 0), said[key])
        if why:
            refusals[tenant_id] = ActiveRunError(
                f"tenant {tenant_id} model {model_type!r} is being backfilled by dag run {other['dag_run_id']} "
                f"(job {other['id']}, {other['status']}: {why}); nothing deleted. "
                "Wait for that run to end, or mark it failed, then trigger again."
            )
    return refusals


def _alive(job: dict[str, Any], locked: int, active: bool | None) -> str | None:
    """Why another run's job is still alive, or None if it is stale: `locked` of its chunks are being written,
    `active` is what Airflow says of its run."""
    if locked:
        return f"{locked} of its chunks being written right now"
    if active:
        return "Airflow says its run is still queued or running"
    if active is None and job["status"] != "failed" and job["recent"]:
        return f"a run Airflow does not know, last progress {job['last_activity']:%Y-%m-%d %H:%M:%S%z}"
    return None


def delete_stale_jobs(
    conn: psycopg.Connection, run: RunKey, tenant_ids: list[str], model_type: str
) -> dict[str, dict[str, int]]:
    """Deletes the tenants' (for one model) pending/running/failed jobs of other runs, once stale_job_refusals has
    found none of them alive; returns the rows deleted by tenant (a tenant with none deleted: absent)."""
    params = {"tenant_ids": tenant_ids, "model_type": model_type, "live_seconds": LIVE_JOB_SECONDS, **run.params()}
    return {
        str(r.pop("tenant_id")): {k: int(v) for k, v in r.items()} for r in _all(conn, "cleanup_stale_jobs.sql", params)
    }


def ensure_active_job_index(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """Creates the one-active-job index; returns the tenant+model pairs whose duplicates still block it."""
    try:
        with conn.transaction():  # a savepoint: a failed CREATE INDEX must not undo the cleanup
            conn.execute(sql_text("ensure_active_job_index.sql"))
        return []
    except psycopg.errors.UniqueViolation:
        return _all(conn, "duplicate_active_jobs.sql", {})


def claim_jobs(
    conn: psycopg.Connection, run: RunKey, tenant_ids: list[str], model_type: str
) -> tuple[dict[str, tuple[Job, bool]], dict[str, ClaimRefusedError]]:
    """Creates each tenant's job row of the run or takes the existing one back, as `running` (pipelined). Returns
    ({tenant: (job, created)}, {tenant: why refused}): a tenant another writer holds a pending/running job of is
    refused (the one-active-job index), the others claimed."""
    params = [{"tenant_id": t, "model_type": model_type, **run.params()} for t in tenant_ids]
    try:
        with conn.transaction():  # a savepoint: a refused claim undoes the batch, then each is claimed on its own
            rows = _each(conn, "claim_job.sql", params)
        return {str(r["tenant_id"]): (_job(r), bool(r["created"])) for r in rows if r is not None}, {}
    except psycopg.errors.UniqueViolation:
        pass
    claimed: dict[str, tuple[Job, bool]] = {}
    refused: dict[str, ClaimRefusedError] = {}
    for p in params:
        try:
            with conn.transaction():
                row = _one(conn, "claim_job.sql", p)
        except psycopg.errors.UniqueViolation as exc:
            refused[p["tenant_id"]] = ClaimRefusedError(
                f"another pending/running backfill job exists for tenant {p['tenant_id']} model {model_type!r} "
                f"(written by another writer); refusing to create a second one: {exc.diag.message_detail}"
            )
            continue
        assert row is not None
        claimed[str(row["tenant_id"])] = (_job(row), bool(row["created"]))
    return claimed, refused


def model_mismatch(job: Job, model: Model) -> ModelMismatchError | None:
    """Why a job already planned cannot take the model's columns as resolved now: it keeps the columns its snapshot
    was taken with, and a change since refuses the run."""
    record = model.as_record()
    if job.snapshot_table is None or job.model_columns is None or job.model_columns == record:
        return None
    changed = [c for c in (*job.model_columns, *record) if (c in record) != (c in job.model_columns)]
    return ModelMismatchError(
        f"job {job.id}: model {model.model_type!r}'s columns changed since this run's snapshot was taken "
        f"({'; '.join(' '.join(c) for c in changed)}): its snapshot no longer fits the target. Trigger a new run"
    )


def record_models(conn: psycopg.Connection, jobs: list[Job], model: Model, ignored: list[str]) -> None:
    """Records on each job the model's columns as resolved now, which every later task of the run uses, and the
    source columns no model column reads (empty: none); each job checked first by model_mismatch."""
    record = Jsonb(model.as_record())
    with conn.cursor() as cur:
        cur.executemany(
            sql_text("record_model.sql"),
            [{"job_id": job.id, "model_columns": record, "ignored": ignored} for job in jobs],
        )


def run_model(declaration: Declaration, job: Job) -> Model:
    """The model as the job's cleanup resolved it."""
    if job.model_columns is None:
        raise ModelMismatchError(
            f"job {job.id} has no model columns recorded (cleanup_stale_jobs did not finish, or an older version "
            "ran it): clear the run from cleanup_stale_jobs, or trigger a new run"
        )
    return Model.from_record(declaration, job.model_columns)


@dataclass(frozen=True)
class PlanRecord:
    """The snapshot a job reads, as plan_chunks records it (and BigQuery's estimate of the bytes its query bills)."""

    job_id: str
    total_records: int
    chunk_size: int
    source_table: str
    snapshot_table: str
    snapshot_at: datetime
    target_snapshot: str
    estimated_bytes: int | None = None
    duplicate_source_rows: int = 0
    snapshot_offset: int = 0


def record_plans(conn: psycopg.Connection, plans: list[PlanRecord]) -> list[Job]:
    """Records each job's plan, once per job (pipelined); returns the jobs as recorded."""
    rows = _each(conn, "record_plan.sql", [vars(p) for p in plans])
    for plan, row in zip(plans, rows, strict=True):
        if row is None:
            raise RuntimeError(f"job {plan.job_id} was planned meanwhile, or deleted: not recording a second plan")
    return [_job(r) for r in rows if r is not None]


def refuse_old_snapshot(conn: psycopg.Connection, job: Job, model_type: str, max_age_hours: int) -> None:
    """Fails if writing this job's snapshot now would put old data over newer: a later run of the tenant+model
    completed with a newer snapshot (SupersededError), or the snapshot is older than `max_age_hours`
    (SnapshotTooOldError). Every task checks it before it writes or deletes anything."""
    refusal = old_snapshot_refusals(conn, [job], model_type, max_age_hours).get(job.id)
    if refusal is not None:
        raise refusal


def old_snapshot_refusals(
    conn: psycopg.Connection, jobs: list[Job], model_type: str, max_age_hours: int
) -> dict[str, SupersededError | SnapshotTooOldError]:
    """refuse_old_snapshot for many jobs at once (two statements): each refused job's error, by job id."""
    planned = [j for j in jobs if j.snapshot_at is not None]  # not planned yet: its snapshot will be taken now
    if not planned:
        return {}
    refusals: dict[str, SupersededError | SnapshotTooOldError] = {}
    newer = _all(
        conn,
        "newer_completed_jobs.sql",
        {
            "job_ids": [j.id for j in planned],
            "tenant_ids": [j.tenant_id for j in planned],
            "snapshot_ats": [j.snapshot_at for j in planned],
            "model_type": model_type,
        },
    )
    by_id = {j.id: j for j in planned}
    for row in newer:
        job = by_id[str(row["job_id"])]
        assert job.snapshot_at is not None
        refusals[job.id] = SupersededError(
            f"a newer run completed at {row['completed_at']:%Y-%m-%d %H:%M:%S%z} (dag run {row['dag_run_id']}, "
            f"job {row['id']}, data as of {row['snapshot_at']:%Y-%m-%d %H:%M:%S%z}) for tenant {job.tenant_id} "
            f"model {model_type!r}; this run's snapshot is older ({job.snapshot_at:%Y-%m-%d %H:%M:%S%z}), so it "
            "writes nothing: trigger a new run instead"
        )
    # by the database's clock: resuming would write the snapshot's rows over everything written to the target since,
    # and delete_missing would delete by it
    row = conn.execute("SELECT now()").fetchone()
    assert row is not None
    for job in planned:
        assert job.snapshot_at is not None
        age = (row[0] - job.snapshot_at).total_seconds() / 3600
        if job.id not in refusals and age > max_age_hours:
            refusals[job.id] = SnapshotTooOldError(
                f"job {job.id} reads a snapshot taken {job.snapshot_at:%Y-%m-%d %H:%M:%S%z}, {age:.1f} hours ago, "
                f"over max_snapshot_age_hours={max_age_hours}: resuming it would write data that old over what "
                "changed since, so it writes nothing. Trigger a new run (it takes a new snapshot; rows already "
                "right are left as they are)"
            )
    return refusals


class SnapshotTooOldError(RuntimeError):
    """The job's snapshot is older than the run's max_snapshot_age_hours: resuming it would write old data."""


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


def plan_chunks(conn: psycopg.Connection, jobs: list[Job]) -> dict[str, list[dict[str, int]]]:
    """Writes the jobs' chunk rows (once) and returns, by job, those not done yet, in order. The run's chunks cut
    the whole snapshot every chunk_size offsets; a job's chunk rows are its tenant's part of each chunk its rows
    are in."""
    rows = []
    for job in jobs:
        if job.total_records is None or job.chunk_size is None:
            raise RuntimeError(f"job {job.id} has no snapshot recorded yet: plan_chunks records it")
        first, size, total = job.snapshot_offset, job.chunk_size, job.total_records
        rows.append(
            {
                "job_id": job.id,
                "chunk_size": size,
                "first_offset": first,
                "total": total,
                "first_chunk": first // size,
                "last_chunk": (first + total - 1) // size if total else first // size - 1,
                "source_table": job.source_table,
            }
        )
    with conn.cursor() as cur:
        cur.executemany(sql_text("plan_chunk_rows.sql"), rows)
        cur.executemany(sql_text("ensure_progress_row.sql"), rows)
    pending: dict[str, list[dict[str, int]]] = {job.id: [] for job in jobs}
    for r in _all(conn, "pending_chunks.sql", {"job_ids": [job.id for job in jobs]}):
        pending[str(r["job_id"])].append(
            {"chunk_index": r["chunk_index"], "start": r["start_offset"], "end": r["end_offset"]}
        )
    return pending


def lock_chunks(conn: psycopg.Connection, job_ids: list[str], chunk_index: int) -> dict[str, str]:
    """Locks the jobs' rows of the chunk until the transaction ends; returns their status by job id (a job missing:
    deleted since)."""
    rows = _all(conn, "lock_chunk.sql", {"job_ids": job_ids, "chunk_index": chunk_index})
    return {str(r["job_id"]): r["status"] for r in rows}


@dataclass(frozen=True)
class ChunkDone:
    """One job's part of a chunk, landed: its counts (and seconds), write path and key proof."""

    job_id: str
    counts: dict[str, float]
    write_path: str
    key_proof: dict[str, Any] | None = None


def complete_chunks(conn: psycopg.Connection, chunk_index: int, done: list[ChunkDone]) -> list[dict[str, int]]:
    """Records the jobs' parts of a chunk as done, with their progress (pipelined: one round trip); returns each
    job's processed and total records."""
    params = [
        {"job_id": d.job_id, "chunk_index": chunk_index, "write_path": d.write_path,
         "key_proof": None if d.key_proof is None else Jsonb(d.key_proof), **d.counts}
        for d in done
    ]  # fmt: skip
    states = []
    for p, row in zip(params, _each(conn, "complete_chunk.sql", params), strict=True):
        if row is None:
            raise RuntimeError(f"chunk {chunk_index} of job {p['job_id']} was not pending when it completed")
        states.append(row)
    with conn.cursor() as cur:
        cur.executemany(sql_text("update_progress.sql"), [{"job_id": p["job_id"], "read": p["read"]} for p in params])
    return states


@dataclass(frozen=True)
class JobChunks:
    """What finalize reads of a job's chunks: their counts summed, the chunk rows in order, and the old loop's jobs
    of its tenant+model that changed while it ran (latest first)."""

    totals: dict[str, int]
    chunks: list[dict[str, Any]]
    legacy: list[dict[str, Any]]

    @property
    def ranges(self) -> list[tuple[int, int]]:
        """The chunks' offset ranges [start, end), in order."""
        return [(int(c["start_offset"]), int(c["end_offset"])) for c in self.chunks]

    @property
    def unfinished(self) -> list[dict[str, Any]]:
        return [c for c in self.chunks if c["status"] != "done"]

    @property
    def key_proofs(self) -> dict[int, tuple[int, dict[str, Any]]]:
        """start offset -> (rows read, key proof) of the done chunks that recorded one."""
        return {c["start_offset"]: (c["rows_read"], c["key_proof"]) for c in self.chunks if c["key_proof"]}


def job_chunks(conn: psycopg.Connection, job_ids: list[str]) -> dict[str, JobChunks]:
    """JobChunks of each job, in three statements whatever the number of jobs."""
    params = {"job_ids": job_ids}
    totals = {str(r.pop("job_id")): {k: int(v) for k, v in r.items()} for r in _all(conn, "chunk_totals.sql", params)}
    chunks: dict[str, list[dict[str, Any]]] = {j: [] for j in job_ids}
    for row in _all(conn, "job_chunks.sql", params):
        chunks[str(row.pop("job_id"))].append(row)
    legacy: dict[str, list[dict[str, Any]]] = {j: [] for j in job_ids}
    for row in _all(conn, "legacy_jobs_during_run.sql", params):
        legacy[str(row.pop("job_id"))].append(row)
    return {j: JobChunks(totals[j], chunks[j], legacy[j][:5]) for j in job_ids}


def complete_jobs(conn: psycopg.Connection, jobs: list[tuple[str, int | None, int]]) -> None:
    """Completes each (job id, target rows missing from the source, rows deleted), pipelined."""
    with conn.cursor() as cur:
        cur.executemany(
            sql_text("complete_job.sql"),
            [{"job_id": j, "missing_from_source": missing, "deleted_records": deleted} for j, missing, deleted in jobs],
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


def find_jobs_by_id(conn: psycopg.Connection, job_ids: list[str]) -> dict[str, Job]:
    """The jobs that still exist, by id."""
    return {str(r["id"]): _job(r) for r in _all(conn, "find_job.sql", {"job_ids": job_ids})}

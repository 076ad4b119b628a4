"""What each task of the `bigquery_backfill` DAG does. The DAG file only declares tasks that call these."""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import psycopg
import pyarrow as pa

from bq_backfill import ledger, range_proofs, sink, target_rows
from bq_backfill.ledger import RunKey
from bq_backfill.models import Model, get_model
from bq_backfill.source import BigQuerySource, TableRef, snapshot_name
from bq_backfill.validate import Rejected, split_invalid

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    """The run's conf, already validated by the DAG's Params."""

    tenant_id: str
    model_type: str
    chunk_size: int
    dry_run: bool
    max_rejected_rows: int
    source_table: str | None
    scratch_dataset: str
    gcp_conn_id: str
    postgres_conn_id: str

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Settings:
        return cls(
            tenant_id=str(params["tenant_id"]).lower(),
            model_type=params["model_type"],
            chunk_size=int(params["chunk_size"]),
            dry_run=bool(params["dry_run"]),
            max_rejected_rows=int(params["max_rejected_rows"]),
            source_table=params.get("source_table") or None,
            scratch_dataset=params["scratch_dataset"],
            gcp_conn_id=params["gcp_conn_id"],
            postgres_conn_id=params["postgres_conn_id"],
        )

    @property
    def model(self) -> Model:
        return get_model(self.model_type)


@contextmanager
def postgres(conn_id: str) -> Iterator[psycopg.Connection]:
    """A psycopg 3 connection from PostgresHook; one transaction, committed on success, rolled back on error."""
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    try:
        conn = PostgresHook(postgres_conn_id=conn_id).get_conn()
    except Exception as exc:  # not defined (AirflowNotFoundException), refused, bad password, unknown database
        raise ConnectionError(f"cannot connect to Postgres connection {conn_id!r}: {exc}".strip()) from exc
    if not isinstance(conn, psycopg.Connection):
        raise TypeError(f"connection {conn_id!r} did not give a psycopg 3 connection; install psycopg[binary]")
    try:
        with conn.transaction():
            yield conn
    finally:
        conn.close()


def bigquery(conn_id: str) -> BigQuerySource:
    try:
        return BigQuerySource.from_connection(conn_id)
    except Exception as exc:  # the hook raises several driver errors for a missing or broken connection
        raise ConnectionError(f"cannot use BigQuery connection {conn_id!r}: {exc}") from exc


def source_table(s: Settings, bq: BigQuerySource) -> TableRef:
    return bq.table(s.source_table or s.model.source_table)


# --- cleanup_stale_jobs -------------------------------------------------------------------------------------------


def cleanup_stale_jobs(s: Settings, run: RunKey) -> dict[str, int]:
    # Both connections and the source are checked before anything is deleted: a broken setup fails here.
    bq = bigquery(s.gcp_conn_id)
    source = source_table(s, bq)
    try:
        bq.check_source(s.model, source)
    except Exception as exc:
        raise ConnectionError(f"BigQuery connection {s.gcp_conn_id!r}: {exc}") from exc
    with postgres(s.postgres_conn_id) as conn:
        ledger.apply_schema(conn)
        deleted = ledger.delete_stale_jobs(conn, run, s.tenant_id, s.model_type)
        blocked = ledger.ensure_active_job_index(conn)
        verb = "would delete" if s.dry_run else "deleted"
        log.info(
            "cleanup for tenant %s model %s: %s %d stale job rows (%d pending, %d running, %d failed) "
            "and %d progress rows; target table %s untouched",
            s.tenant_id,
            s.model_type,
            verb,
            deleted["jobs_deleted"],
            deleted["pending_deleted"],
            deleted["running_deleted"],
            deleted["failed_deleted"],
            deleted["progress_deleted"],
            s.model.target_table,
        )
        for row in blocked:
            log.warning(
                "one-active-job index not created yet: tenant %s model %s still has %d pending/running jobs; "
                "a backfill run for that tenant+model cleans them up",
                row["tenant_id"],
                row["model_type"],
                row["active_jobs"],
            )
        if s.dry_run:
            log.info("dry run: cleanup rolled back, nothing deleted")
            raise psycopg.Rollback()  # the same statements, undone; the transaction block swallows it
    return deleted


# --- plan_chunks --------------------------------------------------------------------------------------------------


def plan_chunks(s: Settings, run: RunKey, max_map_length: int) -> list[dict[str, Any]]:
    model = s.model
    bq = bigquery(s.gcp_conn_id)
    source = source_table(s, bq)
    if s.dry_run:
        total = bq.count_tenant_rows(model, source, s.tenant_id)
        chunks = -(-total // s.chunk_size)
        log.info(
            "dry run: tenant %s has %d rows in %s; plan would be %d chunks of %d rows (max_map_length %d); "
            "nothing written",
            s.tenant_id,
            total,
            source,
            chunks,
            s.chunk_size,
            max_map_length,
        )
        _check_chunk_count(total, s.chunk_size, max_map_length)
        return []

    with postgres(s.postgres_conn_id) as conn:
        existing = ledger.find_run_job(conn, run)
    if existing:  # a retried or cleared plan keeps the first plan's snapshot, chunking and offsets
        snapshot, as_of, chunk_size = bq.table(existing.snapshot_table), existing.snapshot_at, existing.chunk_size
        if chunk_size != s.chunk_size:
            log.info("run already planned with chunk_size %d: keeping it", chunk_size)
    else:
        name = snapshot_name(model, s.tenant_id, run.dag_id, run.run_id)
        snapshot, as_of, chunk_size = TableRef(bq.project, s.scratch_dataset, name), bq.now(), s.chunk_size

    started = time.monotonic()
    total = bq.ensure_snapshot(model, source, s.tenant_id, snapshot, as_of)
    log.info(
        "snapshot %s: %d rows of tenant %s as of %s (%.1f s)",
        snapshot,
        total,
        s.tenant_id,
        as_of,
        time.monotonic() - started,
    )
    _check_chunk_count(total, chunk_size, max_map_length)

    with postgres(s.postgres_conn_id) as conn:
        job, created = ledger.claim_job(
            conn,
            run,
            tenant_id=s.tenant_id,
            model_type=s.model_type,
            total_records=total,
            chunk_size=chunk_size,
            source_table=str(source),
            snapshot_table=str(snapshot),
            snapshot_at=as_of,
        )
        if job.total_records != total:
            raise RuntimeError(f"snapshot {snapshot} now has {total} rows but job {job.id} planned {job.total_records}")
        todo = ledger.plan_chunks(conn, job)
    chunks = -(-total // chunk_size)
    log.info(
        "job %s %s: %d rows in %d chunks of %d; %d chunks to do, %d already done",
        job.id,
        "created" if created else "resumed",
        total,
        chunks,
        chunk_size,
        len(todo),
        chunks - len(todo),
    )
    return [{"job_id": job.id, "chunks": chunks, **c} for c in todo]


def _check_chunk_count(total: int, chunk_size: int, max_map_length: int) -> None:
    chunks = -(-total // chunk_size)
    if chunks > max_map_length:
        need = -(-total // max_map_length)
        raise ValueError(
            f"{total} rows in chunks of {chunk_size} make {chunks} chunks, over [core] max_map_length "
            f"({max_map_length}): trigger again with chunk_size >= {need}"
        )


# --- load_chunk ---------------------------------------------------------------------------------------------------


class PermanentChunkError(Exception):
    """An error that a retry cannot fix (bad data, a constraint, a trigger): fail now, clear when fixed."""


class SourceReadError(Exception):
    """Reading a chunk from BigQuery failed; transient or not as its cause is."""


def is_transient(exc: BaseException) -> bool:
    """Errors worth a retry with backoff: the network, a restarted or overloaded server, a timeout.
    Anything else (bad data, a bug, a refused statement) fails at once; a retry would only repeat it."""
    import grpc
    from google.api_core import exceptions as gexc

    transient = (
        psycopg.OperationalError,
        ConnectionError,
        TimeoutError,
        gexc.ServerError,
        gexc.TooManyRequests,
        gexc.RetryError,
        gexc.DeadlineExceeded,
        grpc.RpcError,
    )
    if isinstance(exc, SourceReadError) and exc.__cause__ is not None:
        return is_transient(exc.__cause__)
    return isinstance(exc, transient) and not isinstance(exc, PermanentChunkError)


def slice_rows() -> int:
    """Rows read and written at a time inside a chunk (BACKFILL_SLICE_ROWS, default 20,000): bounds a chunk task's
    memory whatever chunk_size is."""
    value = int(os.environ.get("BACKFILL_SLICE_ROWS", "20000"))
    if value < 1:
        raise ValueError(f"BACKFILL_SLICE_ROWS must be a positive number of rows, not {value}")
    return value


# Slices read ahead at once, each by its own reader thread: while one waits on BigQuery, the others validate and
# digest (3 measured faster than 1 or 2 when nothing needs writing; each slice in flight holds its rows in memory).
READERS = 3


def load_chunk(s: Settings, chunk: dict[str, Any]) -> dict[str, int]:
    model = s.model
    job_id, index, start, end = chunk["job_id"], chunk["chunk_index"], chunk["start"], chunk["end"]
    label = f"chunk #{index} of {chunk['chunks']} [{start}, {end})"

    # Arrow's default allocator (mimalloc) keeps freed slices cached; the system allocator hands them back, which
    # keeps a chunk task about 15 MB smaller (bench --rss-only). Each task runs in a process of its own.
    pa.set_memory_pool(pa.system_memory_pool())
    bq = bigquery(s.gcp_conn_id)
    # A chunk is one transaction, read and written a slice at a time: memory follows the slice, not the chunk,
    # and the next slices are read from BigQuery, validated and digested while this one is written to Postgres.
    step = slice_rows()
    slices = [(lo, min(lo + step, end)) for lo in range(start, end, step)]
    counts = dict.fromkeys(("read", "inserted", "updated", "unchanged", "duplicate", "rejected"), 0)
    paths: list[str] = []
    read_seconds = write_seconds = 0.0
    t0 = time.monotonic()
    try:
        with postgres(s.postgres_conn_id) as conn, ThreadPoolExecutor(READERS, thread_name_prefix="bq-read") as reader:
            # shows in pg_stat_activity which chunk (and which worker process) a session belongs to
            conn.execute(
                "SELECT set_config('application_name', %s, true)",
                [f"bigquery_backfill chunk {index} pid {os.getpid()}"],
            )
            # the chunk's row stays locked until this transaction ends: another attempt waits, then sees it done
            if ledger.lock_chunk(conn, job_id, index) == "done":
                log.info("%s already done: skipped without reading BigQuery", label)
                return {"read": 0, "skipped": 1}
            job = ledger.find_job_by_id(conn, job_id)
            read = partial(_read_slice, bq, s.gcp_conn_id, bq.table(job.snapshot_table), model, label)
            ahead = deque(reader.submit(read, *sl) for sl in slices[:READERS])
            for n in range(len(slices)):
                waited = time.monotonic()
                read_count, good, bad, keys, digest = ahead.popleft().result()
                read_seconds += time.monotonic() - waited
                if n + READERS < len(slices):
                    ahead.append(reader.submit(read, *slices[n + READERS]))
                written = time.monotonic()
                rejected = sink.quarantine(conn, job_id, index, bad)
                proof = range_proofs.ProofKey(s.tenant_id, s.model_type, digest, job_id) if digest else None
                landed = sink.land_rows(conn, model, s.tenant_id, good, keys, proof)
                _tally(counts, read_count, rejected, landed, paths)
                del good, bad
                write_seconds += time.monotonic() - written
            path = "+".join(dict.fromkeys(paths))  # e.g. "copy", or "upsert+copy" for a chunk whose slices differ
            timing = {"read_seconds": read_seconds, "write_seconds": write_seconds}
            job_state = ledger.complete_chunk(conn, job_id, index, {**counts, **timing}, path)
    except psycopg.OperationalError:
        raise  # connection-level: a retry can succeed
    except psycopg.DatabaseError as exc:
        raise PermanentChunkError(f"{label}: Postgres refused the chunk: {exc}".strip()) from exc
    t2 = time.monotonic()
    log.info(
        "%s: read %d · inserted %d · updated %d · unchanged %d · duplicate %d · rejected %d · "
        "written by %s · %.0f rows/s (waited for BigQuery %.2f s, wrote %.2f s) · job %d/%d rows",
        label,
        counts["read"],
        counts["inserted"],
        counts["updated"],
        counts["unchanged"],
        counts["duplicate"],
        counts["rejected"],
        path,
        counts["read"] / max(t2 - t0, 1e-9),
        read_seconds,
        write_seconds,
        job_state["processed_records"],
        job_state["total_records"],
    )
    return counts


def _read_slice(
    bq: BigQuerySource, conn_id: str, snapshot: TableRef, model: Model, label: str, lo: int, hi: int
) -> tuple[int, Any, Rejected, target_rows.KeyRange | None, bytes | None]:
    """One slice of a chunk, read, validated, with its key range and digest: all of it done by the chunk's reader
    thread."""
    try:
        rows = bq.read_rows(snapshot, lo, hi, [*model.column_names, sink.OFFSET_COLUMN])
    except Exception as exc:
        raise SourceReadError(
            f"{label}: BigQuery read of {snapshot} rows [{lo}, {hi}) through connection {conn_id!r} failed: {exc}"
        ) from exc
    if rows.num_rows != hi - lo:
        raise RuntimeError(
            f"{label}: snapshot {snapshot} returned {rows.num_rows} rows for [{lo}, {hi}), expected {hi - lo}"
        )
    good, bad = split_invalid(model, rows, sink.OFFSET_COLUMN)
    if not good.num_rows:
        return rows.num_rows, good, bad, None, None
    return rows.num_rows, good, bad, target_rows.key_range(model, good), range_proofs.digest(model, good)


def _tally(counts: dict[str, int], read: int, rejected: int, landed: sink.Landed, paths: list[str]) -> None:
    """Adds one slice's outcome to its chunk's counts (read = inserted + updated + unchanged + duplicate + rejected)."""
    counts["read"] += read
    counts["inserted"] += landed.inserted
    counts["updated"] += landed.updated
    counts["unchanged"] += landed.distinct - landed.inserted - landed.updated
    counts["duplicate"] += read - rejected - landed.distinct
    counts["rejected"] += rejected
    paths.append(landed.path)


# --- finalize -----------------------------------------------------------------------------------------------------


class ReconciliationError(Exception):
    pass


KEY_CHECK_ROWS = 100_000


def finalize(s: Settings, run: RunKey) -> dict[str, int]:
    if s.dry_run:
        log.info("dry run: nothing was written, nothing to finalize")
        return {}
    model = s.model
    with postgres(s.postgres_conn_id) as conn:
        job = ledger.find_run_job(conn, run)
        if job is None:
            # fail, not skip: a skipped leaf would let Airflow call the run a success
            raise ReconciliationError(f"no job for dag run {run.run_id}: cleanup or plan failed before creating it")
        totals = ledger.chunk_totals(conn, job.id)
        unfinished = ledger.unfinished_chunks(conn, job.id)
        if unfinished:
            # Runs whatever happened upstream (trigger rule all_done): a chunk task killed before its own
            # failure callback ran must not leave the job `running`.
            message = f"{len(unfinished)} of {totals['chunks']} chunks did not finish: " + "; ".join(
                f"#{c['chunk_index']} [{c['start_offset']}, {c['end_offset']}) "
                + (c["error_message"] or "no error recorded (task killed or lost); clear it to run it again")
                for c in unfinished[:10]
            )
            ledger.fail_job(conn, run, message)
    if unfinished:
        raise ReconciliationError(f"job {job.id}: {message}")
    landed = totals["inserted"] + totals["updated"] + totals["unchanged"] + totals["duplicate"]
    problems = []
    if totals["read"] != job.total_records:
        problems.append(f"rows read {totals['read']} != snapshot rows {job.total_records}")
    if totals["read"] != landed + totals["rejected"]:
        problems.append(f"rows read {totals['read']} != landed {landed} + rejected {totals['rejected']}")

    bq = bigquery(s.gcp_conn_id)
    snapshot = bq.table(job.snapshot_table)
    if not problems:
        # Every key of the snapshot must be in the target: checked 100,000 offsets at a time (bounded memory),
        # two ranges at once (read-only, each on its own connection: both cores busy).
        def missing_in(lo: int) -> int:
            hi = min(lo + KEY_CHECK_ROWS, job.total_records)
            keys = bq.read_rows(snapshot, lo, hi, [*model.conflict_key[1:], sink.OFFSET_COLUMN])
            with postgres(s.postgres_conn_id) as conn:
                return sink.missing_keys(conn, model, s.tenant_id, job.id, keys)

        with ThreadPoolExecutor(2, thread_name_prefix="key-check") as pool:
            missing = sum(pool.map(missing_in, range(0, job.total_records, KEY_CHECK_ROWS)))
        if missing:
            problems.append(f"{missing} source keys of the snapshot have no row in {model.target_table}")
    if problems:
        raise ReconciliationError(f"job {job.id} does not reconcile: " + "; ".join(problems))
    if totals["rejected"] > s.max_rejected_rows:
        raise ReconciliationError(
            f"job {job.id}: {totals['rejected']} rows rejected, over max_rejected_rows={s.max_rejected_rows}; "
            f"see backfill_quarantine WHERE job_id = '{job.id}'"
        )
    with postgres(s.postgres_conn_id) as conn:
        ledger.complete_job(conn, job.id)
        # the ranges as this run left them; earlier runs' proofs describe states since replaced
        dropped = range_proofs.keep_only(conn, s.tenant_id, s.model_type, job.id)
    bq.drop_snapshot(snapshot)
    log.info(
        "job %s completed: %d rows read = %d inserted + %d updated + %d unchanged + %d duplicate + %d rejected; "
        "every source key is in %s; %d range proofs of earlier runs dropped",
        job.id,
        totals["read"],
        totals["inserted"],
        totals["updated"],
        totals["unchanged"],
        totals["duplicate"],
        totals["rejected"],
        model.target_table,
        dropped,
    )
    return totals


# --- failure callback ---------------------------------------------------------------------------------------------


def mark_job_failed(
    s: Settings, run: RunKey, task_label: str, error: BaseException | None, chunk_index: int = -1
) -> None:
    message = f"{task_label} failed: {error}" if error else f"{task_label} failed"
    try:
        with postgres(s.postgres_conn_id) as conn:
            ledger.fail_job(conn, run, message, chunk_index)
    except Exception as exc:  # e.g. the very connection that failed: the task's own error says it all
        log.error("%s; the job row could not be marked failed either: %s", message, exc)
        return
    log.error("backfill job for run %s marked failed: %s", run.run_id, message)

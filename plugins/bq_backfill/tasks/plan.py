"""plan_chunks: the run's snapshot, its job row and the chunks still to do."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import pyarrow as pa

from bq_backfill import deletions, ledger
from bq_backfill.connections import bigquery, postgres, source_table
from bq_backfill.errors import BytesCapError, EmptySourceError
from bq_backfill.ledger import RunKey
from bq_backfill.models import Model
from bq_backfill.settings import Settings
from bq_backfill.source import MAX_SNAPSHOT_PARTITIONS, BigQuerySource, TableRef, job_labels, snapshot_name
from bq_backfill.tasks.cleanup import resolve_model

log = logging.getLogger(__name__)


def plan_chunks(s: Settings, run: RunKey, max_map_length: int) -> list[dict[str, Any]]:
    bq = bigquery(s.gcp_conn_id)
    bq.labels = job_labels(run.dag_id, s.model_type, s.tenant_id, run.run_id)
    bq.maximum_bytes_billed = s.maximum_bytes_billed
    source = source_table(s, bq)
    if s.dry_run:
        with postgres(s.postgres_conn_id) as conn:  # a dry run's cleanup recorded nothing
            model = resolve_model(s, bq, source, conn).model
        bq.locate(source, s.scratch_dataset, create=False)
        estimate = bq.estimate_snapshot_bytes(model, source, s.tenant_id)
        log.info("dry run: %s", _bytes_line(estimate, s.maximum_bytes_billed))
        # One read of the tenant's key columns, streamed into a temp table (gone with the transaction: nothing
        # written), gives both its row count and what the target holds beyond it.
        read = [0]

        def counted(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
            for batch in batches:
                read[0] += batch.num_rows
                yield batch

        with postgres(s.postgres_conn_id) as conn:
            deletions.load_keys(conn, model, counted(bq.read_tenant_keys(model, source, s.tenant_id)))
            gone = deletions.count_all_missing(conn, model, s.tenant_id)
        total = read[0]
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
        log.info(
            "dry run: %d target rows of tenant %s in %s have a key that is not in %s now (deleted there since an "
            "earlier sync)%s",
            gone,
            s.tenant_id,
            model.target_table,
            source,
            "; delete_missing would delete those written before its plan" if gone else "",
        )
        _check_chunk_count(total, s.chunk_size, max_map_length)
        return []

    with postgres(s.postgres_conn_id) as conn:
        job = ledger.find_run_job(conn, run)
        if job is None:
            raise LookupError(
                f"dag run {run.run_id} has no job: a later run's cleanup deleted it, or cleanup_stale_jobs did not "
                "run; trigger a new run (or clear this run from cleanup_stale_jobs)"
            )
        # also when plan alone is cleared
        ledger.refuse_old_snapshot(conn, job, s.tenant_id, s.model_type, s.max_snapshot_age_hours)
    model = ledger.run_model(s.declaration, job)
    if job.snapshot_table is None:
        job = _take_snapshot(s, run, bq, source, job, model, max_map_length)
    else:  # a retried or cleared plan keeps the first plan's snapshot, chunking and offsets
        assert job.snapshot_at is not None and job.chunk_size is not None
        if job.chunk_size != s.chunk_size:
            log.info("run already planned with chunk_size %d: keeping it", job.chunk_size)
        snapshot = bq.table(job.snapshot_table)
        bq.locate(source, snapshot.dataset)
        total = bq.keep_snapshot(model, source, s.tenant_id, snapshot, job.snapshot_at, job.chunk_size)
        if total != job.total_records:
            raise RuntimeError(f"snapshot {snapshot} now has {total} rows but job {job.id} planned {job.total_records}")
    assert job.total_records is not None and job.chunk_size is not None

    with postgres(s.postgres_conn_id) as conn:
        todo = ledger.plan_chunks(conn, job)
    chunks = -(-job.total_records // job.chunk_size)
    log.info(
        "job %s: %d rows in %d chunks of %d; %d chunks to do, %d already done",
        job.id,
        job.total_records,
        chunks,
        job.chunk_size,
        len(todo),
        chunks - len(todo),
    )
    # The snapshot's name and the model's columns let a chunk start reading before it reaches Postgres (it still
    # checks the snapshot against the job, and the columns against the target).
    columns = model.as_record()
    return [{"job_id": job.id, "chunks": chunks, "snapshot": job.snapshot_table, "columns": columns, **c} for c in todo]


def _take_snapshot(
    s: Settings,
    run: RunKey,
    bq: BigQuerySource,
    source: TableRef,
    job: ledger.Job,
    model: Model,
    max_map_length: int,
) -> ledger.Job:
    """A new snapshot as of now, recorded on the job; dropped again if the plan cannot go on with it."""
    snapshot = TableRef(bq.project, s.scratch_dataset, snapshot_name(model, s.tenant_id, run.dag_id, run.run_id))
    location = bq.locate(source, s.scratch_dataset)  # before any query: a mismatch fails here
    log.info(
        "source %s and scratch dataset %s are in %s: every query job runs there", source, s.scratch_dataset, location
    )
    with postgres(s.postgres_conn_id) as conn:  # taken first: a row written after it is after the as-of time too
        target_snapshot = conn.execute("SELECT pg_current_snapshot()::text").fetchone()[0]
    as_of = bq.now()
    # The estimate (a dry run: free, runs nothing) does not depend on the as-of time. With a cap it is checked
    # before the snapshot query is sent: nothing is billed for a refused run. Without one it is only reported, so it
    # is asked for while the snapshot is made (a dry run takes a round trip; the emulator even runs the query).
    with ThreadPoolExecutor(1, thread_name_prefix="dry-run") as pool:
        estimating = pool.submit(bq.estimate_snapshot_bytes, model, source, s.tenant_id)
        if s.maximum_bytes_billed is not None:
            estimate = estimating.result()
            log.info("%s", _bytes_line(estimate, s.maximum_bytes_billed))
            _check_bytes(estimate, s.maximum_bytes_billed, source)
        # The plan's size decides whether it can run at all: known from a count billed on the tenant column alone,
        # before the snapshot query bills every column.
        expected = bq.count_tenant_rows(model, source, s.tenant_id, as_of)
        _check_source_rows(expected, s, source, as_of)
        _check_chunk_count(expected, s.chunk_size, max_map_length)
        started = time.monotonic()
        # Replaces a table of that name left by an earlier attempt: its as-of time was never recorded, so unused.
        total = bq.new_snapshot(model, source, s.tenant_id, snapshot, as_of, s.chunk_size)
        if s.maximum_bytes_billed is None:
            try:
                estimate = estimating.result()
            except BaseException:
                bq.drop_snapshot(snapshot)  # not recorded yet: nothing else would drop it
                raise
            log.info("%s", _bytes_line(estimate, None))
    log.info(
        "snapshot %s: %d rows of tenant %s as of %s (%.1f s)",
        snapshot,
        total,
        s.tenant_id,
        as_of,
        time.monotonic() - started,
    )
    try:
        if total > expected:
            raise RuntimeError(
                f"snapshot {snapshot} holds {total} rows, but {source} held {expected} rows of tenant {s.tenant_id} "
                f"as of {as_of:%Y-%m-%d %H:%M:%S%z}: BigQuery's time travel gave two answers; trigger again"
            )
        if total < expected:
            log.warning(
                "%d rows of tenant %s in %s share their conflict key (%s) with a later row by the order key (%s): "
                "the latest of each key is in the snapshot, the others are not written (duplicate_source_rows)",
                expected - total, s.tenant_id, source, ", ".join(model.conflict_key), ", ".join(model.order_key),
            )  # fmt: skip
        with postgres(s.postgres_conn_id) as conn:
            return ledger.record_plan(
                conn,
                job,
                total_records=total,
                chunk_size=s.chunk_size,
                source_table=str(source),
                snapshot_table=str(snapshot),
                snapshot_at=as_of,
                target_snapshot=target_snapshot,
                estimated_bytes=estimate,
                duplicate_source_rows=expected - total,
            )
    except BaseException:
        bq.drop_snapshot(snapshot)  # no job refers to it: nothing else would ever drop it
        raise


def _check_source_rows(total: int, s: Settings, source: TableRef, as_of: datetime) -> None:
    if total == 0 and not s.allow_empty_source:
        raise EmptySourceError(
            f"{source} holds no row of tenant {s.tenant_id} as of {as_of:%Y-%m-%d %H:%M:%S%z} "
            f"(tenant_id matched as {s.tenant_id!r} or {s.tenant_id.upper()!r}): check tenant_id and "
            "source_table; to complete a run with no rows on purpose, trigger with allow_empty_source=true"
        )


def _check_chunk_count(total: int, chunk_size: int, max_map_length: int) -> None:
    chunks = -(-total // chunk_size)
    limit, what = max_map_length, "[core] max_map_length"
    if MAX_SNAPSHOT_PARTITIONS < limit:
        limit, what = MAX_SNAPSHOT_PARTITIONS, "BigQuery's limit of partitions one job writes (one per chunk)"
    if chunks > limit:
        need = -(-total // limit)
        raise ValueError(
            f"{total} rows in chunks of {chunk_size} make {chunks} chunks, over {what} ({limit}): trigger again "
            f"with chunk_size >= {need}"
        )


def _bytes_line(estimate: int, cap: int | None) -> str:
    verdict = "no cap (maximum_bytes_billed)" if cap is None else f"cap maximum_bytes_billed {cap:,}"
    if cap is not None and estimate > cap:
        verdict += ": the run would be refused"
    return f"BigQuery estimates the snapshot query at {estimate:,} bytes processed ({_human(estimate)}); {verdict}"


def _check_bytes(estimate: int, cap: int | None, source: TableRef) -> None:
    """Refuses, before anything is billed, a snapshot whose query BigQuery estimates above the cap."""
    if cap is not None and estimate > cap:
        raise BytesCapError(
            f"the snapshot query over {source} would process {estimate:,} bytes ({_human(estimate)}, BigQuery's "
            f"dry-run estimate), over maximum_bytes_billed {cap:,} ({_human(cap)}): nothing was billed. Trigger "
            "again with a larger maximum_bytes_billed if that cost is expected"
        )


def _human(n: int) -> str:
    size, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            break
        size /= 1024
    return f"{size:.1f} {unit}"

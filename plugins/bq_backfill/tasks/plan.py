"""plan_chunks: the run's snapshot, its job row and the chunks still to do."""

from __future__ import annotations

import logging
import time
from collections import Counter
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
from bq_backfill.tasks.cleanup import fleet, resolve_model

log = logging.getLogger(__name__)
MAX_CHUNK_SIZE = 1_000_000  # the Param chunk_size's maximum: a chunk task's memory grows with it


def plan_chunks(s: Settings, run: RunKey, max_map_length: int) -> list[dict[str, Any]]:
    """The run's chunks still to do. A chunk is a range of the run's snapshot, which holds the fleet's tenants one
    after the other: a small tenant shares a chunk with others, a large one spans several. Each chunk lists its
    parts, one per tenant (its job) with rows in it."""
    bq = bigquery(s.gcp_conn_id)
    bq.maximum_bytes_billed = s.maximum_bytes_billed
    source = source_table(s, bq)
    if s.dry_run:
        _dry_run(s, run, bq, source, max_map_length)
        return []
    with postgres(s.postgres_conn_id) as conn:
        jobs = ledger.find_run_jobs(conn, run)
        if not jobs:
            raise LookupError(
                f"dag run {run.run_id} has no job: a later run's cleanup deleted it, or cleanup_stale_jobs did not "
                "run; trigger a new run (or clear this run from cleanup_stale_jobs)"
            )
        # also when plan alone is cleared; a completed tenant has nothing left to write
        open_jobs = [j for j in jobs if j.status != "completed"]
        refusals = ledger.old_snapshot_refusals(conn, open_jobs, s.model_type, s.max_snapshot_age_hours)
        if refusals:
            raise next(iter(refusals.values()))
    bq.labels = job_labels(run.dag_id, s.model_type, [j.tenant_id for j in jobs], run.run_id)
    model = ledger.run_model(s.declaration, jobs[0])
    planned = [j for j in jobs if j.snapshot_table is not None]
    if not planned:
        jobs = _take_snapshot(s, run, bq, source, jobs, model, max_map_length)
    else:  # a retried or cleared plan keeps the first plan's snapshot, chunking and offsets
        jobs = _keep_snapshot(s, run, bq, source, jobs, planned, model)
    with postgres(s.postgres_conn_id) as conn:
        todo = ledger.plan_chunks(conn, [job for job in jobs if job.snapshot_table is not None])
    chunks = _merged_chunks(jobs, todo)
    size = next(j.chunk_size for j in jobs if j.chunk_size)
    total = sum(j.total_records or 0 for j in jobs)
    count = len({i for j in jobs for i in _chunk_indexes(j)})
    log.info(
        "%d tenant(s), %d rows in %d chunks of %d offsets; %d chunks to do, %d already done",
        len(jobs), total, count, size, len(chunks), count - len(chunks),
    )  # fmt: skip
    # The snapshot's name and the model's columns let a chunk start reading before it reaches Postgres (it still
    # checks the snapshot against each job, and the columns against the target).
    columns = model.as_record()
    snapshot = next(j.snapshot_table for j in jobs if j.snapshot_table)
    return [{"chunks": count, "snapshot": snapshot, "columns": columns, **c} for c in chunks]


def _chunk_indexes(job: ledger.Job) -> range:
    if not job.total_records or not job.chunk_size:
        return range(0)
    first = job.snapshot_offset // job.chunk_size
    return range(first, (job.snapshot_offset + job.total_records - 1) // job.chunk_size + 1)


def _merged_chunks(jobs: list[ledger.Job], todo: dict[str, list[dict[str, int]]]) -> list[dict[str, Any]]:
    """The run's chunks not done, each with its parts (job, tenant, offsets), by chunk index; and a label naming
    its tenants and offsets (the mapped task's name in the grid)."""
    tenants = {j.id: j.tenant_id for j in jobs}
    by_index: dict[int, list[dict[str, Any]]] = {}
    for job_id, parts in todo.items():
        for part in parts:
            by_index.setdefault(part["chunk_index"], []).append(
                {"job_id": job_id, "tenant_id": tenants[job_id], "start": part["start"], "end": part["end"]}
            )
    chunks = []
    for index in sorted(by_index):
        parts = sorted(by_index[index], key=lambda p: p["start"])
        start, end = parts[0]["start"], parts[-1]["end"]
        chunks.append({"chunk_index": index, "start": start, "end": end, "parts": parts, "label": _label(parts)})
    return chunks


def _label(parts: list[dict[str, Any]]) -> str:
    first = parts[0]
    if len(parts) == 1:
        return f"tenant {first['tenant_id']} [{first['start']}, {first['end']})"
    last = parts[-1]
    return f"{len(parts)} tenants {first['tenant_id'][:8]}…{last['tenant_id'][:8]} [{first['start']}, {last['end']})"


def _dry_run(s: Settings, run: RunKey, bq: BigQuerySource, source: TableRef, max_map_length: int) -> None:
    with postgres(s.postgres_conn_id) as conn:  # a dry run's cleanup recorded nothing
        model = resolve_model(s, bq, source, conn).model
    tenants = fleet(s, bq, source, model)
    bq.labels = job_labels(run.dag_id, s.model_type, tenants, run.run_id)
    bq.locate(source, s.scratch_dataset, create=False)
    estimate = bq.estimate_snapshot_bytes(model, source, tenants)
    log.info("dry run: %s", _bytes_line(estimate, s.maximum_bytes_billed))
    rows: Counter[str] = Counter()
    for at in range(0, len(tenants), DRY_RUN_TENANTS_PER_READ):
        group = tenants[at : at + DRY_RUN_TENANTS_PER_READ]
        # One read of the tenants' key columns, streamed into a temp table (gone with the transaction: nothing
        # written), gives both their row counts and what the target holds beyond them.
        with postgres(s.postgres_conn_id) as conn:
            batches = _counted(bq.read_tenant_keys(model, source, group), rows, model.tenant_column)
            deletions.load_keys(conn, model, batches, tenants=True)
            gone = deletions.count_all_missing(conn, model, group)
        for tenant in group:
            log.info(
                "dry run: tenant %s has %d rows in %s; %d of its target rows in %s have a key that is not in %s now "
                "(deleted there since an earlier sync)%s",
                tenant, rows[tenant], source, gone[tenant], model.target_table, source,
                "; delete_missing would delete those written before its plan" if gone[tenant] else "",
            )  # fmt: skip
    total = sum(rows.values())
    size = fit_chunk_size(total, s.chunk_size, max_map_length)
    log.info(
        "dry run: %d tenant(s), %d rows; plan would be %d chunks of %d rows (max_map_length %d); nothing written",
        len(tenants), total, -(-total // size), size, max_map_length,
    )  # fmt: skip


# Tenants whose keys a dry run reads with one read session (each is named in its row restriction)
DRY_RUN_TENANTS_PER_READ = 500


def _counted(batches: Iterator[pa.RecordBatch], rows: Counter[str], tenant_column: str) -> Iterator[pa.RecordBatch]:
    """The batches, each batch's rows counted by tenant on the way."""
    for batch in batches:
        counts = batch.column(tenant_column).value_counts()
        rows.update(dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True)))
        yield batch


def _keep_snapshot(
    s: Settings,
    run: RunKey,
    bq: BigQuerySource,
    source: TableRef,
    jobs: list[ledger.Job],
    planned: list[ledger.Job],
    model: Model,
) -> list[ledger.Job]:
    """The first plan's snapshot, made again if it is gone; each planned job's rows checked against it. A job the
    first plan did not plan (its tenant had no rows) stays out."""
    first = planned[0]
    assert first.snapshot_at is not None and first.chunk_size is not None and first.snapshot_table is not None
    if first.chunk_size != s.chunk_size:
        log.info("run already planned with chunk_size %d: keeping it", first.chunk_size)
    snapshot = bq.table(first.snapshot_table)
    bq.locate(source, snapshot.dataset)
    bases = {j.tenant_id: j.snapshot_offset for j in planned}
    counts = bq.keep_snapshot(model, source, bases, snapshot, first.snapshot_at, first.chunk_size)
    for job in planned:
        if counts.get(job.tenant_id, 0) != job.total_records:
            raise RuntimeError(
                f"snapshot {snapshot} now has {counts.get(job.tenant_id, 0)} rows of tenant {job.tenant_id} but job "
                f"{job.id} planned {job.total_records}"
            )
    unplanned = [j for j in jobs if j.snapshot_table is None]
    if unplanned:
        with postgres(s.postgres_conn_id) as conn:
            for job in unplanned:
                why = f"tenant {job.tenant_id} had no row in {source} when this run was planned"
                ledger.fail_job(conn, run, why, job_id=job.id)
    return jobs


def _take_snapshot(
    s: Settings,
    run: RunKey,
    bq: BigQuerySource,
    source: TableRef,
    jobs: list[ledger.Job],
    model: Model,
    max_map_length: int,
) -> list[ledger.Job]:
    """A new snapshot of the fleet as of now, recorded on each tenant's job; dropped again if the plan cannot go on
    with it."""
    tenants = [j.tenant_id for j in jobs]
    snapshot = TableRef(bq.project, s.scratch_dataset, snapshot_name(model, tenants, run.dag_id, run.run_id))
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
        estimating = pool.submit(bq.estimate_snapshot_bytes, model, source, tenants)
        if s.maximum_bytes_billed is not None:
            estimate = estimating.result()
            log.info("%s", _bytes_line(estimate, s.maximum_bytes_billed))
            _check_bytes(estimate, s.maximum_bytes_billed, source)
        # The plan's size decides whether it can run at all: known from a count billed on the tenant column alone,
        # before the snapshot query bills every column. It also gives each tenant its first offset.
        expected = bq.count_tenant_rows(model, source, tenants, as_of)
        empty = [t for t in tenants if not expected.get(t)]
        if empty and not s.allow_empty_source:
            if len(empty) == len(tenants):
                _check_source_rows(0, s, source, as_of, empty)
            log.error(
                "%d tenant(s) have no row in %s as of %s: their jobs fail, the others go on: %s",
                len(empty), source, as_of, ", ".join(empty[:20]) + (" …" if len(empty) > 20 else ""),
            )  # fmt: skip
        bases, offset = {}, 0
        for tenant in tenants:
            if expected.get(tenant) or s.allow_empty_source:
                bases[tenant] = offset
                offset += expected.get(tenant, 0)
        chunk_size = fit_chunk_size(offset, s.chunk_size, max_map_length)
        started = time.monotonic()
        # Replaces a table of that name left by an earlier attempt: its as-of time was never recorded, so unused.
        counts = bq.new_snapshot(model, source, bases, snapshot, as_of, chunk_size)
        if s.maximum_bytes_billed is None:
            try:
                estimate = estimating.result()
            except BaseException:
                bq.drop_snapshot(snapshot)  # not recorded yet: nothing else would drop it
                raise
            log.info("%s", _bytes_line(estimate, None))
    log.info(
        "snapshot %s: %d rows of %d tenant(s) as of %s (%.1f s)",
        snapshot, sum(counts.values()), len(bases), as_of, time.monotonic() - started,
    )  # fmt: skip
    try:
        for tenant in bases:
            got, had = counts.get(tenant, 0), expected.get(tenant, 0)
            if got > had:
                raise RuntimeError(
                    f"snapshot {snapshot} holds {got} rows of tenant {tenant}, but {source} held {had} as of "
                    f"{as_of:%Y-%m-%d %H:%M:%S%z}: BigQuery's time travel gave two answers; trigger again"
                )
            if got < had:
                log.warning(
                    "%d rows of tenant %s in %s share their conflict key (%s) with a later row by the order key "
                    "(%s): the latest of each key is in the snapshot, the others are not written "
                    "(duplicate_source_rows)",
                    had - got, tenant, source, ", ".join(model.conflict_key), ", ".join(model.order_key),
                )  # fmt: skip
        plans = [
            ledger.PlanRecord(
                job_id=job.id,
                total_records=counts.get(job.tenant_id, 0),
                chunk_size=chunk_size,
                source_table=str(source),
                snapshot_table=str(snapshot),
                snapshot_at=as_of,
                target_snapshot=target_snapshot,
                estimated_bytes=estimate,
                duplicate_source_rows=expected.get(job.tenant_id, 0) - counts.get(job.tenant_id, 0),
                snapshot_offset=bases[job.tenant_id],
            )
            for job in jobs
            if job.tenant_id in bases
        ]
        with postgres(s.postgres_conn_id) as conn:  # every job's plan in one transaction: all planned, or none
            for job in jobs:
                if job.tenant_id not in bases:
                    why = _empty_message(source, as_of, job.tenant_id) + " (the fleet's other tenants go on)"
                    ledger.fail_job(conn, run, why, job_id=job.id)
            planned = {j.id: j for j in ledger.record_plans(conn, plans)}
        recorded = [planned.get(job.id, job) for job in jobs]
        return recorded
    except BaseException:
        bq.drop_snapshot(snapshot)  # no job refers to it: nothing else would ever drop it
        raise


def fit_chunk_size(total: int, chunk_size: int, max_map_length: int) -> int:
    """`chunk_size`, or the least size that keeps the run's chunks within [core] max_map_length and BigQuery's
    partitions per job (one per chunk); refused past MAX_CHUNK_SIZE."""
    limit, what = max_map_length, "[core] max_map_length"
    if MAX_SNAPSHOT_PARTITIONS < limit:
        limit, what = MAX_SNAPSHOT_PARTITIONS, "BigQuery's limit of partitions one job writes (one per chunk)"
    need = max(chunk_size, -(-total // limit))
    if need > MAX_CHUNK_SIZE:
        raise ValueError(
            f"{total} rows make more than {limit} chunks ({what}) even of {MAX_CHUNK_SIZE} rows: back the fleet "
            f"up in several runs of at most {limit * MAX_CHUNK_SIZE} rows, or raise {what}"
        )
    if need != chunk_size:
        log.info(
            "%d rows in chunks of %d would make %d chunks, over %s (%d): chunks of %d instead",
            total, chunk_size, -(-total // chunk_size), what, limit, need,
        )  # fmt: skip
    return need


def _empty_message(source: TableRef, as_of: datetime, tenant: str) -> str:
    return (
        f"{source} holds no row of tenant {tenant} as of {as_of:%Y-%m-%d %H:%M:%S%z} "
        f"(tenant_id matched as {tenant!r} or {tenant.upper()!r}): check tenant_id and "
        "source_table; to complete a run with no rows on purpose, trigger with allow_empty_source=true"
    )


def _check_source_rows(total: int, s: Settings, source: TableRef, as_of: datetime, tenants: list[str]) -> None:
    if total == 0 and not s.allow_empty_source:
        raise EmptySourceError(
            "; ".join(_empty_message(source, as_of, t) for t in tenants[:5]) + (" …" if len(tenants) > 5 else "")
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

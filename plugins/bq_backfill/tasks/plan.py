"""plan_chunks: the run's snapshot, its job row and the chunks still to do."""

from __future__ import annotations

import logging
import time
from typing import Any

from bq_backfill import ledger
from bq_backfill.connections import bigquery, postgres, source_table
from bq_backfill.ledger import RunKey
from bq_backfill.settings import Settings
from bq_backfill.source import TableRef, snapshot_name

log = logging.getLogger(__name__)


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

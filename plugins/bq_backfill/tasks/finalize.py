"""finalize: reconcile the run's counts and keys, then complete the job (or fail it, naming what did not finish)."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

from bq_backfill import ledger, range_proofs, sink
from bq_backfill.connections import bigquery, postgres
from bq_backfill.errors import ReconciliationError, UpstreamNotDoneError
from bq_backfill.ledger import RunKey
from bq_backfill.settings import Settings

log = logging.getLogger(__name__)


KEY_CHECK_ROWS = 100_000


def finalize(s: Settings, run: RunKey, upstream_not_done: list[str] | None = None) -> dict[str, int]:
    """`upstream_not_done`: cleanup and plan tasks that did not succeed (e.g. "plan_chunks upstream_failed")."""
    if upstream_not_done:
        # A leaf that succeeds would make the run a success; and the failing task's own callback has recorded its
        # error on the job, which a summary of older chunk failures must not replace.
        raise UpstreamNotDoneError(
            f"{'dry run' if s.dry_run else 'run'} did not finish: {', '.join(upstream_not_done)}"
        )
    if s.dry_run:
        log.info("dry run: nothing was written, nothing to finalize")
        return {}
    model = s.model
    with postgres(s.postgres_conn_id) as conn:
        job = ledger.find_run_job(conn, run)
        if job is None:
            # fail, not skip: a skipped leaf would let Airflow call the run a success
            raise ReconciliationError(f"no job for dag run {run.run_id}: cleanup or plan failed before creating it")
        ledger.refuse_if_superseded(conn, job, s.tenant_id, s.model_type)
        totals = ledger.chunk_totals(conn, job.id)
        unfinished = ledger.unfinished_chunks(conn, job.id)
        if job.snapshot_table is None:
            if job.status == "failed":  # plan's own failure callback said why: keep its message
                raise ReconciliationError(f"job {job.id} failed before it was planned: {job.error_message}")
            message = "plan_chunks did not record a snapshot (it failed or did not run)"
            ledger.fail_job(conn, run, message)
            raise ReconciliationError(f"job {job.id}: {message}")
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
    assert job.total_records is not None  # recorded with the snapshot
    problems = _count_problems(totals, job.total_records)

    bq = bigquery(s.gcp_conn_id)
    snapshot = bq.table(job.snapshot_table)
    if not problems:
        # Every key of the snapshot must be in the target: checked 100,000 offsets at a time (bounded memory),
        # two ranges at once (read-only, each on its own connection: both cores busy).
        def missing_in(lo: int) -> int:
            hi = min(lo + KEY_CHECK_ROWS, job.total_records)
            keys = bq.read_rows(snapshot, lo, hi, [*model.conflict_key[1:], sink.OFFSET_COLUMN])
            if keys.num_rows != hi - lo:
                raise ReconciliationError(
                    f"job {job.id}: snapshot {snapshot} gave {keys.num_rows} keys for offsets [{lo}, {hi}), "
                    f"expected {hi - lo}: the snapshot changed since the chunks read it"
                )
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
    try:
        bq.drop_snapshot(snapshot)
    except Exception as exc:  # the backfill is complete; the scratch table expires by itself (7 days)
        log.warning(
            "job %s completed, but its snapshot %s was not dropped (it expires within 7 days): %s",
            job.id,
            snapshot,
            exc,
        )
    log.info(
        "job %s completed: %d rows read = %d inserted + %d updated + %d unchanged + %d duplicate + %d rejected "
        "(%d with a number rounded); every source key is in %s; %d range proofs of earlier runs dropped",
        job.id,
        totals["read"],
        totals["inserted"],
        totals["updated"],
        totals["unchanged"],
        totals["duplicate"],
        totals["rejected"],
        totals["rounded"],
        model.target_table,
        dropped,
    )
    return totals


def _count_problems(totals: dict[str, int], snapshot_rows: int) -> list[str]:
    """What does not add up in the chunks' counts. Each count was taken where it happened (see chunk._tally), so
    any of these can fail: rows a trigger swallowed, a chunk that read the wrong rows, a quarantine row lost."""
    problems = []
    if totals["read"] != snapshot_rows:
        problems.append(f"rows read {totals['read']} != snapshot rows {snapshot_rows}")
    accounted = sum(totals[k] for k in ("inserted", "updated", "unchanged", "duplicate", "rejected"))
    if totals["read"] != accounted:
        problems.append(
            f"rows read {totals['read']} != inserted {totals['inserted']} + updated {totals['updated']} + unchanged "
            f"{totals['unchanged']} + duplicate {totals['duplicate']} + rejected {totals['rejected']} = {accounted} "
            "(a trigger or rule on the target skipped or changed rows?)"
        )
    if totals["quarantined"] != totals["rejected"]:
        problems.append(f"rows rejected {totals['rejected']} != rows in backfill_quarantine {totals['quarantined']}")
    return problems

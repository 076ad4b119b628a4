"""finalize: reconcile each job's counts and keys, then complete it (or fail it, naming what did not finish)."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg

from bq_backfill import assets, chunk_proofs, deletions, ledger, range_proofs, sink, slicing, target_checks
from bq_backfill.connections import bigquery, postgres, postgres_transactions
from bq_backfill.errors import FleetIncompleteError, ReconciliationError, UpstreamNotDoneError
from bq_backfill.ledger import RunKey
from bq_backfill.models import Model, ModelMismatchError
from bq_backfill.settings import Settings
from bq_backfill.source import BigQuerySource, TableRef

log = logging.getLogger(__name__)


KEY_CHECK_ROWS = 100_000
# Chunks whose keys are checked at once: their read sessions' round trips overlap, and the checks keep both cores busy.
KEY_CHECK_THREADS = 3


def finalize(
    s: Settings, run: RunKey, upstream_not_done: list[str] | None = None, refused: dict[str, str] | None = None
) -> dict[str, Any]:
    """Finalizes each tenant's job of the run on its own: a tenant whose job does not reconcile fails that job,
    naming why, and the others still complete. Fails naming the failed tenants (and those cleanup refused) if any.
    `upstream_not_done`: cleanup and plan tasks that did not succeed (e.g. "plan_chunks upstream_failed").
    Returns the summed counts, the target table's Asset URI and each completed job's counts (nothing for a dry
    run)."""
    if upstream_not_done:
        # A leaf that succeeds would make the run a success; and the failing task's own callback has recorded its
        # error on the job, which a summary of older chunk failures must not replace.
        raise UpstreamNotDoneError(
            f"{'dry run' if s.dry_run else 'run'} did not finish: {', '.join(upstream_not_done)}"
        )
    if s.dry_run:
        log.info("dry run: nothing was written, nothing to finalize")
        return {}
    with postgres(s.postgres_conn_id) as conn:
        jobs = ledger.find_run_jobs(conn, run)
    if not jobs:
        # fail, not skip: a skipped leaf would let Airflow call the run a success
        raise ReconciliationError(f"no job for dag run {run.run_id}: cleanup or plan failed before creating it")
    bq = bigquery(s.gcp_conn_id)
    failed: dict[str, str] = dict(refused or {})
    done: list[dict[str, Any]] = []
    with postgres_transactions(s.postgres_conn_id) as transaction:  # one connection, the jobs one after the other
        with transaction() as conn:
            read = ledger.job_chunks(conn, [j.id for j in jobs])
            unfinished = [j for j in jobs if j.status != "completed"]
            refusals = ledger.old_snapshot_refusals(conn, unfinished, s.model_type, s.max_snapshot_age_hours)
            asset_uri = None
            if any(j.model_columns for j in jobs):
                model = ledger.run_model(s.declaration, next(j for j in jobs if j.model_columns))
                asset_uri = assets.target_uri(s.postgres_conn_id, conn, model.target_table)
        checks: list[tuple[ledger.Job, Model]] = []
        for job in jobs:  # what each job's own ledger rows show, before any row of the target is read
            try:
                model = _check_job(s.for_tenant(job.tenant_id), run, job, read[job.id], refusals, transaction)
            except FINALIZE_REFUSALS as exc:
                _refused(run, job, exc, failed, transaction, alone=len(jobs) == 1 and not refused)
                continue
            if job.status == "completed":  # a cleared finalize of a fleet some of whose tenants had completed
                done.append(_result(s.for_tenant(job.tenant_id), job, model, read[job.id].totals, asset_uri))
            else:
                checks.append((job, model))
        exact = _proven_exact(checks, read, transaction)
        _complete_exact(s, run, [(j, m) for j, m in checks if j.id in exact], read, transaction)
        for job, model in checks:
            try:
                if job.id in exact:
                    done.append(_result(s.for_tenant(job.tenant_id), job, model, read[job.id].totals, asset_uri))
                else:
                    ts = s.for_tenant(job.tenant_id)
                    done.append(_finalize_job(ts, run, bq, job, model, read[job.id], asset_uri, transaction))
            except FINALIZE_REFUSALS as exc:
                _refused(run, job, exc, failed, transaction, alone=len(jobs) == 1 and not refused)
    if failed:
        raise FleetIncompleteError(
            f"{len(failed)} of {len(jobs) + len(refused or {})} tenants did not complete (each its job's error), "
            f"{len(done)} did: "
            + "; ".join(f"tenant {t}: {why}" for t, why in list(failed.items())[:10])
            + (f"; and {len(failed) - 10} more" if len(failed) > 10 else "")
            + (". Tenants refused at cleanup have no job in this run: trigger a new run for them" if refused else "")
        )
    snapshot = next((j.snapshot_table for j in jobs if j.snapshot_table), None)
    if snapshot:
        try:
            bq.drop_snapshot(bq.table(snapshot))
        except Exception as exc:  # the backfill is complete; the scratch table expires by itself (7 days)
            log.warning(
                "run completed, but its snapshot %s was not dropped (it expires within 7 days): %s", snapshot, exc
            )
    counted = [k for k, v in done[0].items() if isinstance(v, int) and not isinstance(v, bool)]
    totals = {k: sum(int(d.get(k, 0)) for d in done) for k in counted}
    if len(done) > 1:
        log.info(
            "%d tenants completed: %d rows read = %d inserted + %d updated + %d unchanged + %d duplicate + %d "
            "rejected",
            len(done), totals["read"], totals["inserted"], totals["updated"], totals["unchanged"], totals["duplicate"],
            totals["rejected"],
        )  # fmt: skip
    first = done[0]
    return {
        **totals,
        "job_id": first["job_id"],
        "model_type": s.model_type,
        "source_table": first["source_table"],
        "columns": first["columns"],
        "asset_uri": first["asset_uri"],
        "tenant_column": s.declaration.tenant_column,
        "jobs": [
            {
                "job_id": d["job_id"],
                "tenant_id": d["tenant_id"],
                **{k: d[k] for k in ("inserted", "updated", "unchanged", "rejected")},
            }
            for d in done
        ],
    }


# What fails one tenant's job in finalize and lets the fleet's others complete
FINALIZE_REFUSALS = (ReconciliationError, ledger.SupersededError, ledger.SnapshotTooOldError, ModelMismatchError)


def _refused(
    run: RunKey, job: ledger.Job, exc: Exception, failed: dict[str, str], transaction: Callable[[], Any], alone: bool
) -> None:
    if alone:
        raise exc  # its failure callback records it on the job
    failed[job.tenant_id] = str(exc)
    log.error("tenant %s: %s", job.tenant_id, exc)
    with transaction() as conn:
        ledger.fail_job(conn, run, f"finalize: {exc}", job_id=job.id)


def _check_job(
    s: Settings,
    run: RunKey,
    job: ledger.Job,
    read: ledger.JobChunks,
    refusals: dict[str, Exception],
    transaction: Callable[[], Any],
) -> Model:
    """The job's model, once its ledger rows show it can be reconciled: planned, every chunk done, its snapshot
    still the newest and young enough, no write by the old loop meanwhile, counts that add up. Else
    ReconciliationError (or the refusal), the job failed naming why."""
    if job.status == "completed":
        return ledger.run_model(s.declaration, job)
    if job.id in refusals:
        raise refusals[job.id]
    if job.snapshot_table is None:
        if job.status == "failed":  # plan's own failure callback said why: keep its message
            raise ReconciliationError(f"job {job.id} failed before it was planned: {job.error_message}")
        message = "plan_chunks did not record a snapshot (it failed or did not run)"
        with transaction() as conn:
            ledger.fail_job(conn, run, message, job_id=job.id)
        raise ReconciliationError(f"job {job.id}: {message}")
    model = ledger.run_model(s.declaration, job)
    if read.unfinished:
        # Runs whatever happened upstream (trigger rule all_done): a chunk task killed before its own failure
        # callback ran must not leave the job `running`.
        message = f"{len(read.unfinished)} of {len(read.chunks)} chunks did not finish: " + "; ".join(
            f"#{c['chunk_index']} [{c['start_offset']}, {c['end_offset']}) "
            + (c["error_message"] or "no error recorded (task killed or lost); clear it to run it again")
            for c in read.unfinished[:10]
        )
        with transaction() as conn:
            ledger.fail_job(conn, run, message, job_id=job.id)
        raise ReconciliationError(f"job {job.id}: {message}")
    if read.legacy:
        raise ReconciliationError(
            f"job {job.id}: the old backfill loop wrote while this run did (its job "
            + ", ".join(f"{j['id']} {j['status']} at {j['last_activity']:%Y-%m-%d %H:%M:%S%z}" for j in read.legacy)
            + f"), so rows of tenant {s.tenant_id} in {model.target_table} may hold its older values. Stop the old "
            "loop (README: Migrating from the old loop), then trigger a new run: its cleanup removes those jobs"
        )
    assert job.total_records is not None  # recorded with the snapshot
    problems = _count_problems(read.totals, job.total_records)
    if problems:
        raise ReconciliationError(f"job {job.id} does not reconcile: " + "; ".join(problems))
    return model


def _proven_exact(
    checks: list[tuple[ledger.Job, Model]], read: dict[str, ledger.JobChunks], transaction: Callable[[], Any]
) -> set[str]:
    """The jobs every chunk of which proved its key range (chunk_proofs), with nothing rejected, whose tenant's
    target rows are still exactly those chunks' rows: one aggregate over all of them shows at once that every
    chunk's rows are still there and that the tenant has no other row (nothing to count for deletions)."""
    if not checks:
        return set()
    with transaction() as conn:
        candidates: dict[str, list[dict[str, Any]]] = {}
        jobs = {}
        for job, _ in checks:
            facts = read[job.id]
            proofs = [proof for _, proof in facts.key_proofs.values() if range_proofs.trusted(conn, proof.get("epoch"))]
            if facts.chunks and len(proofs) == len(facts.chunks) and facts.totals["rejected"] == 0:
                candidates[job.tenant_id], jobs[job.tenant_id] = proofs, job.id
        holding = chunk_proofs.tenants_hold_only(conn, checks[0][1], candidates)
    exact = {jobs[t] for t in holding}
    if len(checks) == 1 and exact:
        log.info(
            "key check: the tenant's target rows are its %d chunks' proven rows, no more",
            len(candidates[holding.pop()]),
        )
    elif exact:
        log.info(
            "key check: %d of %d tenants' target rows are their chunks' proven rows, no more (one aggregate)",
            len(exact), len(checks),
        )  # fmt: skip
    return exact


def _complete_exact(
    s: Settings,
    run: RunKey,
    jobs: list[tuple[ledger.Job, Model]],
    read: dict[str, ledger.JobChunks],
    transaction: Callable[[], Any],
) -> None:
    """Completes, in one transaction, the jobs whose tenant's rows are exactly their proven chunks' rows: every
    source key is there, and no target row of the tenant is missing from the source."""
    if not jobs:
        return
    unrecorded = [job.id for job, _ in jobs if job.target_snapshot is None]  # planned before this was recorded
    if unrecorded:
        log.warning(
            "jobs %s: no plan-time Postgres snapshot recorded; rows missing from the source not counted",
            ", ".join(unrecorded[:10]),
        )
    with transaction() as conn:
        ledger.complete_jobs(conn, [(job.id, None if job.target_snapshot is None else 0, 0) for job, _ in jobs])
        # the ranges as this run left them; earlier runs' proofs describe states since replaced
        dropped = range_proofs.keep_only(conn, s.model_type, [(job.tenant_id, job.id) for job, _ in jobs])
    for job, model in jobs:
        totals = read[job.id].totals
        log.info(
            "job %s (tenant %s) completed: %d rows read = %d inserted + %d updated + %d unchanged + %d duplicate + "
            "%d rejected (%d with a number rounded); every source key is in %s; no target row of the tenant is "
            "missing from the source",
            job.id, job.tenant_id, totals["read"], totals["inserted"], totals["updated"], totals["unchanged"],
            totals["duplicate"], totals["rejected"], totals["rounded"], model.target_table,
        )  # fmt: skip
    log.info("%d jobs completed by their key proofs; %d range proofs of earlier runs dropped", len(jobs), dropped)


def _finalize_job(
    s: Settings,
    run: RunKey,
    bq: BigQuerySource,
    job: ledger.Job,
    model: Model,
    read: ledger.JobChunks,
    asset_uri: str | None,
    transaction: Callable[[], Any],
) -> dict[str, Any]:
    """One tenant's job whose chunks did not all prove their keys: its keys checked against the snapshot, its
    deletions counted (and made, on request), then completed; or failed naming why (ReconciliationError).
    `transaction`: the finalize task's connection, one transaction each time."""
    totals, chunk_ranges = read.totals, read.ranges
    assert job.total_records is not None and job.snapshot_table is not None
    with transaction() as conn:
        # a chunk's proof holds row versions of the cluster that took it: used only there, and while still young
        key_proofs = {
            lo: held for lo, held in read.key_proofs.items() if range_proofs.trusted(conn, held[1].get("epoch"))
        }  # fmt: skip
    problems: list[str] = []
    snapshot = bq.table(job.snapshot_table)
    # Every key of the snapshot must be in the target. A chunk that proved its key range (chunk_proofs) is checked
    # by one aggregate of that range's row versions. The others are read with one read session per chunk (its own
    # partition: the snapshot's key columns are read once in all), checked 100,000 offsets at a time (bounded
    # memory), three chunks at once (read-only, each on its own connection: both cores busy).
    key_cols = list(model.conflict_key[1:])
    proven_chunks: list[int] = []

    def check(rows: slicing.RowSlice) -> tuple[int, Range]:
        """Keys of [lo, hi) absent from the target; and the range's distinct keys, first and last key."""
        ordered = rows.rows  # in offset order, so in the order key's
        ends = ordered.select(key_cols)
        first, last = ends.slice(0, 1).to_pylist()[0], ends.slice(len(ends) - 1).to_pylist()[0]
        distinct = deletions.distinct_sorted_keys(model, ordered)
        with postgres(s.postgres_conn_id) as conn:
            missing = sink.missing_keys(conn, model, s.tenant_id, job.id, ordered)
        return rows.lo, (missing, distinct, _key(first, key_cols), _key(last, key_cols))

    def check_chunk(bounds: tuple[int, int]) -> list[tuple[int, Range]]:
        lo, hi = bounds
        if lo in key_proofs:
            rows_read, proof = key_proofs[lo]
            with postgres(s.postgres_conn_id) as conn:
                if chunk_proofs.still_holds(conn, model, s.tenant_id, proof):
                    proven_chunks.append(lo)
                    first, last = chunk_proofs.key_text(proof["first"]), chunk_proofs.key_text(proof["last"])
                    return [(lo, (0, rows_read, first, last))]
            log.info("chunk at offset %d: its key range changed since it proved it; reading its keys", lo)
        batches = bq.read_chunk(snapshot, lo, hi, [*model.conflict_key[1:], sink.OFFSET_COLUMN])
        try:
            return [check(r) for r in slicing.complete_slices(batches, lo, hi, KEY_CHECK_ROWS, sink.OFFSET_COLUMN)]
        except slicing.SnapshotReadError as exc:
            raise ReconciliationError(
                f"job {job.id}: snapshot {snapshot}: {exc}: the snapshot changed since the chunks read it"
            ) from exc

    with ThreadPoolExecutor(KEY_CHECK_THREADS, thread_name_prefix="key-check") as pool:
        checked = [r for part in pool.map(check_chunk, chunk_ranges) for r in part]
    ranges = [result for _, result in sorted(checked, key=lambda r: r[0])]
    missing = sum(r[0] for r in ranges)
    snapshot_keys = _distinct_keys(ranges)
    log.info(
        "key check: %d of %d chunks by their key proofs (one aggregate each), the others' keys read from %s",
        len(proven_chunks),
        len(chunk_ranges),
        snapshot,
    )
    if missing:
        problems.append(f"{missing} source keys of the snapshot have no row in {model.target_table}")
    if problems:
        raise ReconciliationError(f"job {job.id} does not reconcile: " + "; ".join(problems))
    if totals["rejected"] > s.max_rejected_rows:
        raise ReconciliationError(
            f"job {job.id}: {totals['rejected']} rows rejected, over max_rejected_rows={s.max_rejected_rows}; "
            f"see backfill_quarantine WHERE job_id = '{job.id}'"
        )
    with transaction() as conn:
        # checked again where the job completes: the key checks of the fleet's tenants before it can take hours
        ledger.refuse_old_snapshot(conn, job, s.model_type, s.max_snapshot_age_hours)
        # Deletions in the source: counted always, deleted on request, in the transaction that completes the job.
        rejected = totals["rejected"]
        gone, deleted = _missing_from_source(s, model, conn, bq, job, snapshot, chunk_ranges, rejected, snapshot_keys)
        ledger.complete_jobs(conn, [(job.id, gone, deleted)])
        # the ranges as this run left them; earlier runs' proofs describe states since replaced
        dropped = range_proofs.keep_only(conn, s.model_type, [(s.tenant_id, job.id)])
    log.info(
        "job %s (tenant %s) completed: %d rows read = %d inserted + %d updated + %d unchanged + %d duplicate + %d "
        "rejected (%d with a number rounded); every source key is in %s; %s target rows of the tenant not in the "
        "source (%d deleted); %d range proofs of earlier runs dropped",
        job.id,
        s.tenant_id,
        totals["read"],
        totals["inserted"],
        totals["updated"],
        totals["unchanged"],
        totals["duplicate"],
        totals["rejected"],
        totals["rounded"],
        model.target_table,
        "unknown" if gone is None else gone,
        deleted,
        dropped,
    )
    return _result(s, job, model, totals, asset_uri)


def _result(
    s: Settings, job: ledger.Job, model: Model, totals: dict[str, int], asset_uri: str | None
) -> dict[str, Any]:
    return {
        **totals,
        "job_id": job.id,
        "tenant_id": s.tenant_id,
        "model_type": s.model_type,
        "source_table": job.source_table,
        "columns": model.as_record(),
        "asset_uri": asset_uri,
    }


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


# A checked offset range: (keys missing from the target, distinct keys or None, first key, last key as key_text)
Range = tuple[int, int | None, str, str]


def _key(row: dict, columns: list[str]) -> str:
    return chunk_proofs.key_text([row[c] for c in columns])


def _distinct_keys(ranges: list[Range]) -> int | None:
    """Distinct keys of the whole snapshot from its ranges' counts: a key that ends one range and starts the next is
    one key. None if a range could not count them."""
    if any(r[1] is None for r in ranges):
        return None
    boundaries = sum(1 for a, b in itertools.pairwise(ranges) if a[3] == b[2])
    return sum(r[1] for r in ranges) - boundaries  # type: ignore[misc]


def _missing_from_source(
    s: Settings,
    model: Model,
    conn: psycopg.Connection,
    bq: BigQuerySource,
    job: ledger.Job,
    snapshot: TableRef,
    ranges: list[tuple[int, int]],
    rejected: int,
    snapshot_keys: int | None,
) -> tuple[int | None, int]:
    """(the tenant's target rows written before the plan whose key is not in the snapshot, rows deleted).

    Every key of the snapshot is in the target (checked just before). When nothing was quarantined and the tenant
    has exactly as many target rows as the snapshot has distinct keys, none is missing from the source: one count.
    Otherwise the snapshot's keys are loaded into a temp table and Postgres counts (and deletes) exactly."""
    assert job.total_records is not None
    if job.target_snapshot is None:  # planned before this was recorded
        log.warning("job %s: no plan-time Postgres snapshot recorded; rows missing from the source not counted", job.id)
        return None, 0
    if rejected == 0 and snapshot_keys is not None and deletions.tenant_rows(conn, model, s.tenant_id) == snapshot_keys:
        return 0, 0
    deletions.load_snapshot_keys(conn, model, bq, snapshot, ranges)
    gone, later = deletions.count_missing(conn, model, s.tenant_id, job.target_snapshot)
    log.info(
        "%d target rows of tenant %s have a key that is not in the source (deleted there since an earlier sync)%s",
        gone,
        s.tenant_id,
        f"; {later} more were written after the plan by someone else and are left alone" if later else "",
    )
    if not gone or not s.delete_missing:
        return gone, 0
    if gone > s.max_deleted_rows:
        with postgres(s.postgres_conn_id) as own:  # recorded although this transaction rolls back
            ledger.record_missing(own, job.id, gone)
        raise ReconciliationError(
            f"job {job.id}: {gone} target rows are missing from the source, over max_deleted_rows="
            f"{s.max_deleted_rows}: nothing deleted, job not completed; check them (tenant {s.tenant_id}, keys not in "
            f"{job.snapshot_table}) and trigger again with max_deleted_rows >= {gone} to delete them"
        )
    deleted = deletions.delete_missing(conn, model, s.tenant_id, job.target_snapshot)
    kept, _ = deletions.count_missing(conn, model, s.tenant_id, job.target_snapshot)
    if kept:  # a trigger (BEFORE DELETE ... RETURN NULL) or a rule: the tenant is not the snapshot
        triggers = target_checks.firing_triggers(conn, model, target_checks.DELETE)
        raise ReconciliationError(
            f"job {job.id}: delete_missing deleted {deleted} of {gone} target rows missing from the source; {kept} "
            f"are still in {model.target_table}: "
            + (f"trigger(s) {', '.join(triggers)} kept them" if triggers else "a rule or another session kept them")
            + "; nothing deleted, job not completed: disable such triggers while the backfill runs, then trigger again"
        )
    log.info("deleted %d target rows of tenant %s whose key is no longer in the source", deleted, s.tenant_id)
    return gone, deleted

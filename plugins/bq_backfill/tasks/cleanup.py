"""cleanup_stale_jobs: each tenant+model's stale ledger rows go, after both connections and the source are checked."""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import replace
from typing import Any

import psycopg

from bq_backfill import ledger, target_checks
from bq_backfill.connections import bigquery, postgres, source_table
from bq_backfill.errors import EmptySourceError, SourceReadError
from bq_backfill.ledger import RunKey
from bq_backfill.models import Model, Resolution, resolve
from bq_backfill.settings import UUID_PATTERN, FleetConfError, Settings, max_fleet_tenants
from bq_backfill.source import BigQuerySource, TableRef

log = logging.getLogger(__name__)
UUID = re.compile(UUID_PATTERN)


def airflow_run_active(dag_id: str, run_id: str) -> bool | None:
    """Whether Airflow says a dag run is queued or running (None: Airflow does not know that run)."""
    from airflow.sdk import get_current_context

    ti = get_current_context()["ti"]
    if ti.get_dr_count(dag_id=dag_id, run_ids=[run_id], states=["queued", "running"]):
        return True
    return False if ti.get_dr_count(dag_id=dag_id, run_ids=[run_id]) else None


# Tenants cleaned and claimed per transaction: each holds an advisory lock per tenant until it commits, and a
# server's lock table is shared by all sessions (max_locks_per_transaction x max_connections).
CLAIM_BATCH = 200


def cleanup_stale_jobs(s: Settings, run: RunKey, run_active: ledger.RunState = airflow_run_active) -> dict[str, Any]:
    """For each tenant of the run's fleet: deletes the tenant+model's stale jobs and claims this run's job, in one
    transaction: from then on no other job of the tenant+model can become active (the one-active-job index), while
    plan_chunks takes the snapshot. A tenant whose job belongs to a live run elsewhere (or that cannot be claimed
    for another reason) is refused by name; the others go on. Returns the counts and the refused tenants."""
    # Both connections, the source and the target are checked before anything is deleted: a broken setup or a
    # model that no longer fits fails here.
    bq = bigquery(s.gcp_conn_id)
    source = source_table(s, bq)
    with postgres(s.postgres_conn_id) as conn:
        ledger.check_schema(conn, s.declaration)
        resolution = resolve_model(s, bq, source, conn)
        model = resolution.model
        target_checks.check_target(conn, model, ledger.LEDGER_TABLES)
        index_exists = ledger.active_job_index_exists(conn)
    tenants = fleet(s, bq, source, model)
    totals: Counter[str] = Counter()
    refused: dict[str, str] = {}
    errors: dict[str, Exception] = {}
    created = 0
    verb = "would delete" if s.dry_run else "deleted"
    with postgres(s.postgres_conn_id) as conn:  # this run's jobs already there (a cleanup retried or cleared)
        own = {j.tenant_id: j for j in ledger.find_run_jobs(conn, run)}
    for at in range(0, len(tenants), CLAIM_BATCH):
        with postgres(s.postgres_conn_id) as conn:
            batch = tenants[at : at + CLAIM_BATCH]
            deleted, new, refusals = _claim(s, run, conn, model, resolution, run_active, batch, own)
            for tenant, exc in refusals.items():
                refused[tenant], errors[tenant] = str(exc), exc
                log.error("tenant %s refused: %s", tenant, exc)
            for tenant, counts in deleted.items():
                totals.update(counts)
                log.info(
                    "cleanup for tenant %s model %s: %s %d stale job rows (%d pending, %d running, %d failed) "
                    "and %d progress rows",
                    tenant, s.model_type, verb, counts["jobs_deleted"], counts["pending_deleted"],
                    counts["running_deleted"], counts["failed_deleted"], counts["progress_deleted"],
                )  # fmt: skip
            created += new
            if s.dry_run:
                raise psycopg.Rollback()  # the same statements, undone; the transaction block swallows it
    if len(refused) == len(tenants):
        if len(tenants) == 1:
            raise next(iter(errors.values()))
        raise FleetRefusedError(f"every tenant of the run was refused: {_named(refused)}")
    claimed = len(tenants) - len(refused)
    log.info(
        "cleanup of %d tenant(s) model %s: %s %d stale job rows (%d pending, %d running, %d failed) and %d progress "
        "rows; %d jobs claimed for dag run %s (%d created, %d taken back)%s; target table %s untouched",
        len(tenants), s.model_type, verb, totals["jobs_deleted"], totals["pending_deleted"], totals["running_deleted"],
        totals["failed_deleted"], totals["progress_deleted"], claimed, run.run_id, created, claimed - created,
        f"; {len(refused)} refused: {_named(refused)}" if refused else "", model.target_table,
    )  # fmt: skip
    _log_model(s, source, resolution)
    if not index_exists:
        log.warning(
            "the one-active-job index over every writer (bigquery_backfill_jobs_one_active) is not in place: "
            "run bigquery_backfill_setup (again, if legacy duplicates blocked it: each run's cleanup removes "
            "its own tenant+model's). This DAG's own jobs are protected by bigquery_backfill_jobs_one_active_run "
            "meanwhile"
        )
    if s.dry_run:
        log.info("dry run: cleanup rolled back, nothing deleted")
    return {**{k: int(v) for k, v in totals.items()}, "tenants": len(tenants), "refused": refused}


class FleetRefusedError(RuntimeError):
    """No tenant of the run could be claimed."""


def _named(refused: dict[str, str], shown: int = 10) -> str:
    names = "; ".join(f"{t}: {why}" for t, why in list(refused.items())[:shown])
    return names + (f"; and {len(refused) - shown} more" if len(refused) > shown else "")


def _claim(
    s: Settings,
    run: RunKey,
    conn: psycopg.Connection,
    model: Model,
    resolution: Resolution,
    run_active: ledger.RunState,
    tenants: list[str],
    own: dict[str, ledger.Job],
) -> tuple[dict[str, dict[str, int]], int, dict[str, Exception]]:
    """A batch of tenants' cleanup and claim, in one transaction, a statement or pipelined batch per step: under
    each tenant+model's lock, the tenants that cannot be claimed are found first (a live job of another run, the old
    loop still running, this run's snapshot too old or superseded, its model changed), then the others' stale jobs
    are deleted and their jobs created or taken back. Returns (rows deleted by tenant, jobs created, refusals)."""
    ledger.lock_tenant_models(conn, tenants, s.model_type)
    refused: dict[str, Exception] = dict(ledger.stale_job_refusals(conn, run, tenants, s.model_type, run_active))
    taken_back = [own[t] for t in tenants if t in own and t not in refused]
    old = ledger.old_snapshot_refusals(conn, taken_back, s.model_type, s.max_snapshot_age_hours)
    for job in taken_back:
        why = old.get(job.id) or ledger.model_mismatch(job, model)
        if why is not None:
            refused[job.tenant_id] = why
    claimable = [t for t in tenants if t not in refused]
    deleted = ledger.delete_stale_jobs(conn, run, claimable, s.model_type)
    claimed, refusals = ledger.claim_jobs(conn, run, claimable, s.model_type)
    refused.update(refusals)
    ledger.record_models(conn, [job for job, _ in claimed.values()], model, resolution.ignored)
    return deleted, sum(1 for _, created in claimed.values() if created), refused


def fleet(s: Settings, bq: BigQuerySource, source: TableRef, model: Model) -> list[str]:
    """The run's tenants, in lower case, sorted: those named, or every tenant in the source now but the excluded."""
    if not s.all_tenants:
        return sorted(s.tenant_ids)
    excluded = set(s.exclude_tenant_ids)
    bq.maximum_bytes_billed = s.maximum_bytes_billed  # the listing bills the tenant column: under the run's cap too
    listed = bq.list_tenants(model, source)
    tenants = [t for t in listed if UUID.match(t) and t not in excluded]
    strays = [t for t in listed if not UUID.match(t)]
    if strays:
        log.warning(
            "all_tenants: %d values of %s's tenant column are not uuids and are left out (e.g. %s)",
            len(strays), source, ", ".join(repr(t) for t in strays[:5]),
        )  # fmt: skip
    limit = max_fleet_tenants()
    if len(tenants) > limit:
        raise FleetConfError(
            f"all_tenants: {source} holds {len(tenants)} tenants (after {len(excluded)} excluded), over this "
            f"deployment's max_fleet_tenants ({limit}): give tenant_ids lists of at most {limit} in several runs"
        )
    if not tenants:
        raise EmptySourceError(f"all_tenants: {source} holds no tenant (after {len(excluded)} excluded)")
    log.info("all_tenants: %d tenants in %s (%d excluded)", len(tenants), source, len(excluded))
    return tenants


def resolve_model(s: Settings, bq: BigQuerySource, source: TableRef, conn: psycopg.Connection) -> Resolution:
    """The run's model: its declaration with the target's columns (Postgres catalog) matched to the source's
    (BigQuery schema), each pair checked against the type table."""
    try:
        schema = bq.source_schema(source)
    except Exception as exc:  # retried only if its cause is transient
        raise SourceReadError(f"BigQuery connection {s.gcp_conn_id!r}: {exc}") from exc
    declaration = s.declaration
    if s.source_table and s.source_table != declaration.source_table:
        declaration = replace(declaration, source_table=s.source_table)
    return resolve(declaration, target_checks.target_columns(conn, declaration.target_table), schema)


def _log_model(s: Settings, source: TableRef, resolution: Resolution) -> None:
    model = resolution.model
    log.info(
        "model %s: %d columns from %s into %s: %s",
        s.model_type, len(model.columns), source, model.target_table,
        ", ".join(c.name if c.source == c.name else f"{c.source}→{c.name}" for c in model.columns),
    )  # fmt: skip
    if resolution.ignored:
        log.warning(
            "source %s has columns model %s does not read: %s. They are ignored (bigquery_backfill_jobs."
            "ignored_source_columns); to land them, add a column of that name to the target table (or a rename "
            "to the models file)",
            source, s.model_type, ", ".join(resolution.ignored),
        )  # fmt: skip
    if resolution.defaulted:
        log.warning(
            "target columns %s of %s are not in source %s: left to their default",
            ", ".join(resolution.defaulted), model.target_table, source,
        )  # fmt: skip

"""cleanup_stale_jobs: the tenant+model's stale ledger rows go, after both connections and the source are checked."""

from __future__ import annotations

import logging
from dataclasses import replace

import psycopg

from bq_backfill import ledger, target_checks
from bq_backfill.connections import bigquery, postgres, source_table
from bq_backfill.errors import SourceReadError
from bq_backfill.ledger import RunKey
from bq_backfill.models import Resolution, resolve
from bq_backfill.settings import Settings
from bq_backfill.source import BigQuerySource, TableRef

log = logging.getLogger(__name__)


def airflow_run_active(dag_id: str, run_id: str) -> bool | None:
    """Whether Airflow says a dag run is queued or running (None: Airflow does not know that run)."""
    from airflow.sdk import get_current_context

    ti = get_current_context()["ti"]
    if ti.get_dr_count(dag_id=dag_id, run_ids=[run_id], states=["queued", "running"]):
        return True
    return False if ti.get_dr_count(dag_id=dag_id, run_ids=[run_id]) else None


def cleanup_stale_jobs(s: Settings, run: RunKey, run_active: ledger.RunState = airflow_run_active) -> dict[str, int]:
    """Deletes the tenant+model's stale jobs and claims this run's job, in one transaction: from then on no other job
    of the tenant+model can become active (the one-active-job index), while plan_chunks takes the snapshot."""
    # Both connections, the source and the target are checked before anything is deleted: a broken setup or a
    # model that no longer fits fails here.
    bq = bigquery(s.gcp_conn_id)
    source = source_table(s, bq)
    with postgres(s.postgres_conn_id) as conn:
        ledger.check_schema(conn, s.declaration)
        resolution = resolve_model(s, bq, source, conn)
        model = resolution.model
        target_checks.check_target(conn, model, ledger.LEDGER_TABLES)
        ledger.lock_tenant_model(conn, s.tenant_id, s.model_type)
        deleted = ledger.delete_stale_jobs(conn, run, s.tenant_id, s.model_type, run_active)
        job, created = ledger.claim_job(conn, run, s.tenant_id, s.model_type)
        ledger.refuse_old_snapshot(conn, job, s.tenant_id, s.model_type, s.max_snapshot_age_hours)
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
            model.target_table,
        )
        log.info("job %s %s for dag run %s", job.id, "created" if created else "taken back", run.run_id)
        ledger.record_model(conn, job, model, resolution.ignored)
        _log_model(s, source, resolution)
        if not ledger.active_job_index_exists(conn):
            log.warning(
                "the one-active-job index over every writer (bigquery_backfill_jobs_one_active) is not in place: "
                "run bigquery_backfill_setup (again, if legacy duplicates blocked it: each run's cleanup removes "
                "its own tenant+model's). This DAG's own jobs are protected by bigquery_backfill_jobs_one_active_run "
                "meanwhile"
            )
        if s.dry_run:
            log.info("dry run: cleanup rolled back, nothing deleted")
            raise psycopg.Rollback()  # the same statements, undone; the transaction block swallows it
    return deleted


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

"""
### BigQuery → Postgres backfill, one model and one tenant or a fleet of tenants per run

Trigger with conf, e.g. `{"tenant_id": "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee", "model_type": "inventory"}`, or
`{"tenant_ids": [...]}`, or `{"all_tenants": true, "exclude_tenant_ids": [...]}`.

1. **cleanup_stale_jobs** deletes each tenant+model's stale rows in `bigquery_backfill_jobs` and
   `backfill_source_progress` (pending/running/failed jobs of runs that are over), then claims this run's job row
   of each tenant; a tenant whose job belongs to a live run elsewhere is refused by name. Synced target rows stay.
2. **plan_chunks** freezes one numbered snapshot of the fleet's source rows (one scan), records each tenant's part
   on its job, and lists the offset chunks still to do: small tenants share a chunk, large ones span several.
3. **load_chunk** (one mapped task per chunk) reads its rows from the snapshot and upserts them on the model's key;
   each tenant's progress commits in the same transaction. A tenant whose rows cannot land fails its own job.
4. **finalize** reconciles each tenant's counts and keys, then marks its job completed; the run fails naming the
   tenants that did not complete.

**Resume**: clear the failed `load_chunk` task *with downstream*. Finished chunks are skipped.
`dry_run` logs what cleanup would delete and the chunk plan, and writes nothing.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

from airflow.sdk import Asset, AssetAlias, Param, dag, get_current_context, task

from bq_backfill.lineage import FinalizeOperator
from bq_backfill.model_file import declared_models
from bq_backfill.settings import (
    MAX_SNAPSHOT_AGE_HOURS,
    NUMERIC_ROUNDING,
    POOL,
    UUID_PATTERN,
    allowed,
    allowlisted_param,
    default_bytes_cap,
    max_fleet_tenants,
)

# finalize emits the target table's asset event through this alias: the table's URI depends on the run's connection
TARGETS = AssetAlias("bigquery_backfill_targets")
# The deployment's models file ([bigquery_backfill] models_file), read here from local disk: a declaration it refuses
# is named in the trigger form, the parse log and the Backfills page; the others stay usable.
MODELS = declared_models()
for _name, _problem in MODELS.problems.items():
    logging.getLogger(__name__).error("models file %s: %s", MODELS.path, _problem)
_REFUSED = "".join(f" Refused by {MODELS.path}: {p}." for p in MODELS.problems.values())
# No task waits forever: past this, Airflow stops it (a chunk is then retried like any transient failure).
TASK_TIMEOUT = timedelta(minutes=float(os.environ.get("BACKFILL_TASK_TIMEOUT_MINUTES", "60")))
_TABLE = r"^([A-Za-z0-9-]{1,63}\.)?[A-Za-z0-9_]{1,1024}\.[A-Za-z0-9_]{1,1024}$"


# Transient failures (a lost or pooled-out Postgres connection, BigQuery's 5xx) are retried with backoff; anything
# else fails the task at once (a retry would only repeat it): fix the cause, then clear.
RETRIES = {
    "retries": int(os.environ.get("BACKFILL_CHUNK_RETRIES", "3")),
    "retry_delay": timedelta(seconds=float(os.environ.get("BACKFILL_CHUNK_RETRY_DELAY_SECONDS", "30"))),
    "retry_exponential_backoff": 2.0,
    "max_retry_delay": timedelta(minutes=10),
}


def _retried_if_transient(step, *args):
    from airflow.sdk.exceptions import AirflowFailException

    from bq_backfill.errors import is_transient

    try:
        return step(*args)
    except Exception as exc:
        if is_transient(exc):
            raise  # Airflow retries with backoff
        raise AirflowFailException(f"{type(exc).__name__}: {exc}") from exc


def _finalize() -> dict:
    from bq_backfill.assets import event_extra
    from bq_backfill.tasks.finalize import finalize as run

    ctx = get_current_context()
    states = ctx["ti"].get_task_states(
        dag_id=ctx["dag"].dag_id, run_ids=[ctx["run_id"]], task_ids=["cleanup_stale_jobs", "plan_chunks"]
    )
    not_done = sorted(f"{t} {st}" for t, st in states.get(ctx["run_id"], {}).items() if st != "success")
    s = _settings()
    cleanup = ctx["ti"].xcom_pull(task_ids="cleanup_stale_jobs") or {}
    result = _retried_if_transient(run, s, _run(), not_done, cleanup.get("refused"))
    if result.get("asset_uri"):
        for job in result["jobs"]:  # one event per tenant completed, as one run of it would emit
            extra = event_extra(job, job["tenant_id"], s.model_type, job["job_id"])
            ctx["outlet_events"][TARGETS].add(Asset(result["asset_uri"]), extra=extra)
    return result


def _settings():
    from airflow.sdk.exceptions import AirflowFailException

    from bq_backfill.settings import Settings

    try:
        return Settings.from_params(get_current_context()["params"])
    except (ValueError, PermissionError) as exc:  # the conf itself: a retry would only repeat it
        raise AirflowFailException(f"{type(exc).__name__}: {exc}") from exc


def _run():
    from bq_backfill.ledger import RunKey

    ctx = get_current_context()
    return RunKey(ctx["dag"].dag_id, ctx["run_id"])


def _mark_job_failed(context) -> None:
    """Task failure callback: the job row says failed, with the error, instead of staying `running`."""
    from bq_backfill.ledger import RunKey
    from bq_backfill.settings import Settings
    from bq_backfill.tasks.failure import mark_job_failed

    ti = context["ti"]
    mapped = ti.map_index not in (None, -1)
    label = f"{ti.task_id}[{ti.map_index}]" if mapped else ti.task_id
    try:
        settings = Settings.from_params(context["params"])
    except (ValueError, PermissionError) as exc:  # refused before any job was claimed: nothing to mark
        logging.getLogger(__name__).error("%s failed: %s (no job of this run to mark failed)", label, exc)
        return
    mark_job_failed(
        settings,
        RunKey(ti.dag_id, ti.run_id),
        label,
        context.get("exception"),
        chunk_index=_chunk_index(context) if mapped else -1,
    )


def _chunk_index(context) -> int:
    """The chunk a mapped load_chunk task instance was given (its map index need not equal the chunk index)."""
    return int(context["task"].op_kwargs["chunk"]["chunk_index"])


@dag(
    dag_id="bigquery_backfill",
    schedule=None,
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["backfill", "bigquery", "postgres"],
    render_template_as_native_obj=True,
    default_args={"retries": 0, "on_failure_callback": _mark_job_failed, "execution_timeout": TASK_TIMEOUT},
    params={
        # The trigger form limits the field to a uuid's 36 characters (it checks no pattern); the API refuses any
        # other text with HTTP 400 before the run exists.
        "tenant_id": Param(
            None,
            type=["null", "string"],
            format="uuid",
            minLength=36,
            maxLength=36,
            pattern=UUID_PATTERN,
            description="Tenant whose rows are backfilled: its uuid, 36 characters, e.g. "
            "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee. Or leave it empty and give tenant_ids or all_tenants.",
        ),
        "tenant_ids": Param(
            [],
            type="array",
            items={"type": "string", "minLength": 36, "maxLength": 36, "pattern": UUID_PATTERN},
            uniqueItems=True,
            maxItems=max_fleet_tenants(),
            description=f"A fleet: the tenants to backfill in this one run, one uuid per line (at most "
            f"{max_fleet_tenants()}, the deployment's max_fleet_tenants).",
        ),
        "all_tenants": Param(
            False,
            type="boolean",
            description="Backfill every tenant in the source (but exclude_tenant_ids) in this one run.",
        ),
        "exclude_tenant_ids": Param(
            [],
            type="array",
            items={"type": "string", "minLength": 36, "maxLength": 36, "pattern": UUID_PATTERN},
            uniqueItems=True,
            description="With all_tenants: tenants left out, one uuid per line.",
        ),
        "model_type": Param(
            "inventory" if "inventory" in MODELS.models else next(iter(sorted(MODELS.models)), None),
            type="string",
            enum=sorted(MODELS.models),
            description=f"What to backfill: a model of {MODELS.path}.{_REFUSED}",
        ),
        "chunk_size": Param(
            500_000,
            type="integer",
            minimum=100,
            maximum=1_000_000,
            description="Rows per chunk: one task and one transaction each, read and written in slices of 20,000; "
            "raised to fit [core] max_map_length when the run has more rows.",
        ),
        "dry_run": Param(False, type="boolean", description="Log the cleanup and the plan; write nothing."),
        "max_rejected_rows": Param(
            0, type="integer", minimum=0, description="Rows allowed in quarantine before the run fails."
        ),
        "allow_empty_source": Param(
            False,
            type="boolean",
            description="Let a run whose snapshot holds no row of the tenant succeed (otherwise it fails).",
        ),
        "numeric_rounding": Param(
            "reject",
            type="string",
            enum=list(NUMERIC_ROUNDING),
            description="A number with more decimals than its target column: reject (quarantine) or round it.",
        ),
        "delete_missing": Param(
            False,
            type="boolean",
            description="Delete the tenant's target rows whose key is no longer in the source (counted always).",
        ),
        "max_deleted_rows": Param(
            0,
            type="integer",
            minimum=0,
            description="With delete_missing: refuse (delete nothing) if more rows than this would go.",
        ),
        "max_snapshot_age_hours": Param(
            MAX_SNAPSHOT_AGE_HOURS,
            type="integer",
            minimum=1,
            maximum=168,
            description=(
                "Clearing (resuming) a run whose snapshot is older than this many hours is refused: its data would "
                "overwrite what changed since. Trigger a new run instead. At most 168 (BigQuery's time travel)."
            ),
        ),
        "maximum_bytes_billed": Param(
            default_bytes_cap(),
            type=["null", "integer"],
            minimum=1,
            description="Refuse the run (before anything is billed) if BigQuery would bill more bytes than this for "
            "its snapshot query; passed to every query job as maximumBytesBilled. Empty: no cap.",
        ),
        "source_table": Param(
            None,
            type=["null", "string"],
            pattern=_TABLE,
            enum=[None, *allowed("source_table")],
            description="BigQuery [project.]dataset.table allowed by the deployment; empty uses the model's own.",
        ),
        "scratch_dataset": allowlisted_param("scratch_dataset", "backfill_scratch", r"^[A-Za-z0-9_]{1,1024}$"),
        "gcp_conn_id": allowlisted_param("gcp_conn_id", "google_cloud_default"),
        "postgres_conn_id": allowlisted_param("postgres_conn_id", "postgres_default"),
    },
)
def bigquery_backfill():
    # Each task's result is one XCom (return_value): a dict-typed result would otherwise push one XCom per key, each
    # a round trip to the API server.
    @task(multiple_outputs=False, **RETRIES)
    def cleanup_stale_jobs() -> dict[str, int]:
        from bq_backfill.tasks.cleanup import cleanup_stale_jobs as run

        return _retried_if_transient(run, _settings(), _run())

    @task(**RETRIES)
    def plan_chunks() -> list[dict]:
        from airflow.configuration import conf

        from bq_backfill.tasks.plan import plan_chunks as run

        return _retried_if_transient(run, _settings(), _run(), conf.getint("core", "max_map_length"))

    @task(
        pool=POOL,
        multiple_outputs=False,
        map_index_template="chunk {{ task.op_kwargs['chunk']['chunk_index'] }}: {{ task.op_kwargs['chunk']['label'] }}",
        **RETRIES,
    )
    def load_chunk(chunk: dict) -> dict[str, int]:
        from bq_backfill.tasks.chunk import load_chunk as run

        return _retried_if_transient(run, _settings(), _run(), chunk)

    # also after a failed or killed chunk: the job must not stay `running`. A completed run (only) emits an asset
    # event on the model's target table, through the alias (the table's URI depends on the run's connection), and
    # reports OpenLineage (FinalizeOperator, the standard provider's PythonOperator).
    finalize = FinalizeOperator(
        task_id="finalize", python_callable=_finalize, trigger_rule="all_done", outlets=[TARGETS], **RETRIES
    )

    planned = plan_chunks()
    cleanup_stale_jobs() >> planned
    load_chunk.expand(chunk=planned) >> finalize


bigquery_backfill()

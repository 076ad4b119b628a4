"""
### Setup of the backfill's Postgres tables

Run once per deployment and after each upgrade, through a connection whose role may change the schema (the tables'
owner). Creates or upgrades `bigquery_backfill_jobs`, `backfill_source_progress`, `backfill_chunks`,
`backfill_quarantine` and `backfill_range_proofs` (never drops anything), creates the one-active-job index when no
legacy duplicates block it, checks each model of the models file (`[bigquery_backfill] models_file`) against its
BigQuery source and its Postgres target, creating a missing target from the source's schema, and, given
`writer_role` (one of `[bigquery_backfill] allowed_writer_roles`), grants that role exactly what a
`bigquery_backfill` run needs. Fails naming each model that cannot run, after setting up the others. Runs of
`bigquery_backfill` change no DDL: they fail naming anything missing and this DAG.
"""

from __future__ import annotations

from airflow.sdk import Param, dag, get_current_context, task

from bq_backfill.settings import allowed_writer_roles, allowlisted_param

_ROLE = r"^[a-z_][a-z0-9_]{0,62}$"
_WRITER_ROLES = allowed_writer_roles()  # read once, when the file is parsed


@dag(
    dag_id="bigquery_backfill_setup",
    schedule=None,
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["backfill", "postgres", "setup"],
    params={
        # [bigquery_backfill] allowed_setup_postgres_conn_ids: the owner's connection, which runs cannot name
        "postgres_conn_id": allowlisted_param(
            "setup_postgres_conn_id", "postgres_default", description="Connection whose role owns the tables."
        ),
        "gcp_conn_id": allowlisted_param(
            "gcp_conn_id", "google_cloud_default", description="Connection that reads the models' source schemas."
        ),
        # [bigquery_backfill] allowed_writer_roles: whoever may trigger setup cannot grant or revoke any other role
        "writer_role": Param(
            None,
            type=["null", "string"],
            pattern=_ROLE,
            enum=[None, *_WRITER_ROLES],
            description="Role the backfill runs connect as: granted exactly what a run needs. Empty: no grants. "
            f"One of: {', '.join(_WRITER_ROLES) or 'none configured'}.",
        ),
        "grant_delete": Param(
            False, type="boolean", description="Also grant DELETE on the target tables (for delete_missing runs)."
        ),
    },
)
def bigquery_backfill_setup():
    @task(multiple_outputs=False)  # its report as one XCom, not one per key
    def setup_database() -> dict:
        from bq_backfill.connections import bigquery, postgres
        from bq_backfill.setup import setup_database as run

        params = get_current_context()["params"]
        bq = bigquery(params["gcp_conn_id"])
        with postgres(params["postgres_conn_id"]) as conn:
            report = run(
                conn,
                params["writer_role"],
                bool(params["grant_delete"]),
                lambda model: bq.source_schema(bq.table(model.source_table)),
            )
        if report["problems"]:  # after the commit: the other models are set up
            shown = "; ".join(report["problems"].values())
            raise RuntimeError(f"{len(report['problems'])} models cannot be backfilled: {shown}")
        return report

    setup_database()


bigquery_backfill_setup()

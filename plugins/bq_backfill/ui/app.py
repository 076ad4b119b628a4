"""The Backfills page and its JSON, served by the Airflow api-server to users its auth manager has logged in.

Imported by the api-server only, on the first request (bq_backfill.ui.plugin). Every request goes through
Airflow's own `get_user` (the UI's session cookie or a bearer token; anonymous or forged requests are refused) and
must be allowed to read the backfill DAG's runs (403 otherwise). Reads go through a Postgres connection the
deployment allows for the DAG ([bigquery_backfill] allowed_postgres_conn_ids), and only the ledger tables.
"""

from __future__ import annotations

from importlib import resources
from typing import Annotated, Any

from airflow.api_fastapi.core_api.security import get_user
from fastapi import Depends, FastAPI, HTTPException, Query
from fastapi.responses import HTMLResponse

from bq_backfill.settings import POOL, UUID_PATTERN

DAG_ID = "bigquery_backfill"
CREATE_POOL = f'airflow pools set {POOL} 4 "Postgres writers of bigquery_backfill"'


def _authorized(user: Any) -> Any:
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails

    if not get_auth_manager().is_authorized_dag(
        method="GET", access_entity=DagAccessEntity.RUN, details=DagDetails(id=DAG_ID), user=user
    ):
        raise HTTPException(403, f"not allowed to read runs of {DAG_ID}")
    return user


def authorized(user: Annotated[Any, Depends(get_user)]) -> Any:
    return _authorized(user)


def deployment_problems() -> list[str]:
    """What keeps runs from progressing that only Airflow's metadata database shows (the api-server can read it)."""
    from airflow.models.pool import Pool
    from airflow.utils.session import create_session

    from bq_backfill.model_file import ModelFileError, declared_models

    problems = []
    with create_session() as session:
        if Pool.get_pool(POOL, session=session) is None:
            problems.append(
                f"the pool {POOL!r} does not exist: the scheduler starts no load_chunk task (its log says "
                f'"Tasks using non-existent pool"). Create it: {CREATE_POOL}, or Admin → Pools'
            )
    try:
        declared = declared_models()
    except ModelFileError as exc:
        return [*problems, str(exc)]
    problems += [f"models file {declared.path}: {p}: fix it, then trigger" for p in declared.problems.values()]
    return problems


def create_app() -> FastAPI:
    # No route without authorization: FastAPI's schema and docs routes skip app-level dependencies, so none are served.
    app = FastAPI(
        title="Backfills", dependencies=[Depends(authorized)], docs_url=None, redoc_url=None, openapi_url=None
    )

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return resources.files("bq_backfill.ui").joinpath("page.html").read_text()

    @app.get("/api/jobs")
    def jobs(
        tenant_id: Annotated[str | None, Query(pattern=UUID_PATTERN)] = None,
        conn_id: str | None = None,
        limit: Annotated[int, Query(ge=1, le=100)] = 50,
        dag_run_id: Annotated[str | None, Query(max_length=250)] = None,
        status: Annotated[str | None, Query(pattern="^(pending|running|failed|completed)$")] = None,
    ) -> dict[str, Any]:
        from bq_backfill.connections import postgres
        from bq_backfill.settings import allowed
        from bq_backfill.ui.jobs import latest_jobs, latest_runs

        allowed_ids = allowed("postgres_conn_id")
        conn_id = conn_id or ("postgres_default" if "postgres_default" in allowed_ids else allowed_ids[0])
        if conn_id not in allowed_ids:
            raise HTTPException(400, f"conn_id {conn_id!r} is not one of {allowed_ids}")
        import psycopg

        try:
            with postgres(conn_id) as conn:  # one transaction, as every connection of the package: pooler-safe
                conn.execute("SET TRANSACTION READ ONLY")
                conn.execute("SELECT set_config('statement_timeout', '10s', true)")
                tenant = tenant_id.lower() if tenant_id else None
                rows = latest_jobs(conn, tenant, limit, dag_id=DAG_ID, dag_run_id=dag_run_id, status=status)
                runs = latest_runs(conn, DAG_ID)
        except psycopg.errors.UndefinedTable as exc:
            raise HTTPException(
                503, f"no backfill ledger behind connection {conn_id!r} ({exc}): run the DAG bigquery_backfill_setup"
            ) from exc
        except (ConnectionError, psycopg.OperationalError) as exc:  # down, or its pooler busy: try again later
            raise HTTPException(503, f"Postgres connection {conn_id!r} is not answering: {exc}") from exc
        except (LookupError, PermissionError) as exc:  # not defined, unknown database or role, refused password
            raise HTTPException(503, f"Postgres connection {conn_id!r} cannot be used: {exc}") from exc
        return {"dag_id": DAG_ID, "conn_id": conn_id, "problems": deployment_problems(), "runs": runs, "jobs": rows}

    return app

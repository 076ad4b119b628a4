"""Real services for the tests: a PostgreSQL server, the BigQuery emulator, and an Airflow home on SQLite.

Airflow reads its configuration at import time, so that part of the environment is set here, before anything
imports it. Connections are environment variables too, set once the services are up (read at use time).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_HOME = Path(tempfile.mkdtemp(prefix="bq_backfill_airflow_"))

for path in (ROOT, ROOT / "plugins", ROOT / "tests"):
    sys.path.insert(0, str(path))

from devtools import services  # noqa: E402
from devtools.grpc_shuffler import ShufflingReadProxy  # noqa: E402
from devtools.seed import PROJECT, inventory_schema  # noqa: E402

os.environ.update(
    {
        **services.airflow_home_env(_HOME),
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        "NO_PROXY": "127.0.0.1,localhost",
        # chunk retries as deployed (3, exponential backoff) but starting at 1 s instead of 30 s
        "BACKFILL_CHUNK_RETRY_DELAY_SECONDS": "1",
        "BACKFILL_BIGQUERY_RETRY_SECONDS": "1",
        # what the deployment lets a trigger name: the defaults plus the connections and tables the tests break
        "AIRFLOW__BIGQUERY_BACKFILL__ALLOWED_GCP_CONN_IDS": (
            "google_cloud_default,no_such_gcp,flaky_gcp,secret_gcp,recorded_gcp"
        ),
        "AIRFLOW__BIGQUERY_BACKFILL__ALLOWED_POSTGRES_CONN_IDS": (
            "postgres_default,no_such_pg,closed_pg,embedded_target,writer_pg,secret_pg,pooled_pg"
        ),
        "AIRFLOW__BIGQUERY_BACKFILL__ALLOWED_SETUP_POSTGRES_CONN_IDS": "postgres_default,pooled_pg",
        # the writer_role fixture's role (helpers.WRITER_ROLE)
        "AIRFLOW__BIGQUERY_BACKFILL__ALLOWED_WRITER_ROLES": f"backfill_writer_{os.getpid()}",
        "AIRFLOW__BIGQUERY_BACKFILL__ALLOWED_SOURCE_TABLES": "analytics.nope,analytics.inventory_view",
    }
)


@pytest.fixture(scope="session")
def bq_emulator():
    """The BigQuery emulator (REST + Storage Read gRPC) on loopback, from its own virtualenv. Its Storage Read API is
    reached through a proxy that shuffles rows and splits sessions into streams as BigQuery may (the emulator sends
    offset order in one stream), so no test can depend on an order BigQuery does not promise."""
    with services.bigquery_emulator(PROJECT, _HOME / "bqemulator.log") as env:
        shuffler = ShufflingReadProxy(env["storage"], seed=int(os.environ.get("BACKFILL_TEST_SHUFFLE_SEED", "0")))
        env = {**env, "storage": shuffler.endpoint, "storage_unshuffled": env["storage"]}
        os.environ["AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT"] = services.gcp_connection(PROJECT, env)
        try:
            yield env
        finally:
            shuffler.close()


@pytest.fixture(scope="session")
def pg_admin():
    """Admin DSN of the PostgreSQL server the tests use (see devtools.services.postgres_server)."""
    with services.postgres_server() as dsn:
        yield dsn


@pytest.fixture(scope="session")
def pg_server(pg_admin):
    """A database of its own on that server, the target of `postgres_default`; dropped at the end."""
    name = f"bq_backfill_test_{os.getpid()}"
    dsn = services.recreate_database(pg_admin, name)
    os.environ["AIRFLOW_CONN_POSTGRES_DEFAULT"] = services.airflow_conn_uri(dsn)
    yield dsn
    services.drop_database(pg_admin, name)


@pytest.fixture(scope="session")
def airflow_db():
    """Airflow's metadata database (SQLite in a temp AIRFLOW_HOME), migrated once, with the DAG's pool."""
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True)
    subprocess.run(
        [sys.executable, "-m", "airflow", "pools", "set", "bigquery_backfill_postgres", "4", "Postgres writers"],
        check=True,
        capture_output=True,
    )
    yield _HOME


@pytest.fixture
def pg_bare(pg_server):
    """A connection to an empty test database (every table of the previous test dropped)."""
    import psycopg

    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        yield conn


@pytest.fixture
def pg(pg_bare):
    """The test database with the backfill's tables, as the setup step leaves them on a database that still holds
    legacy duplicates (schema.sql applied; the one-active-job index over every writer is not there yet)."""
    from bq_backfill import ledger
    from bq_backfill.model_file import get_declaration
    from bq_backfill.setup import check_model

    ledger.apply_schema(pg_bare)
    check_model(pg_bare, get_declaration("inventory"), inventory_schema)  # creates the target as setup does
    return pg_bare


@pytest.fixture
def bq(bq_emulator):
    """A BigQuery client on the emulator, with an empty `analytics` dataset and no scratch dataset."""
    from devtools.seed import bq_client

    client = bq_client(bq_emulator["rest"])
    client.delete_dataset("analytics", delete_contents=True, not_found_ok=True)
    client.delete_dataset("backfill_scratch", delete_contents=True, not_found_ok=True)
    client.create_dataset("analytics")
    return client


@pytest.fixture
def backfill_dag(airflow_db, pg_server, bq_emulator):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert not bag.import_errors, bag.import_errors
    return bag.get_dag("bigquery_backfill")


@pytest.fixture
def declare_models(tmp_path, monkeypatch, airflow_db, pg_server, bq_emulator):
    """Declares models in a models file of the test's own, beside the package's `inventory` (as a deployment
    copies it), through [bigquery_backfill] models_file; returns the backfill DAG as parsed with that file."""
    import itertools

    import yaml
    from airflow.dag_processing.dagbag import DagBag

    shipped = yaml.safe_load((ROOT / "plugins" / "bq_backfill" / "models.yaml").read_text())["models"]
    versions = itertools.count()

    def declare(models: dict | None = None, *, text: str | None = None):
        path = tmp_path / f"backfill_models_{next(versions)}.yaml"  # a new file: no stale read of an old one
        path.write_text(text if text is not None else yaml.safe_dump({"models": {**shipped, **(models or {})}}))
        monkeypatch.setenv("AIRFLOW__BIGQUERY_BACKFILL__MODELS_FILE", str(path))
        bag = DagBag(dag_folder=str(ROOT / "dags"))
        assert not bag.import_errors, bag.import_errors
        return bag.get_dag("bigquery_backfill")

    return declare


@pytest.fixture(scope="session")
def pooler(tmp_path_factory):
    """PgBouncer in transaction mode with a pool of 2, in front of a database of the embedded server (PostgreSQL
    16), as connection `pooled_pg`: {"dsn": through the pooler, "admin": its admin console, "direct": the same
    database without it (for the tests' own checks)}."""
    with services.embedded_postgres() as admin:
        direct = services.recreate_database(admin, "backfill_pooled")
        with services.pgbouncer(direct, tmp_path_factory.mktemp("pgbouncer"), pool_size=2) as bouncer:
            os.environ["AIRFLOW_CONN_POOLED_PG"] = services.airflow_conn_uri(bouncer["dsn"])
            yield {**bouncer, "direct": direct}


@pytest.fixture
def writer_role(pg, monkeypatch):
    """helpers.WRITER_ROLE, granted by the setup step (run as the tables' owner), as connection `writer_pg`; the
    DSN it logs in with. Dropped afterwards."""
    import psycopg
    from helpers import WRITER_ROLE
    from psycopg import sql

    from bq_backfill.setup import setup_database

    role = sql.Identifier(WRITER_ROLE)
    if pg.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [WRITER_ROLE]).fetchone() is None:
        pg.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'writer-password'").format(role))
    setup_database(pg, WRITER_ROLE, grant_delete=False, source_schemas=inventory_schema)
    info = psycopg.conninfo.conninfo_to_dict(pg.info.dsn)
    dsn = psycopg.conninfo.make_conninfo(**{**info, "user": WRITER_ROLE, "password": "writer-password"})
    monkeypatch.setenv("AIRFLOW_CONN_WRITER_PG", services.airflow_conn_uri(dsn))
    yield dsn
    pg.execute(sql.SQL("DROP OWNED BY {}").format(role))
    pg.execute(sql.SQL("DROP ROLE {}").format(role))

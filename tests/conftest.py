"""Real services for the tests: a PostgreSQL server, the BigQuery emulator, and an Airflow home on SQLite.

Airflow reads its configuration at import time, so the environment is set here, before anything imports it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "backfill-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_HOME = Path(tempfile.mkdtemp(prefix="bq_backfill_airflow_"))
REST_PORT, GRPC_PORT = _free_port(), _free_port()
PG_DSN = os.environ.get("BACKFILL_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
TEST_DB = f"bq_backfill_test_{os.getpid()}"
TEST_DSN = PG_DSN.rsplit("/", 1)[0] + "/" + TEST_DB

os.environ.update(
    {
        "AIRFLOW_HOME": str(_HOME),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{_HOME}/airflow.db",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        "AIRFLOW_CONN_POSTGRES_DEFAULT": TEST_DSN,
        "AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT": json.dumps(
            {"conn_type": "google_cloud_platform", "extra": {"project": PROJECT, "is_anonymous": True}}
        ),
        "BIGQUERY_EMULATOR_HOST": f"http://127.0.0.1:{REST_PORT}",
        "BIGQUERY_STORAGE_EMULATOR_HOST": f"127.0.0.1:{GRPC_PORT}",
        "NO_PROXY": "127.0.0.1,localhost",
    }
)
sys.path.insert(0, str(ROOT / "plugins"))
sys.path.insert(0, str(ROOT / "tests"))


def _wait(url: str, proc: subprocess.Popen, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{what} not ready after {timeout} s")


@pytest.fixture(scope="session")
def bq_emulator():
    """The BigQuery emulator (REST + Storage Read gRPC) on loopback, from its own virtualenv."""
    binary = os.environ.get("BQEMULATOR_BIN") or str(ROOT / ".venv-bqemulator" / "bin" / "bqemulator")
    if not Path(binary).exists():
        pytest.fail(f"bqemulator not found at {binary}: run `make test` (it installs it) or set BQEMULATOR_BIN")
    home = Path(binary).parents[1] / "duckdb-home"  # holds the registered DuckDB spatial extension
    log = open(_HOME / "bqemulator.log", "w")
    proc = subprocess.Popen(
        [
            binary,
            "start",
            "--rest-host",
            "127.0.0.1",
            "--rest-port",
            str(REST_PORT),
            "--grpc-host",
            "127.0.0.1",
            "--grpc-port",
            str(GRPC_PORT),
            "--project",
            PROJECT,
            "--log-level",
            "warning",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "HOME": str(home)},
    )
    try:
        _wait(f"http://127.0.0.1:{REST_PORT}/healthz", proc, "bqemulator")
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="session")
def pg_server():
    """A database of its own on the real PostgreSQL server; dropped at the end."""
    import psycopg

    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{TEST_DB}"')
        conn.execute(f'CREATE DATABASE "{TEST_DB}"')
    yield TEST_DSN
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{TEST_DB}" WITH (FORCE)')


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
def pg(pg_server):
    """A connection to an empty test database (every table of the previous test dropped)."""
    import psycopg

    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        yield conn


@pytest.fixture
def bq(bq_emulator):
    """A BigQuery client on the emulator, with an empty `analytics` dataset."""
    from seed import bq_client

    client = bq_client()
    client.delete_dataset("analytics", delete_contents=True, not_found_ok=True)
    client.delete_dataset("backfill_scratch", delete_contents=True, not_found_ok=True)
    client.create_dataset("analytics")
    return client


@pytest.fixture
def backfill_dag(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert not bag.import_errors, bag.import_errors
    return bag.get_dag("bigquery_backfill")

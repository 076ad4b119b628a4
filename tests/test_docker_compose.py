"""docker-compose.yaml cannot be started here (no Docker engine): check what can be checked without one.

It parses; it has the services of Airflow's official layout; every file and folder it mounts or builds from
exists; it creates the same connection ids, connection extras and pool that the DAG uses by default; and its init
script, run for real against the test services, leaves them in place.
"""

from __future__ import annotations

import json
import re

import pytest
import yaml
from helpers import ROOT

from bq_backfill import source

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())
SERVICES = COMPOSE["services"]


def test_official_layout_services_and_profiles():
    assert {"postgres", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer",
            "airflow-init", "bqemulator"} <= set(SERVICES)  # fmt: skip
    assert SERVICES["redis"]["profiles"] == ["celery"] and SERVICES["airflow-worker"]["profiles"] == ["celery"]
    env = SERVICES["airflow-scheduler"]["environment"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "${AIRFLOW_EXECUTOR:-LocalExecutor}"
    assert SERVICES["airflow-worker"]["command"] == "celery worker"
    for name in (
        "airflow-apiserver",
        "airflow-scheduler",
        "airflow-dag-processor",
        "airflow-triggerer",
        "airflow-worker",
    ):
        assert SERVICES[name]["depends_on"]["airflow-init"]["condition"] == "service_completed_successfully", name


@pytest.mark.parametrize("service", ["airflow-scheduler", "airflow-dag-processor", "airflow-worker"])
def test_project_folders_are_mounted_where_airflow_looks(service):
    mounts = {m.rsplit(":", 1)[1]: m.rsplit(":", 1)[0] for m in SERVICES[service]["volumes"] if m.startswith("${")}
    assert mounts == {
        "/opt/airflow/dags": "${AIRFLOW_PROJ_DIR:-.}/dags",
        "/opt/airflow/plugins": "${AIRFLOW_PROJ_DIR:-.}/plugins",
        "/opt/airflow/include": "${AIRFLOW_PROJ_DIR:-.}/include",
    }
    for host in mounts.values():
        assert (ROOT / host.removeprefix("${AIRFLOW_PROJ_DIR:-.}/")).is_dir()
    # plugins and include side by side, as plugins/bq_backfill/sqlfiles.py expects
    assert (ROOT / "plugins" / "bq_backfill" / "sqlfiles.py").exists() and (
        ROOT / "include" / "sql" / "schema.sql"
    ).exists()


def test_build_files_exist_and_pin_the_same_airflow():
    assert (ROOT / "Dockerfile").exists()
    assert (ROOT / SERVICES["bqemulator"]["build"]["dockerfile"]).exists()
    init_sql = SERVICES["postgres"]["volumes"][1].split(":")[0]
    assert (ROOT / init_sql).exists()
    base = re.search(r"^FROM apache/airflow:(\S+?)-python", (ROOT / "Dockerfile").read_text(), re.M).group(1)
    assert f"apache-airflow=={base}\n" in (ROOT / "constraints.txt").read_text()  # the image's pins
    for dockerfile in (ROOT / "Dockerfile", ROOT / "docker" / "bqemulator.Dockerfile"):
        for copied in re.findall(r"^COPY (.+) \S+$", dockerfile.read_text(), re.M):
            for path in copied.split():
                assert (ROOT / path).exists(), f"{dockerfile.name} copies missing {path}"


def test_init_creates_the_connections_and_pool_the_dag_uses(backfill_dag):
    script = "\n".join(SERVICES["airflow-init"]["command"])
    params = backfill_dag.params
    assert f"connections add {params['postgres_conn_id']} " in script
    assert f"connections add {params['gcp_conn_id']} " in script
    assert f"pools set {backfill_dag.task_dict['load_chunk'].pool} " in script
    gcp = json.loads(re.search(r"--conn-json '(.+?)'", script).group(1))
    assert gcp["conn_type"] == "google_cloud_platform"
    assert gcp["extra"][source.REST_ENDPOINT_EXTRA] == "http://bqemulator:9050"
    assert gcp["extra"][source.STORAGE_ENDPOINT_EXTRA] == "bqemulator:9060"
    writer_uri, admin_uri = re.findall(r"--conn-uri '(.+?)'", script)
    assert writer_uri.startswith("postgresql://backfill_writer:") and writer_uri.endswith("@postgres:5432/backfill")
    assert admin_uri.startswith("postgresql://airflow:") and admin_uri.endswith("@postgres:5432/backfill")
    init_sql = (ROOT / "docker" / "postgres-init.sql").read_text()
    assert "CREATE DATABASE backfill;" in init_sql and "CREATE ROLE backfill_writer LOGIN" in init_sql
    # the setup step runs as the owner, granting the writer role; runs may name the writer's connection only
    assert "connections add postgres_admin " in script
    setup = re.search(r"airflow dags test bigquery_backfill_setup \\\s+-c '(.+?)'", script)
    assert json.loads(setup.group(1)) == {"postgres_conn_id": "postgres_admin", "writer_role": "backfill_writer"}
    env = COMPOSE["x-airflow-common"]["environment"]
    assert env["AIRFLOW__BIGQUERY_BACKFILL__ALLOWED_POSTGRES_CONN_IDS"] == "postgres_default"
    assert env["AIRFLOW__BIGQUERY_BACKFILL__ALLOWED_SETUP_POSTGRES_CONN_IDS"] == "postgres_admin"


def test_the_init_script_runs_and_leaves_the_stack_ready(pg_admin, bq, bq_emulator, tmp_path):
    """The init service's own script and the Postgres service's init SQL, run for real (bash, the Airflow CLI, the
    test server and the emulator in place of the compose hosts): the connections, the pool and the setup's tables
    and grants exist afterwards, and the script finishes even though the emulator holds no source yet."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import psycopg

    from devtools import services

    admin = psycopg.conninfo.conninfo_to_dict(pg_admin)
    host, port = admin.get("host", "127.0.0.1"), admin.get("port", "5432")
    database = f"backfill_compose_{os.getpid()}"
    init_sql = (ROOT / "docker" / "postgres-init.sql").read_text().replace("CREATE DATABASE backfill;", "")
    with psycopg.connect(pg_admin, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {database}")
        conn.execute(f"CREATE DATABASE {database}")
        if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = 'backfill_writer'").fetchone() is None:
            conn.execute(init_sql)
    rest = bq_emulator["rest"].removeprefix("http://")
    script = (
        "\n".join(SERVICES["airflow-init"]["command"][1:])
        .replace("$$", "$")
        .replace("postgresql://airflow:airflow@", f"postgresql://{admin.get('user', 'postgres')}@")  # the owner
        .replace("@postgres:5432/backfill", f"@{host}:{port}/{database}")
        .replace("http://bqemulator:9050", f"http://{rest}")
        .replace("bqemulator:9060", bq_emulator["storage"])
        .replace('"project": "local-project"', f'"project": "{bq.project}"')
    )
    compose_env = COMPOSE["x-airflow-common"]["environment"]
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "BACKFILL"))},
        **services.airflow_home_env(tmp_path),
        **{k: str(v) for k, v in compose_env.items() if k.startswith("AIRFLOW__BIGQUERY_BACKFILL__")},
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    done = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]

    def airflow(*args: str) -> str:
        out = subprocess.run(["airflow", *args], env=env, capture_output=True, text=True, timeout=120, check=True)
        return out.stdout

    for conn_id in ("postgres_default", "postgres_admin", "google_cloud_default"):
        assert conn_id in airflow("connections", "get", conn_id, "-o", "json")
    assert json.loads(airflow("pools", "get", "bigquery_backfill_postgres", "-o", "json"))[0]["slots"] == "4"
    assert "some models are not set up" in done.stdout  # the inventory source is not there yet: named, skipped
    writer = psycopg.conninfo.make_conninfo(
        pg_admin, dbname=database, user="backfill_writer", password="backfill_writer"
    )
    with psycopg.connect(writer) as conn:  # the writer role was granted what a run needs, and nothing else
        assert conn.execute("SELECT count(*) FROM bigquery_backfill_jobs").fetchone() == (0,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DROP TABLE backfill_chunks")
    with psycopg.connect(pg_admin, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE {database} WITH (FORCE)")

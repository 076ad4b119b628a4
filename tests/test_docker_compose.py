"""docker-compose.yaml cannot be started here (no Docker engine): check what can be checked without one.

It parses; it has the services of Airflow's official layout; every file and folder it mounts or builds from
exists; and it creates the same connection ids, connection extras and pool that the DAG uses by default.
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

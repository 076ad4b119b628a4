"""The DAG file parses without a database or network, and is wired the way the README says."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import ROOT


def test_dag_imports_without_database_or_network(tmp_path):
    models = tmp_path / "dags" / "backfill_models.yaml"
    models.parent.mkdir()
    shipped = (ROOT / "plugins" / "bq_backfill" / "models.yaml").read_text()
    models.write_text(shipped + "  orders:\n    source_table: sales.orders\n    target_table: orders\n"
                      "    conflict_key: [tenant_id, order_id]\n    order_key: [order_id]\n")  # fmt: skip
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(tmp_path),
        # relative to the DAGs folder, as a deployment names it
        "AIRFLOW__CORE__DAGS_FOLDER": str(models.parent),
        "AIRFLOW__BIGQUERY_BACKFILL__MODELS_FILE": models.name,
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql://nobody@127.0.0.1:1/none",
        "AIRFLOW_CONN_POSTGRES_DEFAULT": "postgresql://nobody@127.0.0.1:1/none",
        "PYTHONPATH": str(ROOT / "plugins"),
    }
    # Parsing defines the DAG and loads none of what the tasks use to reach Postgres or BigQuery: the scheduler
    # and dag-processor parse it often, and nothing there may open a connection. (Airflow itself imports psycopg
    # here, for its metadata database URL.)
    task_time = ["pyarrow", "google.cloud.bigquery", "google.cloud.bigquery_storage_v1", "bq_backfill.connections",
                 "bq_backfill.ledger", "bq_backfill.tasks"]  # fmt: skip
    code = (
        "import runpy, sys, json; "
        f"ns = runpy.run_path({str(ROOT / 'dags' / 'bigquery_backfill.py')!r}); "
        "dag = ns['bigquery_backfill'](); models = dag.params.get_param('model_type').schema['enum']; "
        f"loaded = [m for m in {task_time!r} if m in sys.modules]; "
        "print(json.dumps([dag.dag_id, sorted(dag.task_dict), loaded, models]))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    dag_id, tasks, loaded, models = json.loads(out.stdout.strip().splitlines()[-1])
    assert (dag_id, tasks) == ("bigquery_backfill", ["cleanup_stale_jobs", "finalize", "load_chunk", "plan_chunks"])
    assert loaded == []
    assert models == ["inventory", "orders"]  # the deployment's models file, read from local disk


def test_dag_shape(backfill_dag):
    dag = backfill_dag
    assert dag.max_active_runs == 1
    assert type(dag.timetable).__name__ == "NullTimetable"  # schedule=None: triggered only
    assert dag.catchup is False
    assert set(dag.task_dict) == {"cleanup_stale_jobs", "plan_chunks", "load_chunk", "finalize"}
    assert dag.task_dict["cleanup_stale_jobs"].downstream_task_ids == {"plan_chunks"}
    assert dag.task_dict["plan_chunks"].downstream_task_ids == {"load_chunk"}
    assert dag.task_dict["load_chunk"].downstream_task_ids == {"finalize"}
    load = dag.task_dict["load_chunk"]
    assert load.pool == "bigquery_backfill_postgres"
    assert load.retries == 3 and load.retry_exponential_backoff
    assert dag.task_dict["finalize"].trigger_rule == "all_done"
    for task in dag.tasks:
        assert task.on_failure_callback, f"{task.task_id} has no failure callback"


def test_params_and_their_defaults(backfill_dag):
    params = backfill_dag.params
    assert params.get_param("tenant_id").schema["format"] == "uuid"
    assert params.get_param("model_type").schema["enum"] == ["inventory"]
    assert params["model_type"] == "inventory"
    assert params["chunk_size"] == 500_000
    assert params["dry_run"] is False
    assert params["gcp_conn_id"] == "google_cloud_default"
    assert params["postgres_conn_id"] == "postgres_default"

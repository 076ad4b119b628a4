"""OpenLineage events of a run, as the openlineage provider emits them (its file transport), in a process of their
own: a completed run's finalize reports the BigQuery source as input and the Postgres table as output, with schemas
and the rows written; a failed run reports no output."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import ROOT, conf

from devtools.seed import OTHER_TENANT, PROJECT, SEED_TENANT, create_source, inventory_rows

RUN = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
dag = DagBag(dag_folder=sys.argv[1]).get_dag("bigquery_backfill")
print("STATE", dag.test(run_conf=json.loads(sys.argv[2])).state)
"""


def _run_with_lineage(tmp_path, run_conf: dict) -> tuple[str, list[dict]]:
    events = tmp_path / "openlineage.jsonl"
    env = {
        **os.environ,
        "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps({"type": "file", "log_file_path": str(events), "append": True}),
        "AIRFLOW__OPENLINEAGE__NAMESPACE": "backfill-test",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "plugins"), str(ROOT)]),
    }
    out = subprocess.run(
        [sys.executable, "-c", RUN, str(ROOT / "dags"), json.dumps(run_conf)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    state = next((line.split()[1] for line in out.stdout.splitlines() if line.startswith("STATE")), None)
    assert state, out.stderr[-4000:]
    return state, [json.loads(line) for line in events.read_text().splitlines()] if events.exists() else []


def test_a_completed_run_reports_source_and_target_with_schemas_and_rows_written(airflow_db, pg, bq, tmp_path):
    """A fleet of two: one output per tenant, each its subset of the table with its own row count."""
    create_source(bq, inventory_rows(SEED_TENANT, 600) + inventory_rows(OTHER_TENANT, 200))

    state, events = _run_with_lineage(tmp_path, conf(tenant_id=None, tenant_ids=[SEED_TENANT, OTHER_TENANT]))

    assert state == "success"
    [complete] = [
        e for e in events if e["eventType"] == "COMPLETE" and e["job"]["name"] == "bigquery_backfill.finalize"
    ]
    [source] = complete["inputs"]
    assert (source["namespace"], source["name"]) == ("bigquery", f"{PROJECT}.analytics.inventory_movements")
    fields = {f["name"]: f["type"] for f in source["facets"]["schema"]["fields"]}
    assert fields["movement_date"] == "DATE" and fields["quantity"] == "NUMERIC" and fields["tenant_id"] == "STRING"
    target, other = complete["outputs"]
    dsn = pg.info
    for output in (target, other):
        assert output["namespace"] == f"postgres://{dsn.host}:{dsn.port}"
        assert output["name"] == f"{dsn.dbname}.public.inventory_movements"
    assert {f["name"]: f["type"] for f in target["facets"]["schema"]["fields"]}["quantity"] == "numeric(18,4)"
    rows = {
        o["outputFacets"]["subset"]["outputCondition"]["right"]["value"]: o["outputFacets"]["outputStatistics"][
            "rowCount"
        ]
        for o in (target, other)
    }
    assert rows == {SEED_TENANT: 600, OTHER_TENANT: 200}
    assert target["outputFacets"]["subset"]["outputCondition"]["left"] == {"field": "tenant_id", "type": "field"}
    # the other tasks ran and were reported too, without datasets of their own
    assert {e["job"]["name"] for e in events} >= {
        "bigquery_backfill.cleanup_stale_jobs",
        "bigquery_backfill.plan_chunks",
    }


def test_a_failed_run_reports_no_output(airflow_db, pg, bq, tmp_path):
    create_source(bq, inventory_rows(SEED_TENANT, 300))

    state, events = _run_with_lineage(tmp_path, conf(source_table="analytics.nope"))

    assert state == "failed"
    assert events, "the provider reported nothing"
    assert not [e for e in events if e.get("outputs")]

"""What a deployment installs or uploads (`make dist`, devtools/dist.py) runs a backfill without the repository:
the wheel installed into a folder of its own, MWAA's plugins.zip unpacked into a plugins folder, Cloud Composer's
dags folder with no plugins at all. Each in a fresh Python process whose path holds only what that platform puts
there (never the repository's plugins/ or include/), a dags folder of the DAG files alone, and the real services.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers import ROOT, conf

from devtools import dist
from devtools.seed import SEED_TENANT, as_tuples, create_source, inventory_rows, target_rows

RUN = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
from airflow.plugins_manager import get_plugin_info
from bq_backfill import sqlfiles
bag = DagBag(dag_folder=sys.argv[1])
assert not bag.import_errors, bag.import_errors
print("PLUGINS", json.dumps(sorted(p["name"] for p in get_plugin_info() if p["name"].startswith("bigquery_backfill"))))
print("SQL", sqlfiles.sql_dir())
print("FILES", json.dumps(sorted(bag.dag_ids)))
print("STATE", bag.get_dag("bigquery_backfill").test(run_conf=json.loads(sys.argv[2])).state)
"""


def _run(dags: Path, plugins: Path, path: list[Path]) -> dict[str, str]:
    """A cold run in a process of its own with this dags folder, plugins folder and sys.path; what it printed."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        {
            "PYTHONPATH": os.pathsep.join(map(str, path)),
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(plugins),
        }
    )
    out = subprocess.run(
        [sys.executable, "-c", RUN, str(dags), json.dumps(conf(chunk_size=300))],
        env=env, capture_output=True, text=True, timeout=300, cwd=dags,
    )  # fmt: skip
    printed = dict(line.split(" ", 1) for line in out.stdout.splitlines() if line.split(" ", 1)[0].isupper())
    assert "STATE" in printed, out.stderr[-4000:]
    return printed


@pytest.fixture
def source(pg, bq):
    rows = inventory_rows(SEED_TENANT, 700)
    create_source(bq, rows)
    return rows


def test_the_wheel_holds_the_package_its_sql_and_page_and_registers_its_plugins(tmp_path):
    wheel = dist.build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    sql = sorted(n.removeprefix("bq_backfill/sql/") for n in names if n.startswith("bq_backfill/sql/"))
    assert sql == sorted(p.name for p in (ROOT / "include" / "sql").glob("*.sql"))
    assert "bq_backfill/ui/page.html" in names and "bq_backfill/tasks/chunk.py" in names
    assert {n.split("/")[0] for n in names} == {"bq_backfill", wheel.name.split("-py3")[0] + ".dist-info"}
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "[airflow.plugins]" in entry_points and "bq_backfill.ui.plugin:BackfillsPlugin" in entry_points


def test_the_installed_wheel_runs_from_a_dags_folder_of_the_dag_files_alone(tmp_path, source, pg, airflow_db):
    site = tmp_path / "site"
    wheel = dist.build_wheel(tmp_path / "wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)], check=True
    )
    dist.copy_dags(tmp_path / "dags")
    (tmp_path / "no_plugins").mkdir()

    printed = _run(tmp_path / "dags", tmp_path / "no_plugins", [site])

    assert printed["STATE"] == "success"
    assert printed["SQL"] == str(site / "bq_backfill" / "sql")  # inside the installed package
    # registered by the package's entry points, with an empty plugins folder
    assert json.loads(printed["PLUGINS"]) == ["bigquery_backfill", "bigquery_backfill_task_preload"]
    assert target_rows(pg, SEED_TENANT) == as_tuples(source)


def test_mwaas_plugins_zip_unpacked_into_the_plugins_folder_runs_and_serves_the_page(tmp_path, source, pg, airflow_db):
    archive = dist.build_mwaa(tmp_path / "mwaa")
    plugins = tmp_path / "plugins"
    zipfile.ZipFile(archive).extractall(plugins)  # what MWAA does with it

    printed = _run(tmp_path / "mwaa" / "dags", plugins, [])

    assert printed["STATE"] == "success"
    assert printed["SQL"] == str(plugins / "bq_backfill" / "sql")
    assert json.loads(printed["PLUGINS"]) == ["bigquery_backfill", "bigquery_backfill_task_preload"]
    assert target_rows(pg, SEED_TENANT) == as_tuples(source)


def test_composers_dags_folder_runs_without_any_plugin(tmp_path, source, pg, airflow_db):
    """Cloud Composer syncs plugins to the web server only: the scheduler's side has the dags folder alone."""
    dist.build_composer(tmp_path / "composer")
    (tmp_path / "no_plugins").mkdir()

    printed = _run(tmp_path / "composer" / "dags", tmp_path / "no_plugins", [])

    assert printed["STATE"] == "success"
    assert json.loads(printed["FILES"]) == ["bigquery_backfill", "bigquery_backfill_setup"]  # the package: not DAGs
    assert json.loads(printed["PLUGINS"]) == []  # no page, and the DAG does not need it
    assert printed["SQL"] == str(tmp_path / "composer" / "dags" / "bq_backfill" / "sql")
    assert target_rows(pg, SEED_TENANT) == as_tuples(source)

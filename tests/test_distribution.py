"""What a deployment installs or uploads (`make dist`, devtools/dist.py) runs a backfill without the repository:
the wheel pip-installed into a fresh virtualenv, MWAA's plugins.zip unpacked into a plugins folder, Cloud Composer's
dags folder with no plugins at all. Each in a fresh Python process whose path holds only what that platform puts
there (never the repository's plugins/ or include/), a dags folder of the DAG files alone, and the real services.

The fresh virtualenv stands for a platform's image: Airflow and its providers are already there (this environment's
site-packages, through a .pth file), and pip, with no index to download from, must find every requirement of the
wheel satisfied by them and install the wheel alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
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


# What the api-server would serve: the plugins Airflow loads, the apps it mounts, the UI's navigation entries.
API_SERVER = """
import json, sys
from airflow.api_fastapi.app import create_app
from airflow.dag_processing.dagbag import DagBag
from airflow.plugins_manager import get_plugin_info
app = create_app("all")
print("PLUGINS", json.dumps(sorted(p["name"] for p in get_plugin_info() if p["name"].startswith("bigquery_backfill"))))
paths = [getattr(route, "path", "") for route in app.routes]
print("MOUNTS", json.dumps(sorted(path for path in paths if path.startswith("/backfills"))))
print("NAV", json.dumps([v["name"] for p in get_plugin_info() for v in p.get("external_views", [])]))
print("PRELOADED", json.dumps("bq_backfill.tasks.chunk" in sys.modules))
bag = DagBag(dag_folder=sys.argv[1])
print("ERRORS", json.dumps(bag.import_errors))
print("STATE", sorted(bag.dag_ids))
"""


def _run(
    dags: Path,
    plugins: Path,
    path: list[Path],
    python: Path | str = sys.executable,
    script: str = RUN,
    env_extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """`script` (by default a cold run) in a process of its own with this interpreter, dags folder, plugins folder
    and sys.path; what it printed."""  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        {
            "PYTHONPATH": os.pathsep.join(map(str, path)),
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(plugins),
            **(env_extra or {}),
        }
    )
    out = subprocess.run(
        [str(python), "-c", script, str(dags), json.dumps(conf(chunk_size=300))],
        env=env, capture_output=True, text=True, timeout=300, cwd=dags,
    )  # fmt: skip
    printed = dict(line.split(" ", 1) for line in out.stdout.splitlines() if line.split(" ", 1)[0].isupper())
    assert "STATE" in printed, out.stderr[-4000:]
    return printed


def _fresh_virtualenv(path: Path) -> Path:
    """A new virtualenv whose base packages are this environment's (the platform's image); its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    site = Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                        text=True).strip())  # fmt: skip
    (site / "platform_image.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return python


def _pip_install(python: Path, wheel: Path) -> str:
    """pip installs the wheel into that virtualenv from no index at all; what pip printed."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index", str(wheel)],
        capture_output=True, text=True, env={**os.environ, "PIP_CONSTRAINT": "", "PIP_FIND_LINKS": ""},
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


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


def test_the_wheel_installed_by_pip_runs_from_a_dags_folder_of_the_dag_files_alone(tmp_path, source, pg, airflow_db):
    wheel = dist.build_wheel(tmp_path / "wheel")
    python = _fresh_virtualenv(tmp_path / "venv")

    pip_output = _pip_install(python, wheel)

    # every requirement's range admits what the platform has: pip installs nothing but the package
    assert "Successfully installed bigquery-backfill-" in pip_output, pip_output
    assert "Installing collected packages: bigquery-backfill\n" in pip_output, pip_output
    dist.copy_dags(tmp_path / "dags")
    (tmp_path / "no_plugins").mkdir()

    printed = _run(tmp_path / "dags", tmp_path / "no_plugins", [], python=python)

    assert printed["STATE"] == "success"
    site = Path(printed["SQL"]).parents[1]
    assert site.is_relative_to(tmp_path / "venv"), site  # inside the package pip installed
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


@pytest.mark.parametrize("page", ["on", "off"])
def test_the_page_is_served_when_the_plugin_is_on_and_simply_absent_when_it_is_off(tmp_path, page):
    """`[bigquery_backfill] backfills_page = False` (or no plugin loaded, as on Composer's scheduler): the api-server
    mounts nothing under /backfills and the navigation has no entry, and both DAGs still parse. The task preload
    imports nothing into the environment's processes unless `preload_task_modules` is set."""
    dist.build_composer(tmp_path / "composer")
    env = {"AIRFLOW__BIGQUERY_BACKFILL__BACKFILLS_PAGE": str(page == "on")}
    if page == "on":
        env["AIRFLOW__BIGQUERY_BACKFILL__PRELOAD_TASK_MODULES"] = "True"

    printed = _run(tmp_path / "composer" / "dags", tmp_path / "composer" / "plugins", [], script=API_SERVER,
                   env_extra=env)  # fmt: skip

    assert json.loads(printed["ERRORS"]) == {}
    assert printed["STATE"] == "['bigquery_backfill', 'bigquery_backfill_setup']"
    assert json.loads(printed["PLUGINS"]) == ["bigquery_backfill", "bigquery_backfill_task_preload"]
    if page == "on":
        assert json.loads(printed["MOUNTS"]) == ["/backfills"] and "Backfills" in json.loads(printed["NAV"])
    else:
        assert json.loads(printed["MOUNTS"]) == [] and "Backfills" not in json.loads(printed["NAV"])
    assert json.loads(printed["PRELOADED"]) is (page == "on")


@pytest.mark.parametrize("stack", [".venv", ".venv-oldest"])
def test_the_platforms_requirements_files_are_met_by_both_tested_stacks(tmp_path, stack):
    """What README tells Composer and MWAA users to install asks for nothing the tested stacks (the oldest is
    Airflow 3.2.1 under its own constraints, as on MWAA's 3.2.1 image) do not already have."""
    python = ROOT / stack / "bin" / "python"
    assert python.exists(), f"{stack} is missing: make install"
    dist.build_mwaa(tmp_path / "mwaa")
    dist.build_composer(tmp_path / "composer")
    mwaa = (tmp_path / "mwaa" / "requirements.txt").read_text().splitlines()
    assert mwaa[0] == f'--constraint "{dist.constraints_url("3.2.1", "3.11")}"'
    assert mwaa[1:] == (tmp_path / "composer" / "requirements.txt").read_text().splitlines()
    assert not any(line.startswith("apache-airflow>") for line in mwaa)  # the platform's own
    (tmp_path / "packages.txt").write_text("\n".join(mwaa[1:]) + "\n")  # the constraints file is not reachable here
    out = subprocess.run(
        [str(python), "-m", "pip", "install", "--dry-run", "--no-index", "-r", str(tmp_path / "packages.txt")],
        capture_output=True, text=True, env={**os.environ, "PIP_CONSTRAINT": "", "PIP_FIND_LINKS": ""},
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Would install" not in out.stdout, out.stdout
    assert out.stdout.count("Requirement already satisfied: ") >= len(mwaa) - 1

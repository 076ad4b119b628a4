"""`make dist`: what a deployment installs or uploads, built from the repository into dist/.

- dist/bigquery_backfill-<version>-py3-none-any.whl: the `bq_backfill` package with its SQL and page, registering
  its Airflow plugins through entry points (Astro, docker compose, any Airflow that installs packages);
- dist/mwaa/: `plugins.zip` (the package, its SQL inside, and the two plugin modules), `dags/` (the DAG files) and
  `requirements.txt` (the package's requirements under the image's Airflow constraints: `--mwaa-airflow`,
  `--mwaa-python`);
- dist/composer/: `dags/` (the DAG files, the package beside them and an .airflowignore, since Cloud Composer
  does not sync plugins to the scheduler or triggerer), `plugins/` (the plugin modules and the package again, for
  the web server's Backfills page) and `requirements.txt` (for the environment's PyPI packages: the package's
  requirements but Airflow itself).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "plugins" / "bq_backfill"
PLUGIN_MODULES = ("backfills_plugin.py", "task_preload_plugin.py")
DAG_FILES = ("bigquery_backfill.py", "bigquery_backfill_setup.py")
_SKIP = shutil.ignore_patterns("__pycache__", "*.pyc")


def build_wheel(out: Path) -> Path:
    """Builds the wheel into `out` (hatchling from this environment: no download); returns its path."""
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT)],
        check=True,
    )
    return max(out.glob("bigquery_backfill-*.whl"), key=lambda p: p.stat().st_mtime)


def copy_package(into: Path) -> Path:
    """The package as a folder, with the repository's include/sql/ inside it as bq_backfill/sql/."""
    target = into / "bq_backfill"
    shutil.copytree(PACKAGE, target, ignore=_SKIP)
    shutil.copytree(ROOT / "include" / "sql", target / "sql")
    return target


def copy_dags(into: Path) -> None:
    into.mkdir(parents=True, exist_ok=True)
    for name in DAG_FILES:
        shutil.copy2(ROOT / "dags" / name, into / name)


def copy_plugin_modules(into: Path) -> None:
    into.mkdir(parents=True, exist_ok=True)
    for name in PLUGIN_MODULES:
        shutil.copy2(ROOT / "plugins" / name, into / name)


def requirements() -> list[str]:
    """The package's requirements (pyproject.toml), with its lineage extra, as a requirements file's lines; not
    Airflow itself, which the platform provides (Composer refuses it as a PyPI package)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = [*project["dependencies"], *project["optional-dependencies"]["openlineage"]]
    return [line for line in lines if not line.startswith("apache-airflow>")]


def constraints_url(airflow: str, python: str) -> str:
    """Airflow's constraints file for a release and Python version, as MWAA's documentation gives it."""
    return f"https://raw.githubusercontent.com/apache/airflow/constraints-{airflow}/constraints-{python}.txt"


def build_mwaa(out: Path, airflow: str = "3.2.1", python: str = "3.11") -> Path:
    """dist/mwaa: plugins.zip (modules at the zip's root, as MWAA unpacks it into its plugins folder) and dags/."""
    staging = out / "plugins"
    copy_package(staging)
    copy_plugin_modules(staging)
    archive = out / "plugins.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(staging.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(staging).as_posix())
    shutil.rmtree(staging)
    copy_dags(out / "dags")
    lines = [f'--constraint "{constraints_url(airflow, python)}"', *requirements()]
    (out / "requirements.txt").write_text("\n".join(lines) + "\n")
    return archive


def build_composer(out: Path) -> None:
    """dist/composer: dags/ with the package beside the DAG files (not parsed as DAGs: .airflowignore), and
    plugins/ with the plugin modules and the package."""
    dags = out / "dags"
    copy_dags(dags)
    copy_package(dags)
    (dags / ".airflowignore").write_text("bq_backfill/\n")
    copy_plugin_modules(out / "plugins")
    copy_package(out / "plugins")
    (out / "requirements.txt").write_text("\n".join(requirements()) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mwaa-airflow", default="3.2.1", help="the MWAA environment's Airflow version")
    parser.add_argument("--mwaa-python", default="3.11", help="its Python version (major.minor)")
    args = parser.parse_args()
    out = ROOT / "dist"
    shutil.rmtree(out, ignore_errors=True)
    wheel = build_wheel(out)
    archive = build_mwaa(out / "mwaa", args.mwaa_airflow, args.mwaa_python)
    build_composer(out / "composer")
    for path in (wheel, archive, out / "mwaa" / "dags", out / "mwaa" / "requirements.txt", out / "composer" / "dags",
                 out / "composer" / "plugins", out / "composer" / "requirements.txt"):  # fmt: skip
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())

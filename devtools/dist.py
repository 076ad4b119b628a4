"""`make dist`: what a deployment installs or uploads, built from the repository into dist/.

- dist/bigquery_backfill-<version>-py3-none-any.whl: the `bq_backfill` package with its SQL and page, registering
  its Airflow plugins through entry points (Astro, docker compose, any Airflow that installs packages);
- dist/mwaa/: `plugins.zip` (the package, its SQL inside, and the two plugin modules) and `dags/` (the DAG files);
- dist/composer/: `dags/` (the DAG files, the package beside them and an .airflowignore, since Cloud Composer
  syncs the dags folder to every component, and plugins to the web server only) and `plugins/` (the plugin modules
  and the package again, for the web server's Backfills page).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
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


def build_mwaa(out: Path) -> Path:
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


def main() -> int:
    out = ROOT / "dist"
    shutil.rmtree(out, ignore_errors=True)
    wheel = build_wheel(out)
    archive = build_mwaa(out / "mwaa")
    build_composer(out / "composer")
    for path in (wheel, archive, out / "mwaa" / "dags", out / "composer" / "dags", out / "composer" / "plugins"):
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())

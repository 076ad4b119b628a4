"""Fixed SQL: inside the package (`bq_backfill/sql/`, as built into the wheel and the plugins folder by `make dist`),
or, in the repository, `include/sql/` beside the plugins folder. Read with importlib.resources, so a package
imported from a zip (MWAA's plugins.zip) finds it too."""

from __future__ import annotations

from functools import cache
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

REPOSITORY_SQL = Path(__file__).resolve().parents[2] / "include" / "sql"


@cache
def sql_dir() -> Traversable:
    packaged = resources.files("bq_backfill").joinpath("sql")
    return packaged if packaged.is_dir() else REPOSITORY_SQL


@cache
def sql_text(name: str) -> str:
    path = sql_dir().joinpath(name)
    if not path.is_file():
        raise FileNotFoundError(
            f"SQL file {name} is missing from {sql_dir()}: install the package (pip install), or deploy the plugins "
            "folder that `make dist` builds (bq_backfill/sql/ inside it), or run from the repository (include/sql/)"
        )
    return path.read_text()

"""Fixed SQL lives in include/sql/; this finds it next to the plugins folder, as deployed."""

from __future__ import annotations

from functools import cache
from pathlib import Path

SQL_DIR = Path(__file__).resolve().parents[2] / "include" / "sql"


@cache
def sql_text(name: str) -> str:
    path = SQL_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"SQL file {path} is missing: deploy include/sql/ beside dags/ and plugins/")
    return path.read_text()

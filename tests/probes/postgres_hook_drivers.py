"""What another DAG's Postgres code gets from PostgresHook in this environment, printed as JSON.

`python postgres_hook_drivers.py with|without <conn_id>`: `without` hides psycopg 3 from imports, as in an
environment before this package (and its psycopg 3 requirement) was added.
"""

from __future__ import annotations

import importlib.abc
import json
import sys
import tempfile
from collections.abc import Callable
from typing import Any


class _HidePsycopg3(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "psycopg" or name.startswith("psycopg."):
            raise ImportError(f"{name} is not installed")
        return None


def main(mode: str, conn_id: str) -> dict[str, str]:
    if mode == "without":
        sys.meta_path.insert(0, _HidePsycopg3())
    import psycopg2.extras
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    seen: dict[str, str] = {}

    def probe(name: str, call: Callable[[], Any]) -> None:
        try:
            seen[name] = repr(call())
        except Exception as error:
            seen[name] = f"{type(error).__name__}: {str(error).splitlines()[0]}"

    hook = PostgresHook(postgres_conn_id=conn_id)
    conn = hook.get_conn()
    seen["connection"] = f"{type(conn).__module__}.{type(conn).__qualname__}"
    seen["sqlalchemy driver"] = hook.sqlalchemy_url.drivername
    probe("hook.get_records", lambda: hook.get_records("SELECT %s::int, %s::text", parameters=(1, "a")))
    probe("hook.get_first", lambda: hook.get_first("SELECT %(d)s::date, 1.5::numeric", parameters={"d": "2024-01-02"}))
    out = tempfile.NamedTemporaryFile(suffix=".tsv")
    probe("hook.copy_expert", lambda: hook.copy_expert("COPY (SELECT 1) TO STDOUT", out.name))
    probe("hook.run", lambda: hook.run("SELECT 1"))
    cur = conn.cursor()
    probe("cursor.copy_expert", lambda: cur.copy_expert("COPY (SELECT 1) TO STDOUT", open(out.name, "w")))
    probe("cursor.mogrify", lambda: cur.mogrify("SELECT %s", (1,)))
    probe(
        "psycopg2.extras.execute_values",
        lambda: psycopg2.extras.execute_values(cur, "SELECT * FROM (VALUES %s) v", [(1,)], fetch=True),
    )
    probe("connection.set_session", lambda: hook.get_conn().set_session(readonly=True))
    dict_hook = PostgresHook(postgres_conn_id=conn_id)
    dict_hook.connection.extra = json.dumps({"cursor": "realdictcursor"})
    probe("extra cursor=realdictcursor", lambda: dict_hook.get_first("SELECT 1 AS a"))
    return seen


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])))

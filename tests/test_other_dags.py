"""What adding this package to an environment changes for other DAGs' PostgresHook, measured in a process of its
own (tests/probes/postgres_hook_drivers.py) against the real server: with psycopg 3 installed (it is a requirement
of the package) and SQLAlchemy 2 (Airflow 3's), the postgres provider gives every DAG psycopg 3 connections; the same
environment with psycopg 3 hidden is the environment before. README "Deploy" and docs/platforms.md quote this.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT

PROBE = ROOT / "tests" / "probes" / "postgres_hook_drivers.py"
# the hook's own methods: the same results either way
SAME = ("hook.get_records", "hook.get_first", "hook.copy_expert", "hook.run")
# psycopg2's own API, used directly by a DAG: works before, fails after
PSYCOPG2_ONLY = ("cursor.copy_expert", "cursor.mogrify", "psycopg2.extras.execute_values", "connection.set_session")


def _probe(mode: str) -> dict[str, str]:
    out = subprocess.run(
        [sys.executable, str(PROBE), mode, "postgres_default"],
        capture_output=True, text=True, timeout=120, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def before_and_after(pg_server):
    return _probe("without"), _probe("with")


def test_every_dags_postgres_hook_switches_to_psycopg3(before_and_after):
    before, after = before_and_after
    assert (before["connection"], before["sqlalchemy driver"]) == ("psycopg2.extensions.connection", "postgresql")
    assert (after["connection"], after["sqlalchemy driver"]) == ("psycopg.Connection", "postgresql+psycopg")


def test_the_hooks_own_methods_give_the_same_results(before_and_after):
    before, after = before_and_after
    assert {name: after[name] for name in SAME} == {name: before[name] for name in SAME}
    assert before["hook.get_first"] == "(datetime.date(2024, 1, 2), Decimal('1.5'))"


def test_psycopg2_specific_code_and_the_realdictcursor_extra_stop_working(before_and_after):
    before, after = before_and_after
    for name in PSYCOPG2_ONLY:
        assert not before[name].endswith("Error") and "Error:" not in before[name], (name, before[name])
        assert after[name].startswith("AttributeError:"), (name, after[name])
    assert before["extra cursor=realdictcursor"] == "RealDictRow([('a', 1)])"
    assert after["extra cursor=realdictcursor"].startswith("ValueError: realdictcursor is not supported with psycopg3")

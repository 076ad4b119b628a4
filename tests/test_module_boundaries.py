"""One system per module: the BigQuery side imports nothing of the Postgres side, and the neutral modules (models,
type tables, settings) neither side's client."""

from __future__ import annotations

import ast

import pytest
from helpers import ROOT

PACKAGE = ROOT / "plugins" / "bq_backfill"
POSTGRES_SIDE = {"psycopg", "bq_backfill.sink", "bq_backfill.ledger", "bq_backfill.target_rows", "bq_backfill.pg_text",
                 "bq_backfill.target_checks", "bq_backfill.range_proofs", "bq_backfill.deletions"}  # fmt: skip
BIGQUERY_SIDE = {"google", "bq_backfill.source"}


def _imports(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return names


def _touches(names: set[str], side: set[str]) -> set[str]:
    return {n for n in names if any(n == s or n.startswith(s + ".") for s in side)}


def test_the_bigquery_side_imports_nothing_of_the_postgres_side():
    assert _touches(_imports("source"), POSTGRES_SIDE) == set()


@pytest.mark.parametrize("module", ["models", "type_map", "settings", "validate"])
def test_the_neutral_modules_import_neither_side(module):
    assert _touches(_imports(module), POSTGRES_SIDE | BIGQUERY_SIDE) == set()

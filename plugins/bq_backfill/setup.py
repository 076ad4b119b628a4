"""The explicit setup step: create or upgrade the backfill's tables, the one-active-job index, and the grants of the
role runs connect as. Run once per deployment and after upgrades (the `bigquery_backfill_setup` DAG), through a
connection whose role may change the schema. Runs themselves change no DDL: they check the catalog
(ledger.check_schema) and name what is missing.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg
from psycopg import sql

from bq_backfill import ledger, target_checks
from bq_backfill.models import MODELS
from bq_backfill.settings import check_writer_role
from bq_backfill.sqlfiles import sql_text

log = logging.getLogger(__name__)


def setup_database(conn: psycopg.Connection, writer_role: str | None, grant_delete: bool) -> dict[str, Any]:
    """Applies schema.sql, creates the one-active-job index if no legacy duplicates block it, and grants
    `writer_role` what a run needs (DELETE on the targets only with `grant_delete`). Returns what it did."""
    target_checks.check_server_version(conn.info.server_version)
    if writer_role:
        check_writer_role(writer_role)  # before any DDL
    ledger.apply_schema(conn)
    blocked = ledger.ensure_active_job_index(conn)
    for row in blocked:
        log.warning(
            "one-active-job index over every writer not created: tenant %s model %s has %d pending/running jobs "
            "(legacy duplicates). A backfill run of that tenant+model cleans them up; run this setup again then. "
            "This DAG's own jobs are protected meanwhile by bigquery_backfill_jobs_one_active_run.",
            row["tenant_id"],
            row["model_type"],
            row["active_jobs"],
        )
    if writer_role:
        grant(conn, writer_role, grant_delete)
    targets = sorted({m.target_table for m in MODELS.values()})
    log.info(
        "backfill tables set up: ledger %s, targets %s; one-active-job index %s; %s",
        ", ".join(ledger.LEDGER_TABLES),
        ", ".join(targets),
        "in place" if not blocked else f"blocked by {len(blocked)} tenant+model pairs",
        f"role {writer_role} granted what a run needs" + (" (with DELETE on the targets)" if grant_delete else "")
        if writer_role
        else "no grants (no writer_role given)",
    )
    return {"blocked_pairs": len(blocked), "targets": targets, "writer_role": writer_role}


def grant(conn: psycopg.Connection, role: str, grant_delete: bool) -> None:
    check_writer_role(role)
    if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [role]).fetchone() is None:
        raise LookupError(f"role {role!r} does not exist: create it first (CREATE ROLE {role} LOGIN PASSWORD …)")
    database, schema, owner = conn.execute("SELECT current_database(), current_schema(), current_user").fetchone()
    if role == owner:
        raise PermissionError(
            f"writer_role {role!r} is the role setup runs as (the tables' owner): granting it a run's privileges "
            "would first revoke its own; give the role the backfill runs connect as"
        )
    targets = sql.SQL(", ").join(sql.Identifier(t) for t in sorted({m.target_table for m in MODELS.values()}))
    conn.execute(
        sql.SQL(sql_text("grants.sql")).format(
            role=sql.Identifier(role),
            database=sql.Identifier(database),
            schema=sql.Identifier(schema),
            ledger=sql.SQL(", ").join(map(sql.Identifier, ledger.LEDGER_TABLES)),
            targets=targets,
        )
    )
    if grant_delete:
        conn.execute(sql.SQL("GRANT DELETE ON {} TO {}").format(targets, sql.Identifier(role)))

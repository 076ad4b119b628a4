"""The explicit setup step: create or upgrade the backfill's tables, check every declared model against its source
and target (creating a missing target from the source's schema), and grant the role runs connect as. Run once per
deployment, after upgrades and after the models file changes (the `bigquery_backfill_setup` DAG), through a
connection whose role may change the schema. Runs themselves change no DDL: they check the catalog
(ledger.check_schema) and name what is missing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import psycopg
from psycopg import sql

from bq_backfill import ledger, target_checks, type_map
from bq_backfill.model_file import declared_models
from bq_backfill.models import Declaration, DeclarationError, resolve
from bq_backfill.settings import check_writer_role
from bq_backfill.sqlfiles import sql_text

log = logging.getLogger(__name__)

# a model's source columns and their BigQuery types (BigQuerySource.source_schema of its source table)
SourceSchemas = Callable[[Declaration], Mapping[str, str]]


def setup_database(
    conn: psycopg.Connection, writer_role: str | None, grant_delete: bool, source_schemas: SourceSchemas | None
) -> dict[str, Any]:
    """Applies schema.sql, creates the one-active-job index if no legacy duplicates block it, checks each declared
    model (with `source_schemas`: against its source too, creating a missing target from it), and grants
    `writer_role` what a run needs (DELETE on the targets only with `grant_delete`). Returns what it did; a model
    that cannot run is listed under "problems", naming it and the field, and the others are set up."""
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
    declared = declared_models()
    problems = dict(declared.problems)
    created = []
    for declaration in declared.models.values():
        try:
            with conn.transaction():  # a savepoint: one model's failure leaves the others' DDL in place
                if check_model(conn, declaration, source_schemas):
                    created.append(declaration.target_table)
        except (DeclarationError, LookupError, TypeError, ValueError) as exc:
            problems[declaration.model_type] = str(exc)
        except psycopg.Error as exc:  # e.g. a create_types Postgres does not know: that model only
            problems[declaration.model_type] = f"model {declaration.model_type!r}: Postgres refused its table: {exc}"
    for name, problem in problems.items():
        log.error("model %s cannot be backfilled: %s", name, problem)
    targets = sorted(m.target_table for n, m in declared.models.items() if n not in problems)
    if writer_role:
        grant(conn, writer_role, grant_delete, targets)
    log.info(
        "backfill tables set up: ledger %s; models file %s: targets %s (created: %s)%s; one-active-job index %s; %s",
        ", ".join(ledger.LEDGER_TABLES),
        declared.path,
        ", ".join(targets) or "none",
        ", ".join(created) or "none",
        "" if source_schemas else " (not checked against BigQuery)",
        "in place" if not blocked else f"blocked by {len(blocked)} tenant+model pairs",
        f"role {writer_role} granted what a run needs" + (" (with DELETE on the targets)" if grant_delete else "")
        if writer_role
        else "no grants (no writer_role given)",
    )
    return {
        "blocked_pairs": len(blocked),
        "targets": targets,
        "created": created,
        "problems": problems,
        "writer_role": writer_role,
    }


def check_model(conn: psycopg.Connection, declaration: Declaration, source_schemas: SourceSchemas | None) -> bool:
    """Checks one model against its target (and, given `source_schemas`, its source), creating the target from the
    source's schema if it is missing. Returns whether it created it; raises naming the model and the field."""
    name = declaration.model_type
    exists = bool(target_checks.target_columns(conn, declaration.target_table))
    if source_schemas is None:
        if not exists:
            raise DeclarationError(name, "target_table", f"table {declaration.target_table} does not exist")
        return False
    try:
        source = source_schemas(declaration)
    except Exception as exc:
        raise DeclarationError(name, "source_table", f"{declaration.source_table}: {exc}") from exc
    if not exists:
        create_target(conn, declaration, source)
    for missing in ledger.missing_target(conn, declaration):
        field = "conflict_key" if missing.startswith(("unique", "column")) else "target_table"
        raise DeclarationError(
            name, field, f"{declaration.target_table} lacks {missing}: a run upserts on the conflict key"
        )
    resolve(declaration, target_checks.target_columns(conn, declaration.target_table), source)
    return not exists


def create_target(conn: psycopg.Connection, declaration: Declaration, source: Mapping[str, str]) -> None:
    """CREATE TABLE for a model's target from its source's schema: each column the model reads (its `columns`, or
    every source column), typed by the type table's default (README "Column types") or the declaration's
    create_types, the tenant column as uuid, the key columns NOT NULL and UNIQUE together."""
    d = declaration
    renamed = {s.lower(): t for s, t in d.renames.items()}  # BigQuery's names are case-insensitive, as in resolve
    by_target = {renamed.get(s.lower(), s): (s, t) for s, t in source.items()}
    lower = {name.lower(): name for name in by_target}
    wanted = list(d.selected) if d.selected is not None else list(by_target)
    columns = []
    for target in wanted:
        if target not in by_target and target in lower:
            target = lower[target]
        if target not in by_target:
            raise DeclarationError(d.model_type, "columns", f"{target!r} is not a column of {d.source_table}")
        source_name, bq_type = by_target[target]
        pg_name = target.lower()  # BigQuery's names are case-insensitive: the lower-case name is the same column
        pg_type = d.create_types.get(pg_name) or (
            "uuid" if pg_name == d.tenant_column and bq_type == "STRING" else type_map.created_type(bq_type)
        )
        if pg_type is None:
            raise DeclarationError(
                d.model_type, "columns", f"{type_map.mismatch(source_name, bq_type, 'text')}; leave it out of the "
                "table setup creates with a `columns` list"
            )  # fmt: skip
        key = pg_name in d.conflict_key
        columns.append(
            sql.SQL("{} {}{}").format(
                sql.Identifier(pg_name), sql.SQL(pg_type), sql.SQL(" NOT NULL" if key else "")
            )
        )  # fmt: skip
    unknown = [c for c in d.create_types if c not in {w.lower() for w in wanted}]
    if unknown:
        raise DeclarationError(d.model_type, "create_types", f"names columns the table would not have: {unknown}")
    constraint = f"{d.target_table}_key"[:63]
    conn.execute(
        sql.SQL("CREATE TABLE {} ({}, CONSTRAINT {} UNIQUE ({}))").format(
            sql.Identifier(d.target_table),
            sql.SQL(", ").join(columns),
            sql.Identifier(constraint),
            sql.SQL(", ").join(map(sql.Identifier, d.conflict_key)),
        )
    )
    log.info("model %s: created table %s from %s's schema", d.model_type, d.target_table, d.source_table)


def grant(conn: psycopg.Connection, role: str, grant_delete: bool, target_tables: list[str]) -> None:
    check_writer_role(role)
    if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [role]).fetchone() is None:
        raise LookupError(f"role {role!r} does not exist: create it first (CREATE ROLE {role} LOGIN PASSWORD …)")
    database, schema, owner = conn.execute("SELECT current_database(), current_schema(), current_user").fetchone()
    if role == owner:
        raise PermissionError(
            f"writer_role {role!r} is the role setup runs as (the tables' owner): granting it a run's privileges "
            "would first revoke its own; give the role the backfill runs connect as"
        )
    ledger_tables = [sql.Identifier(t) for t in ledger.LEDGER_TABLES]
    targets = sql.SQL(", ").join(map(sql.Identifier, target_tables))
    conn.execute(
        sql.SQL(sql_text("grants.sql")).format(
            role=sql.Identifier(role),
            database=sql.Identifier(database),
            schema=sql.Identifier(schema),
            tables=sql.SQL(", ").join([*ledger_tables, *map(sql.Identifier, target_tables)]),
            ledger=sql.SQL(", ").join(ledger_tables),
        )
    )
    if not target_tables:
        return
    conn.execute(sql.SQL(sql_text("grant_targets.sql")).format(targets=targets, role=sql.Identifier(role)))
    if grant_delete:
        conn.execute(sql.SQL("GRANT DELETE ON {} TO {}").format(targets, sql.Identifier(role)))

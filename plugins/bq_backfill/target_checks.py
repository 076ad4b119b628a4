"""What a run refuses in the target database before it reads anything, and what each chunk's writes must verify.

Checked by cleanup, each naming the table, the role and the fix:
- the server's major version (the ledger needs pg_current_snapshot, xid8 and a built-in gen_random_uuid);
- each model column's type against the target column's actual type (format_type): the run's columns were
  resolved from the catalog at cleanup, and a column altered since would make COPY round or truncate silently;
- row-level security active for the run's role on the target or a ledger table (COPY FROM refuses such a table,
  and a policy that hides rows would make the key, version and deletion checks wrong);
- rules on those tables (COPY ignores rules, INSERT ... ON CONFLICT refuses a table with INSERT or UPDATE rules).
Each chunk checks them again (write_guards).

Triggers are allowed: a chunk asks which fire on its writes (write_guards) and, when one does, writes only by the
staged upsert, whose result it checks value for value (sink.upsert_staged); finalize checks that delete_missing
left no row it was to delete (a DELETE trigger can keep one).
"""

from __future__ import annotations

import psycopg
from psycopg import sql

from bq_backfill import sink
from bq_backfill.models import Model, TargetColumn
from bq_backfill.sqlfiles import sql_text

OLDEST_SERVER = 13  # pg_current_snapshot() and xid8 (13), gen_random_uuid() without pgcrypto (13)
MODEL_TYPES = sql.Identifier("backfill_model_types")


class TargetRefusedError(RuntimeError):
    """The target database is shaped in a way a run cannot write correctly: refused before anything is read."""


def check_server_version(version_num: int) -> None:
    """Refuses a server older than OLDEST_SERVER; `version_num` as libpq reports it (e.g. 150019)."""
    major = version_num // 10_000
    if major < OLDEST_SERVER:
        shown = f"{major}.{version_num % 10_000}" if major >= 10 else f"{major}.{version_num // 100 % 100}"
        raise TargetRefusedError(
            f"the Postgres server runs version {shown}; the backfill needs PostgreSQL {OLDEST_SERVER} or newer "
            "(pg_current_snapshot, xid8, gen_random_uuid): upgrade the server"
        )


def check_target(conn: psycopg.Connection, model: Model, ledger_tables: tuple[str, ...]) -> None:
    """Refuses (TargetRefusedError) a target that the run's writes cannot land in exactly; see the module's text."""
    check_server_version(conn.info.server_version)
    mismatched = column_type_mismatches(conn, model)
    if mismatched:
        shown = "; ".join(f"{c}: the run has {want}, the table now {have}" for c, want, have in mismatched)
        raise TargetRefusedError(
            f"table {model.target_table} has columns of other types than this run of model {model.model_type!r} "
            f"resolved at its start: {shown}. Values would be rounded or refused as they land: the table was "
            "altered during the run; trigger a new run (it reads the types again)"
        )
    for table, role, rls, rules in conn.execute(
        sql_text("target_guards.sql"), {"tables": [model.target_table, *ledger_tables]}
    ).fetchall():
        if rls:
            raise TargetRefusedError(
                f"row-level security is active on table {table} for role {role}: COPY cannot write into it and "
                "its policies would hide rows from the run's checks. Either let the role bypass it (as a "
                f"superuser: ALTER ROLE {role} BYPASSRLS) or turn it off for the table (ALTER TABLE {table} "
                "DISABLE ROW LEVEL SECURITY), then trigger again"
            )
        if rules:
            raise TargetRefusedError(
                f"table {table} has rules ({', '.join(rules)}); role {role} cannot write through them exactly: "
                "COPY ignores rules and INSERT ... ON CONFLICT refuses a table with INSERT or UPDATE rules. Drop "
                f"them (DROP RULE name ON {table}) or turn them into triggers, then trigger again"
            )


def target_columns(conn: psycopg.Connection, table: str) -> list[TargetColumn]:
    """The target table's columns as the catalog has them (empty: no such table)."""
    return [TargetColumn(*row) for row in conn.execute(sql_text("target_columns.sql"), {"target_table": table})]


def column_type_mismatches(conn: psycopg.Connection, model: Model) -> list[tuple[str, str, str]]:
    """(column, model type, target type) for each model column whose target type differs, both as Postgres spells
    them: the model's types are read back from a transaction-scoped temp table declared with them."""
    sink.create_temp_table(conn, MODEL_TYPES, model, model.column_names)
    rows = conn.execute(
        sql_text("column_type_mismatches.sql"),
        {"model_table": f"pg_temp.{MODEL_TYPES.as_string(conn)}", "target_table": model.target_table},
    ).fetchall()
    return [(name, want, have) for name, want, have in rows]


INSERT_OR_UPDATE, DELETE = 4 | 16, 8  # pg_trigger.tgtype's event bits


def write_guards(conn: psycopg.Connection, model: Model, ledger_tables: tuple[str, ...]) -> tuple[str, ...]:
    """For a chunk's transaction: locks the target against schema changes until it ends (ROW EXCLUSIVE, what the
    writes take anyway: ALTER TABLE, CREATE TRIGGER and CREATE RULE wait for it), checks again what cleanup checked
    (hours may have passed), and returns the user triggers that would fire on its inserts or updates (none: every
    write path is exact)."""
    conn.execute(sql.SQL("LOCK TABLE {} IN ROW EXCLUSIVE MODE").format(sql.Identifier(model.target_table)))
    check_target(conn, model, ledger_tables)
    return firing_triggers(conn, model, INSERT_OR_UPDATE)


def firing_triggers(conn: psycopg.Connection, model: Model, events: int) -> tuple[str, ...]:
    """The user triggers on the target that fire on this session's writes of these events (INSERT_OR_UPDATE,
    DELETE)."""
    row = conn.execute(sql_text("write_guards.sql"), {"target_table": model.target_table, "events": events}).fetchone()
    return tuple(row[0] or ()) if row else ()

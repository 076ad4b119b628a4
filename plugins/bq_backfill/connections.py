"""The two connections a run uses: Postgres through PostgresHook (psycopg 3), BigQuery through the google provider.

Every connection works through a connection pooler in transaction mode: nothing outlives its transaction (no
prepared statement, no session setting, no session lock; temp tables are dropped on commit). Every wait is bounded.
A Postgres transaction of this package starts by setting, for itself only: a statement timeout, a lock timeout (a chunk
behind the leftover session of a killed attempt, or behind another session's uncommitted key, fails as transient
and is retried), an idle-in-transaction timeout, and TCP keepalives, with which the server ends the session of a
worker that vanished without closing its connection.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import psycopg

from bq_backfill.settings import Settings
from bq_backfill.source import BigQuerySource, TableRef

# (server setting, environment variable, default in seconds); read at connection time.
PG_TIMEOUTS = (
    ("statement_timeout", "BACKFILL_PG_STATEMENT_TIMEOUT_SECONDS", 900),
    ("lock_timeout", "BACKFILL_PG_LOCK_TIMEOUT_SECONDS", 120),
    ("idle_in_transaction_session_timeout", "BACKFILL_PG_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS", 600),
)
PG_KEEPALIVES = (("tcp_keepalives_idle", 30), ("tcp_keepalives_interval", 10), ("tcp_keepalives_count", 3))


def pg_session_settings() -> dict[str, str]:
    """What each transaction sets for itself: the timeouts (from the environment) and the server's keepalives."""
    settings = {}
    for name, variable, default in PG_TIMEOUTS:
        raw = os.environ.get(variable, str(default))
        try:
            seconds = float(raw)
        except ValueError:
            raise ValueError(f"{variable} must be a number of seconds, not {raw!r}") from None
        if seconds <= 0:
            raise ValueError(f"{variable} must be a positive number of seconds, not {raw!r}")
        settings[name] = f"{int(seconds * 1000)}ms"
    settings.update((name, str(value)) for name, value in PG_KEEPALIVES)
    return settings


# What a server or pooler answers at connect time that waiting does not change (libpq gives no SQLSTATE there)
_REFUSED_FOR_GOOD = (
    "does not exist",
    "password authentication failed",
    "no pg_hba.conf entry",
    "no such database",
    "no such user",
    "permission denied",
)


def connect_error(message: str, exc: Exception) -> Exception:
    """A connection that failed, as an error that says whether a retry can help: ConnectionError (transient: a
    server restarting, a pooler with no free slot) or LookupError / PermissionError (an undefined connection, an
    unknown database or role, a refused password: fix it, then clear)."""
    if type(exc).__name__ == "AirflowNotFoundException":
        return LookupError(f"{message}: define the connection in Airflow (or AIRFLOW_CONN_*), then clear")
    text = str(exc)
    if any(phrase in text for phrase in _REFUSED_FOR_GOOD):
        return PermissionError(message)
    return ConnectionError(message)


@contextmanager
def postgres(conn_id: str) -> Iterator[psycopg.Connection]:
    """A psycopg 3 connection from PostgresHook; one transaction, committed on success, rolled back on error."""
    with postgres_transactions(conn_id) as transaction, transaction() as conn:
        yield conn


@contextmanager
def postgres_transactions(conn_id: str) -> Iterator[Callable[[], AbstractContextManager[psycopg.Connection]]]:
    """One connection for many transactions (a fleet's jobs, one after the other): each `with transaction() as
    conn:` is one, as postgres() makes it."""
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    settings = pg_session_settings()
    try:
        conn = PostgresHook(postgres_conn_id=conn_id).get_conn()
    except Exception as exc:  # not defined (AirflowNotFoundException), refused, bad password, unknown database
        raise connect_error(f"cannot connect to Postgres connection {conn_id!r}: {exc}".strip(), exc) from exc
    if not isinstance(conn, psycopg.Connection):
        conn.close()
        raise TypeError(
            f"PostgresHook gave connection {conn_id!r} a {type(conn).__module__} connection, not psycopg 3: the "
            "postgres provider uses psycopg 3 only where psycopg[binary]>=3.2.10 and SQLAlchemy 2 are installed "
            "(docs/platforms.md)"
        )
    # Never a server-side prepared statement: behind a pooler in transaction mode the next client of the same
    # server connection would meet this one's ("prepared statement _pg3_0 already exists").
    conn.prepare_threshold = None

    @contextmanager
    def transaction() -> Iterator[psycopg.Connection]:
        try:
            with conn.transaction():
                conn.execute(
                    "SELECT " + ", ".join("set_config(%s, %s, true)" for _ in settings),
                    [v for item in settings.items() for v in item],
                )
                yield conn
        except psycopg.DatabaseError as exc:
            if conn.broken and not isinstance(exc, psycopg.OperationalError):
                # the session ended under the statement (a server or pooler connection cut): whatever the driver made
                # of the last messages, the transaction is gone, and a retry can succeed
                raise psycopg.OperationalError(f"the Postgres connection {conn_id!r} was lost: {exc}") from exc
            raise

    try:
        yield transaction
    finally:
        conn.close()


def bigquery(conn_id: str) -> BigQuerySource:
    try:
        return BigQuerySource.from_connection(conn_id)
    except Exception as exc:  # the hook raises several driver errors for a missing or broken connection
        raise connect_error(f"cannot use BigQuery connection {conn_id!r}: {exc}", exc) from exc


def source_table(s: Settings, bq: BigQuerySource) -> TableRef:
    return bq.table(s.source_table or s.declaration.source_table)

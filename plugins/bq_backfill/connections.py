"""The two connections a run uses: Postgres through PostgresHook (psycopg 3), BigQuery through the google provider."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from bq_backfill.settings import Settings
from bq_backfill.source import BigQuerySource, TableRef


@contextmanager
def postgres(conn_id: str) -> Iterator[psycopg.Connection]:
    """A psycopg 3 connection from PostgresHook; one transaction, committed on success, rolled back on error."""
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    try:
        conn = PostgresHook(postgres_conn_id=conn_id).get_conn()
    except Exception as exc:  # not defined (AirflowNotFoundException), refused, bad password, unknown database
        raise ConnectionError(f"cannot connect to Postgres connection {conn_id!r}: {exc}".strip()) from exc
    if not isinstance(conn, psycopg.Connection):
        raise TypeError(f"connection {conn_id!r} did not give a psycopg 3 connection; install psycopg[binary]")
    try:
        with conn.transaction():
            yield conn
    finally:
        conn.close()


def bigquery(conn_id: str) -> BigQuerySource:
    try:
        return BigQuerySource.from_connection(conn_id)
    except Exception as exc:  # the hook raises several driver errors for a missing or broken connection
        raise ConnectionError(f"cannot use BigQuery connection {conn_id!r}: {exc}") from exc


def source_table(s: Settings, bq: BigQuerySource) -> TableRef:
    return bq.table(s.source_table or s.model.source_table)

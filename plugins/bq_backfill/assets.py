"""The Airflow Asset a completed backfill updates: the model's target table, named as Airflow's Postgres provider
names Postgres tables (postgres://host:port/database/schema/table), so a DAG scheduled on it starts after each
completed backfill."""

from __future__ import annotations

from typing import Any

import psycopg


def target_uri(conn_id: str, conn: psycopg.Connection, table: str) -> str:
    from airflow.sdk import BaseHook

    c = BaseHook.get_connection(conn_id)
    database, schema = conn.execute("SELECT current_database(), current_schema()").fetchone()
    host = c.host if c.host and not c.host.startswith("/") else "localhost"  # a socket directory is no host name
    return f"postgres://{host}:{c.port or 5432}/{database}/{schema}/{table}"


def event_extra(totals: dict[str, Any], tenant_id: str, model_type: str, job_id: str) -> dict[str, Any]:
    return {
        "tenant_id": tenant_id,
        "model_type": model_type,
        "job_id": job_id,
        **{k: int(totals.get(k, 0)) for k in ("inserted", "updated", "unchanged", "rejected")},
    }

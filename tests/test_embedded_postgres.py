"""On a machine with no PostgreSQL running, the tools fall back to an embedded server (the pgserver wheel).

Here that server is started on purpose next to the usual one, and the DAG backfills into it through another
connection id given in conf: the Postgres side depends only on the connection.
"""

from __future__ import annotations

import psycopg
import pytest
from helpers import conf, jobs

from bq_backfill.setup import setup_database
from devtools import services
from devtools.seed import SEED_TENANT, as_tuples, create_source, inventory_rows, inventory_schema, target_rows


@pytest.fixture
def embedded_pg(monkeypatch):
    monkeypatch.setenv("BACKFILL_PG_DSN", "embedded")
    with services.postgres_server() as admin:
        assert "host=/" in admin  # a socket directory of its own, not the server at 127.0.0.1:5432
        dsn = services.recreate_database(admin, "backfill_target")
        with psycopg.connect(dsn, autocommit=True) as conn:
            setup_database(conn, None, False, inventory_schema)  # the deployment's setup step
        monkeypatch.setenv("AIRFLOW_CONN_EMBEDDED_TARGET", services.airflow_conn_uri(dsn))
        yield dsn


def test_backfill_into_an_embedded_server_through_another_connection_id(embedded_pg, bq, backfill_dag):
    source = inventory_rows(SEED_TENANT, 700)
    create_source(bq, source)

    dr = backfill_dag.test(run_conf=conf(postgres_conn_id="embedded_target", chunk_size=300))

    assert dr.state == "success"
    with psycopg.connect(embedded_pg) as conn:
        assert target_rows(conn, SEED_TENANT) == as_tuples(source)
        [job] = jobs(conn)
        assert job["status"] == "completed" and job["processed_records"] == 700

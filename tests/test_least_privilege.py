"""Runs need only what include/sql/grants.sql gives the writer role: whole backfills (cold, re-run, resume after a
failed chunk, quarantine) run as that role, which cannot drop, truncate, alter or delete from the target, nor read a
table it was not granted."""

from __future__ import annotations

import os

import psycopg
import pytest
from airflow_run import clear_with_downstream, drive
from helpers import chunks, conf, jobs
from psycopg import sql
from test_resume import poison_trigger

from bq_backfill.setup import setup_database
from devtools import services
from devtools.seed import SEED_TENANT, as_tuples, create_source, inventory_rows, legacy_jobs, target_rows

ROLE = f"backfill_writer_{os.getpid()}"  # roles are the server's, not the database's: one of this session's own


@pytest.fixture
def writer(pg, monkeypatch):
    """The writer role, granted by the setup step (run as the tables' owner); the DSN it logs in with."""
    role = sql.Identifier(ROLE)
    if pg.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [ROLE]).fetchone() is None:
        pg.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'writer-password'").format(role))
    setup_database(pg, ROLE, grant_delete=False)
    info = psycopg.conninfo.conninfo_to_dict(pg.info.dsn)
    dsn = psycopg.conninfo.make_conninfo(**{**info, "user": ROLE, "password": "writer-password"})
    monkeypatch.setenv("AIRFLOW_CONN_WRITER_PG", services.airflow_conn_uri(dsn))
    # who really wrote: the login role of every session that inserts into the target, noted by its owner
    pg.execute("CREATE TABLE writers (login text)")
    pg.execute(
        "CREATE FUNCTION note_writer() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$ "
        "BEGIN INSERT INTO writers VALUES (session_user); RETURN NULL; END $$"
    )
    pg.execute(
        "CREATE TRIGGER note_writer AFTER INSERT OR UPDATE ON inventory_movements "
        "FOR EACH STATEMENT EXECUTE FUNCTION note_writer()"
    )
    yield dsn
    pg.execute(sql.SQL("DROP OWNED BY {}").format(role))
    pg.execute(sql.SQL("DROP ROLE {}").format(role))


def test_whole_backfills_run_as_the_writer_role(pg, bq, backfill_dag, writer):
    rows = inventory_rows(SEED_TENANT, 1_200)
    create_source(bq, [*rows, dict(rows[0], product_code=None)])  # one row for the quarantine
    legacy_jobs(pg, SEED_TENANT, "inventory", running=1, pending=0, failed=3)  # stale jobs for cleanup to delete
    poison_trigger(pg)
    run = conf(postgres_conn_id="writer_pg", max_rejected_rows=1)

    dr = backfill_dag.test(run_conf=run)  # cold; chunk 3 fails
    assert dr.state == "failed"
    pg.execute("DROP TRIGGER refuse_poison ON inventory_movements")
    clear_with_downstream(backfill_dag, dr.run_id, [("load_chunk", 3)])
    assert drive(backfill_dag, dr.run_id).state == "success"  # resumed
    assert backfill_dag.test(run_conf=run).state == "success"  # re-run, nothing changed

    assert target_rows(pg, SEED_TENANT) == as_tuples(rows)
    first, again = jobs(pg)
    assert (first["status"], first["rejected_records"], again["status"]) == ("completed", 1, "completed")
    assert {c["write_path"] for c in chunks(pg, again["id"])} == {"proven"}
    assert {w for (w,) in pg.execute("SELECT DISTINCT login FROM writers")} == {ROLE}


@pytest.mark.parametrize(
    "statement",
    [
        "DROP TABLE inventory_movements",
        "TRUNCATE inventory_movements",
        "ALTER TABLE inventory_movements ADD COLUMN x int",
        "DELETE FROM inventory_movements",
        "CREATE TABLE mine (x int)",
        "SELECT * FROM not_granted",
        "DROP TABLE bigquery_backfill_jobs",
        "ALTER TABLE bigquery_backfill_jobs ADD COLUMN x int",
    ],
)
def test_the_writer_role_cannot_change_the_schema_nor_read_what_it_was_not_granted(pg, writer, statement):
    pg.execute("CREATE TABLE not_granted (secret text)")
    with psycopg.connect(writer) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute(statement)


def test_the_setup_itself_refuses_to_run_as_the_writer_role(pg, writer):
    with psycopg.connect(writer) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        setup_database(conn, None, False)


def test_the_setup_dag_grants_the_writer_role(pg_bare, airflow_db, pg_server, monkeypatch):
    from airflow.dag_processing.dagbag import DagBag
    from helpers import ROOT

    role = sql.Identifier(ROLE)
    if pg_bare.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [ROLE]).fetchone() is None:
        pg_bare.execute(sql.SQL("CREATE ROLE {} LOGIN").format(role))
    setup = DagBag(dag_folder=str(ROOT / "dags")).get_dag("bigquery_backfill_setup")
    assert setup.params.get_param("postgres_conn_id").schema["enum"] == ["postgres_default"]

    dr = setup.test(run_conf={"writer_role": ROLE, "grant_delete": True})

    assert dr.state == "success"
    granted = pg_bare.execute(
        "SELECT table_name, string_agg(privilege_type, ',' ORDER BY privilege_type) "
        "FROM information_schema.role_table_grants WHERE grantee = %s GROUP BY 1 ORDER BY 1",
        [ROLE],
    ).fetchall()
    ledger = "DELETE,INSERT,SELECT,UPDATE"
    assert granted == [
        ("backfill_chunks", ledger),
        ("backfill_quarantine", ledger),
        ("backfill_range_proofs", ledger),
        ("backfill_source_progress", ledger),
        ("bigquery_backfill_jobs", ledger),
        ("inventory_movements", "DELETE,INSERT,SELECT,UPDATE"),  # DELETE: grant_delete, for delete_missing runs
    ]
    pg_bare.execute(sql.SQL("DROP OWNED BY {}").format(role))
    pg_bare.execute(sql.SQL("DROP ROLE {}").format(role))

"""Runs need only what include/sql/grants.sql gives the writer role: whole backfills (cold, re-run, resume after a
failed chunk, quarantine) run as that role, which cannot drop, truncate, alter or delete from the target, nor read a
table it was not granted."""

from __future__ import annotations

import psycopg
import pytest
from airflow_run import clear_with_downstream, drive
from helpers import WRITER_ROLE, chunks, conf, jobs
from psycopg import sql
from test_resume import cure_poison, poison

from bq_backfill.setup import setup_database
from devtools.seed import (
    SEED_TENANT,
    as_tuples,
    create_source,
    inventory_rows,
    inventory_schema,
    legacy_jobs,
    target_rows,
)

ROLE = WRITER_ROLE


@pytest.fixture
def writer(pg, writer_role):
    """The writer role (conftest's writer_role), with a note of every session that writes the target."""
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
    return writer_role


def test_whole_backfills_run_as_the_writer_role(pg, bq, backfill_dag, writer):
    rows = inventory_rows(SEED_TENANT, 1_200)
    create_source(bq, [*rows, dict(rows[0], product_code=None)])  # one row for the quarantine
    legacy_jobs(pg, SEED_TENANT, "inventory", running=1, pending=0, failed=3)  # stale jobs for cleanup to delete
    poison(pg)
    run = conf(postgres_conn_id="writer_pg", max_rejected_rows=1)

    dr = backfill_dag.test(run_conf=run)  # cold; chunk 3 fails
    assert dr.state == "failed"
    cure_poison(pg)
    clear_with_downstream(backfill_dag, dr.run_id, [("load_chunk", 3)])
    assert drive(backfill_dag, dr.run_id).state == "success"  # resumed
    assert backfill_dag.test(run_conf=run).state == "success"  # re-run, nothing changed

    assert target_rows(pg, SEED_TENANT) == as_tuples(rows)
    first, again = jobs(pg)
    assert (first["status"], first["rejected_records"], again["status"]) == ("completed", 1, "completed")
    # the note_writer trigger fires on the target's writes: chunks upsert and check, never COPY; a re-run compares
    assert {c["write_path"] for c in chunks(pg, first["id"])} == {"upsert"}
    assert {c["write_path"] for c in chunks(pg, again["id"])} == {"unchanged"}
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
        setup_database(conn, None, False, inventory_schema)


def test_the_setup_dag_grants_the_writer_role(pg_bare, airflow_db, pg_server, monkeypatch):
    from airflow.dag_processing.dagbag import DagBag
    from helpers import ROOT

    role = sql.Identifier(ROLE)
    if pg_bare.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [ROLE]).fetchone() is None:
        pg_bare.execute(sql.SQL("CREATE ROLE {} LOGIN").format(role))
    setup = DagBag(dag_folder=str(ROOT / "dags")).get_dag("bigquery_backfill_setup")
    assert setup.params.get_param("postgres_conn_id").schema["enum"] == ["postgres_default", "pooled_pg"]

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


def test_the_setup_grants_only_roles_the_deployment_allows(pg_bare, airflow_db, pg_server, monkeypatch):
    """Setup revokes what a writer role held before granting: whoever may trigger it must not name any role."""
    from airflow.dag_processing.dagbag import DagBag
    from helpers import ROOT

    setup = DagBag(dag_folder=str(ROOT / "dags")).get_dag("bigquery_backfill_setup")
    assert setup.params.get_param("writer_role").schema["enum"] == [None, ROLE]  # the trigger form and the API
    for role in ("postgres", "pg_monitor", "someone_else"):
        with pytest.raises(PermissionError, match=f"writer_role '{role}' is not allowed by this deployment"):
            setup_database(pg_bare, role, grant_delete=False, source_schemas=inventory_schema)
    monkeypatch.setenv("AIRFLOW__BIGQUERY_BACKFILL__ALLOWED_WRITER_ROLES", f"{ROLE},postgres")
    with pytest.raises(PermissionError, match="is the role setup runs as"):
        setup_database(
            pg_bare, "postgres", grant_delete=False, source_schemas=inventory_schema
        )  # would revoke the owner's own

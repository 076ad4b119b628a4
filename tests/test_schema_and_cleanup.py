"""schema.sql is idempotent and upgrades the legacy tables; cleanup removes only one tenant+model's stale rows."""

from __future__ import annotations

import logging

import psycopg
import pytest
from helpers import INVENTORY, table_state
from psycopg import sql

from bq_backfill import ledger
from bq_backfill.ledger import RunKey
from bq_backfill.setup import check_model, setup_database
from bq_backfill.tasks.cleanup import cleanup_stale_jobs
from devtools.seed import (
    OTHER_TENANT,
    SEED_TENANT,
    create_source,
    insert_target,
    inventory_rows,
    inventory_schema,
    legacy_jobs,
)

RUN = RunKey("bigquery_backfill", "manual__test")
MODEL = INVENTORY


def unknown_to_airflow(dag_id: str, run_id: str) -> None:
    """Airflow's answer about a dag run it has no record of (these tests run no dag)."""
    return None


CATALOG = """
    SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
           pg_get_expr(d.adbin, d.adrelid)
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
    LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
    WHERE n.nspname = 'public'
    UNION ALL
    SELECT indexrelid::regclass::text, pg_get_indexdef(indexrelid), NULL, NULL, NULL FROM pg_index i
    JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public'
    ORDER BY 1, 2
"""


def test_schema_applies_twice_without_change(pg):
    ledger.apply_schema(pg)
    first = pg.execute(CATALOG).fetchall()
    ledger.apply_schema(pg)
    assert pg.execute(CATALOG).fetchall() == first


def test_the_catalog_check_lists_exactly_what_schema_sql_creates(pg_bare):
    pg = pg_bare
    assert {
        "table inventory_movements",
        "column bigquery_backfill_jobs.id",
        "index bigquery_backfill_jobs.bigquery_backfill_jobs_run_tenant",
    } <= set(ledger.missing_schema(pg, MODEL))
    ledger.apply_schema(pg)
    assert ledger.missing_schema(pg, MODEL) == ["table inventory_movements"]  # created by setup, from the source
    check_model(pg, MODEL, inventory_schema)
    assert ledger.missing_schema(pg, MODEL) == []
    # every ledger column and index schema.sql makes is one the check looks for: dropping any is noticed
    ledger_tables = ["bigquery_backfill_jobs", "backfill_source_progress", "backfill_chunks", "backfill_quarantine",
                     "backfill_range_proofs"]  # fmt: skip
    columns = pg.execute(
        "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = 'public' "
        "AND table_name = ANY(%s)",
        (ledger_tables,),
    ).fetchall()
    indexes = pg.execute(
        "SELECT tablename, indexname FROM pg_indexes WHERE schemaname = 'public' AND tablename = ANY(%s)",
        (ledger_tables,),
    ).fetchall()
    for kind, objects in (("column", columns), ("index", indexes)):
        for table, name in objects:
            with pg.transaction():
                if kind == "column":
                    drop = sql.SQL("ALTER TABLE {} DROP COLUMN {} CASCADE")
                    pg.execute(drop.format(*map(sql.Identifier, (table, name))))
                else:
                    pg.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT IF EXISTS {} CASCADE").format(
                        *map(sql.Identifier, (table, name))))  # fmt: skip
                    pg.execute(sql.SQL("DROP INDEX IF EXISTS {} CASCADE").format(sql.Identifier(name)))
                assert f"{kind} {table}.{name}" in ledger.missing_schema(pg, MODEL)
                raise psycopg.Rollback()


def test_the_target_table_is_checked_against_its_model(pg):
    pg.execute("ALTER TABLE inventory_movements DROP CONSTRAINT inventory_movements_key")
    pg.execute("CREATE UNIQUE INDEX wrong_key ON inventory_movements (tenant_id, movement_date, branch_id)")
    pg.execute("ALTER TABLE inventory_movements DROP COLUMN product_code CASCADE")

    assert ledger.missing_schema(pg, MODEL) == [
        "column inventory_movements.product_code",
        "unique index on inventory_movements (tenant_id, movement_date, branch_id, product_code)",
    ]


def test_a_run_on_tables_not_set_up_fails_naming_what_is_missing_and_the_setup(pg_bare, bq, backfill_dag, caplog):
    create_source(bq, inventory_rows(SEED_TENANT, 10))
    pg_bare.execute("CREATE TABLE bigquery_backfill_jobs (id uuid PRIMARY KEY, tenant_id uuid, model_type text)")

    dr = backfill_dag.test(run_conf={"tenant_id": SEED_TENANT})

    assert dr.state == "failed"
    assert "the backfill tables are not set up: missing column bigquery_backfill_jobs.status" in caplog.text
    assert "trigger the DAG bigquery_backfill_setup" in caplog.text
    tables = pg_bare.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")
    assert [t for (t,) in tables] == ["bigquery_backfill_jobs"]  # a run created nothing, changed nothing


def test_schema_upgrades_legacy_tables_and_keeps_their_rows(pg_bare):
    pg = pg_bare
    pg.execute(
        """
        CREATE TABLE bigquery_backfill_jobs (
            id uuid PRIMARY KEY DEFAULT gen_random_uuid(), tenant_id uuid NOT NULL, model_type text NOT NULL,
            status text NOT NULL DEFAULT 'pending', total_records bigint, processed_records bigint NOT NULL DEFAULT 0,
            created_at timestamptz NOT NULL DEFAULT now(), updated_at timestamptz NOT NULL DEFAULT now());
        CREATE TABLE backfill_source_progress (
            id bigserial PRIMARY KEY, job_id uuid NOT NULL, source_table text NOT NULL, last_offset bigint NOT NULL
            DEFAULT 0, records_synced bigint NOT NULL DEFAULT 0, status text NOT NULL DEFAULT 'pending',
            updated_at timestamptz NOT NULL DEFAULT now());
        """
    )
    legacy_jobs(pg, SEED_TENANT, "inventory", running=1, pending=2)
    before = pg.execute("SELECT id, status FROM bigquery_backfill_jobs ORDER BY id").fetchall()

    ledger.apply_schema(pg)

    assert pg.execute("SELECT id, status FROM bigquery_backfill_jobs ORDER BY id").fetchall() == before
    cols = {
        r[0]
        for r in pg.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'bigquery_backfill_jobs'"
        )
    }
    assert {"dag_id", "dag_run_id", "snapshot_table", "error_message", "completed_at"} <= cols


def _populated(pg):
    ledger.apply_schema(pg)
    legacy_jobs(pg, SEED_TENANT, "inventory", running=1, pending=206, failed=2)
    legacy_jobs(pg, SEED_TENANT, "sales", running=1, pending=1)
    legacy_jobs(pg, OTHER_TENANT, "inventory", running=1, pending=1)
    pg.execute(
        "INSERT INTO bigquery_backfill_jobs (tenant_id, model_type, status) VALUES (%s, 'inventory', 'completed')",
        (SEED_TENANT,),
    )
    insert_target(pg, inventory_rows(SEED_TENANT, 30) + inventory_rows(OTHER_TENANT, 10))


def test_cleanup_deletes_only_the_targeted_tenant_and_model(pg):
    _populated(pg)
    keep = "NOT (tenant_id = %s AND model_type = 'inventory' AND status <> 'completed')"
    jobs_kept = table_state(pg, "bigquery_backfill_jobs", keep, (SEED_TENANT,))
    progress_kept = table_state(
        pg,
        "backfill_source_progress",
        f"job_id IN (SELECT id FROM bigquery_backfill_jobs WHERE {keep})",  # noqa: S608 - fixed test text
        (SEED_TENANT,),
    )
    target = table_state(pg, "inventory_movements")

    with pg.transaction():
        assert ledger.stale_job_refusals(pg, RUN, [SEED_TENANT], "inventory", unknown_to_airflow) == {}
        [deleted] = ledger.delete_stale_jobs(pg, RUN, [SEED_TENANT], "inventory").values()
        blocked = ledger.ensure_active_job_index(pg)

    assert deleted == {
        "jobs_deleted": 209,
        "pending_deleted": 206,
        "running_deleted": 1,
        "failed_deleted": 2,
        "progress_deleted": 209,
    }
    # other pairs still hold duplicates, so the index waits for their own backfill runs
    assert [(str(r["tenant_id"]), r["model_type"], r["active_jobs"]) for r in blocked] == [
        (OTHER_TENANT, "inventory", 2),
        (SEED_TENANT, "sales", 2),
    ]
    assert table_state(pg, "bigquery_backfill_jobs") == jobs_kept  # the completed job stays as history
    assert table_state(pg, "backfill_source_progress") == progress_kept
    assert table_state(pg, "inventory_movements") == target


def test_one_active_job_index_refuses_a_second_pending_job(pg):
    ledger.apply_schema(pg)
    legacy_jobs(pg, SEED_TENANT, "inventory", running=1, pending=206)
    with pg.transaction():
        ledger.delete_stale_jobs(pg, RUN, [SEED_TENANT], "inventory")
        assert ledger.ensure_active_job_index(pg) == []
    legacy_jobs(pg, SEED_TENANT, "inventory", running=0, pending=1)  # one active job: allowed

    with pytest.raises(psycopg.errors.UniqueViolation, match="bigquery_backfill_jobs_one_active"):
        legacy_jobs(pg, SEED_TENANT, "inventory", running=0, pending=1)


def test_setup_with_legacy_duplicates_warns_and_a_run_says_the_index_is_missing(pg, bq, caplog):
    create_source(bq, inventory_rows(SEED_TENANT, 10))  # cleanup checks the source first
    _populated(pg)

    with caplog.at_level(logging.INFO):
        done = setup_database(pg, None, False, inventory_schema)
        cleanup_stale_jobs(_settings(), RUN, run_active=unknown_to_airflow)

    assert done["blocked_pairs"] == 3
    assert f"tenant {OTHER_TENANT} model inventory has 2 pending/running jobs (legacy duplicates)" in caplog.text
    assert "deleted 209 stale job rows (206 pending, 1 running, 2 failed) and 209 progress rows" in caplog.text
    assert "bigquery_backfill_jobs_one_active) is not in place" in caplog.text


def test_cleanup_claims_the_runs_job_before_the_snapshot_is_taken(pg, bq):
    create_source(bq, inventory_rows(SEED_TENANT, 10))
    legacy_jobs(pg, SEED_TENANT, "inventory", running=1, pending=206, failed=2)

    cleanup_stale_jobs(_settings(), RUN, run_active=unknown_to_airflow)

    [job] = pg.execute(
        "SELECT status, dag_run_id, snapshot_table, total_records FROM bigquery_backfill_jobs "
        "WHERE tenant_id = %s AND model_type = 'inventory' AND status <> 'completed'",
        (SEED_TENANT,),
    ).fetchall()
    assert job == ("running", RUN.run_id, None, None)  # claimed; plan_chunks records the snapshot
    # while plan_chunks runs the snapshot query, no other run can claim a job for the tenant+model ...
    # (claimed in one batch with another tenant, which is claimed: the refusal is the one tenant's)
    other = RunKey("bigquery_backfill", "manual__other")
    claimed, refused = ledger.claim_jobs(pg, other, [SEED_TENANT, OTHER_TENANT], "inventory")
    assert list(claimed) == [OTHER_TENANT] and list(refused) == [SEED_TENANT]
    assert "another pending/running backfill job exists" in str(refused[SEED_TENANT])
    # ... and, once the setup has made the index over every writer, no legacy writer either
    setup_database(pg, None, False, inventory_schema)
    with pytest.raises(psycopg.errors.UniqueViolation, match="bigquery_backfill_jobs_one_active"):
        legacy_jobs(pg, SEED_TENANT, "inventory", running=0, pending=1)


def _settings():
    from bq_backfill.settings import Settings

    return Settings.from_params(
        {
            "tenant_id": SEED_TENANT,
            "model_type": "inventory",
            "chunk_size": 100,
            "dry_run": False,
            "max_rejected_rows": 0,
            "scratch_dataset": "backfill_scratch",
            "gcp_conn_id": "google_cloud_default",
            "postgres_conn_id": "postgres_default",
        }
    )

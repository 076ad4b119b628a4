"""The stuck tenant, in miniature: 207 duplicate jobs and ~2% of the rows synced, some stale. One run fixes it."""

from __future__ import annotations

from decimal import Decimal

from helpers import chunks, conf, jobs, scratch_tables, table_state

from bq_backfill import ledger
from bq_backfill.setup import setup_database
from devtools.seed import (
    OTHER_TENANT,
    SEED_TENANT,
    as_tuples,
    create_source,
    insert_target,
    inventory_rows,
    inventory_schema,
    legacy_jobs,
    target_rows,
)

SOURCE_ROWS = 2_003  # not a multiple of the chunk size: the last chunk is short


def _stuck_state(pg, bq):
    source = inventory_rows(SEED_TENANT, SOURCE_ROWS)
    other = inventory_rows(OTHER_TENANT, 300, seed=7)
    create_source(bq, source + other)
    ledger.apply_schema(pg)
    legacy_jobs(pg, SEED_TENANT, "inventory", running=1, pending=206)
    legacy_jobs(pg, OTHER_TENANT, "inventory", running=1, pending=0)
    legacy_jobs(pg, SEED_TENANT, "sales", running=0, pending=1)
    synced = [dict(r) for r in source[:40]]  # ~2% already synced by the old loop...
    for r in synced[::3]:  # ...some of them with values that have changed since
        r["quantity"] += Decimal(1)
        r["movement_type"] = "stale"
    insert_target(pg, synced + other[:25])
    return source


def test_one_run_replaces_207_jobs_with_one_and_syncs_every_row(pg, bq, backfill_dag):
    source = _stuck_state(pg, bq)
    assert len(jobs(pg)) == 207
    others_before = table_state(
        pg, "bigquery_backfill_jobs", "NOT (tenant_id = %s AND model_type = 'inventory')", (SEED_TENANT,)
    )
    other_progress_before = table_state(
        pg,
        "backfill_source_progress",
        "job_id IN (SELECT id FROM bigquery_backfill_jobs WHERE NOT (tenant_id = %s AND model_type = 'inventory'))",
        (SEED_TENANT,),
    )
    other_rows_before = table_state(pg, "inventory_movements", "tenant_id = %s", (OTHER_TENANT,))

    dr = backfill_dag.test(run_conf=conf())

    assert dr.state == "success"
    [job] = jobs(pg)
    assert job["status"] == "completed"
    assert job["total_records"] == job["processed_records"] == SOURCE_ROWS
    assert job["error_message"] is None and job["dag_run_id"] == dr.run_id
    assert target_rows(pg, SEED_TENANT) == as_tuples(source)  # value by value, stale rows updated
    done = chunks(pg, job["id"])
    assert len(done) == 9 and all(c["status"] == "done" for c in done)
    assert done[-1]["start_offset"] == 2000 and done[-1]["rows_read"] == 3
    assert sum(c["rows_inserted"] for c in done) == SOURCE_ROWS - 40
    assert sum(c["rows_updated"] for c in done) == 14
    assert sum(c["rows_unchanged"] for c in done) == 26
    # the first chunk holds the rows the old loop synced; the others land in an empty key range with one COPY
    assert [c["write_path"] for c in done] == ["upsert"] + ["copy"] * 8
    progress = pg.execute(
        "SELECT last_offset, records_synced, status FROM backfill_source_progress WHERE job_id = %s", (job["id"],)
    ).fetchall()
    assert progress == [(SOURCE_ROWS, SOURCE_ROWS, "completed")]
    # other tenant and other model: every row byte for byte, not even rewritten
    assert (
        table_state(pg, "bigquery_backfill_jobs", "NOT (tenant_id = %s AND model_type = 'inventory')", (SEED_TENANT,))
        == others_before
    )
    assert (
        table_state(
            pg,
            "backfill_source_progress",
            "job_id IN (SELECT id FROM bigquery_backfill_jobs WHERE NOT (tenant_id = %s AND model_type = 'inventory'))",
            (SEED_TENANT,),
        )
        == other_progress_before
    )
    assert table_state(pg, "inventory_movements", "tenant_id = %s", (OTHER_TENANT,)) == other_rows_before
    # the run changed no DDL; with the duplicates gone, the setup run again makes the one-active-job index
    assert pg.execute("SELECT to_regclass('bigquery_backfill_jobs_one_active')").fetchone() == (None,)
    assert setup_database(pg, None, False, inventory_schema)["blocked_pairs"] == 0
    assert pg.execute("SELECT to_regclass('bigquery_backfill_jobs_one_active')::text").fetchone() == (
        "bigquery_backfill_jobs_one_active",
    )
    # each task instance leaves one XCom, its whole result: not one more per key of a dict (a round trip each)
    tasks = [("cleanup_stale_jobs", -1), ("plan_chunks", -1), ("finalize", -1)] + [("load_chunk", i) for i in range(9)]
    assert _xcoms(dr.run_id) == sorted((task, index, "return_value") for task, index in tasks)


def _xcoms(run_id: str) -> list[tuple[str, int, str]]:
    """(task_id, map_index, key) of every XCom the run left, sorted."""
    from airflow import settings
    from airflow.models.xcom import XComModel
    from sqlalchemy import select

    with settings.Session() as session:
        rows = session.execute(
            select(XComModel.task_id, XComModel.map_index, XComModel.key).where(XComModel.run_id == run_id)
        ).all()
    return sorted(tuple(row) for row in rows)


def test_second_run_changes_no_row(pg, bq, backfill_dag):
    _stuck_state(pg, bq)
    assert backfill_dag.test(run_conf=conf()).state == "success"
    before = table_state(pg, "inventory_movements")

    dr = backfill_dag.test(run_conf=conf())

    assert dr.state == "success"
    assert table_state(pg, "inventory_movements") == before  # same values and same xmin: nothing rewritten
    first, second = jobs(pg)
    assert first["status"] == second["status"] == "completed"  # the first stays as history, not as a duplicate
    assert second["processed_records"] == SOURCE_ROWS
    counts = chunks(pg, second["id"])
    assert sum(c["rows_inserted"] + c["rows_updated"] for c in counts) == 0
    assert sum(c["rows_unchanged"] for c in counts) == SOURCE_ROWS
    # nothing staged or upserted: the chunk the first run upserted is compared; the ranges it landed by COPY are
    # still as it proved them, so they are not even fetched
    assert [c["write_path"] for c in counts] == ["unchanged"] + ["proven"] * 8

    assert backfill_dag.test(run_conf=conf()).state == "success"
    assert table_state(pg, "inventory_movements") == before
    assert {c["write_path"] for c in chunks(pg, jobs(pg)[2]["id"])} == {"proven"}  # the compared one proved too


def test_dry_run_writes_nothing(pg, bq, backfill_dag):
    _stuck_state(pg, bq)
    ledger_before = table_state(pg, "bigquery_backfill_jobs")
    rows_before = table_state(pg, "inventory_movements")

    dr = backfill_dag.test(run_conf=conf(dry_run=True))

    assert dr.state == "success"
    assert table_state(pg, "bigquery_backfill_jobs") == ledger_before
    assert table_state(pg, "inventory_movements") == rows_before
    assert pg.execute("SELECT count(*) FROM backfill_chunks").fetchone() == (0,)
    assert scratch_tables(bq) == []  # no snapshot either
    assert not any(d.dataset_id == "backfill_scratch" for d in bq.list_datasets())  # nor a scratch dataset


def test_a_dry_run_that_cannot_finish_fails(pg, bq, backfill_dag):
    _stuck_state(pg, bq)
    ledger_before = table_state(pg, "bigquery_backfill_jobs")

    dr = backfill_dag.test(run_conf=conf(dry_run=True, gcp_conn_id="no_such_gcp"))

    assert dr.state == "failed"  # not a success that reports nothing
    states = {ti.task_id: ti.state for ti in dr.get_task_instances()}
    assert states["cleanup_stale_jobs"] == "failed" and states["finalize"] == "failed"
    assert table_state(pg, "bigquery_backfill_jobs") == ledger_before

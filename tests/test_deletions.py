"""Rows deleted from the source since an earlier sync: every run counts them, delete_missing deletes exactly them,
never another tenant's rows nor rows written after the plan."""

from __future__ import annotations

from datetime import date

from helpers import conf, jobs, table_state

from devtools.seed import (
    OTHER_TENANT,
    SEED_TENANT,
    as_tuples,
    create_source,
    insert_target,
    inventory_rows,
    target_rows,
)

GONE = ("P0000010", "P0000011", "P0000500", "P0000999")  # deleted from the source after the first sync


def _synced_then_deleted_in_source(pg, bq, backfill_dag) -> list[dict]:
    rows = inventory_rows(SEED_TENANT, 1_000)
    create_source(bq, rows)
    insert_target(pg, inventory_rows(OTHER_TENANT, 50))  # another tenant's rows, sharing the table
    assert backfill_dag.test(run_conf=conf()).state == "success"
    codes = ", ".join(f"'{c}'" for c in GONE)
    bq.query(f"DELETE FROM `analytics.inventory_movements` WHERE product_code IN ({codes})").result()  # noqa: S608
    return [r for r in rows if r["product_code"] not in GONE]


def _job_counts(pg) -> tuple:
    return pg.execute(
        "SELECT status, missing_from_source, deleted_records FROM bigquery_backfill_jobs ORDER BY created_at DESC"
    ).fetchone()


def test_rows_deleted_in_the_source_are_counted_and_left_by_default(pg, bq, backfill_dag, caplog):
    _synced_then_deleted_in_source(pg, bq, backfill_dag)
    before = table_state(pg, "inventory_movements")

    assert backfill_dag.test(run_conf=conf()).state == "success"

    assert _job_counts(pg) == ("completed", 4, 0)
    assert "4 target rows of tenant aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee have a key that is not in the source" in (
        caplog.text
    )
    assert table_state(pg, "inventory_movements") == before


def test_a_first_sync_with_nothing_extra_counts_zero_without_loading_keys(pg, bq, backfill_dag, caplog):
    create_source(bq, inventory_rows(SEED_TENANT, 700))

    assert backfill_dag.test(run_conf=conf()).state == "success"

    assert _job_counts(pg) == ("completed", 0, 0)
    assert "have a key that is not in the source" not in caplog.text  # nothing loaded, nothing counted row by row
    assert "key check: the tenant's target rows are its 3 chunks' proven rows, no more" in caplog.text


def test_a_target_row_past_every_source_key_is_counted_though_every_chunk_proved_its_range(pg, bq, backfill_dag):
    """Outside every chunk's key range, a row no chunk holds: the tenant's row versions are more than the chunks'
    (one aggregate), so finalize counts, and finds it."""
    create_source(bq, inventory_rows(SEED_TENANT, 700))
    # deleted in the source long ago; its key sorts after every source key (key: movement_date, branch_id, product)
    extra = {**inventory_rows(SEED_TENANT, 1)[0], "movement_date": date(2030, 1, 1), "product_code": "P9999999"}
    insert_target(pg, [extra])

    assert backfill_dag.test(run_conf=conf()).state == "success"

    assert pg.execute("SELECT count(*) FROM backfill_chunks WHERE key_proof IS NULL").fetchone() == (0,)
    assert _job_counts(pg) == ("completed", 1, 0)


def test_delete_missing_leaves_the_tenant_equal_to_the_snapshot_and_other_tenants_untouched(pg, bq, backfill_dag):
    remaining = _synced_then_deleted_in_source(pg, bq, backfill_dag)
    others = table_state(pg, "inventory_movements", "tenant_id = %s", (OTHER_TENANT,))

    assert backfill_dag.test(run_conf=conf(delete_missing=True, max_deleted_rows=4)).state == "success"

    assert _job_counts(pg) == ("completed", 4, 4)
    assert target_rows(pg, SEED_TENANT) == as_tuples(remaining)  # row for row
    assert table_state(pg, "inventory_movements", "tenant_id = %s", (OTHER_TENANT,)) == others


def test_more_deletions_than_allowed_are_refused_and_nothing_is_deleted(pg, bq, backfill_dag):
    _synced_then_deleted_in_source(pg, bq, backfill_dag)
    before = table_state(pg, "inventory_movements")

    dr = backfill_dag.test(run_conf=conf(delete_missing=True, max_deleted_rows=3))

    assert dr.state == "failed"
    [_, job] = jobs(pg)
    assert job["status"] == "failed"
    assert "4 target rows are missing from the source, over max_deleted_rows=3: nothing deleted" in job["error_message"]
    assert "max_deleted_rows >= 4" in job["error_message"]
    assert _job_counts(pg)[1] == 4
    assert table_state(pg, "inventory_movements") == before


def test_rows_written_after_the_plan_by_someone_else_are_never_deleted(pg, bq, backfill_dag):
    remaining = _synced_then_deleted_in_source(pg, bq, backfill_dag)
    # someone else writes two rows of the tenant with keys the source never had, during the run (chunk 1's commit)
    late = ["LATE-0", "LATE-1"]
    pg.execute(
        "CREATE FUNCTION write_late() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "INSERT INTO inventory_movements (tenant_id, movement_date, branch_id, product_code, quantity) "
        "SELECT TG_ARGV[0]::uuid, date '2024-01-01', 'BR-00', code, 1 FROM unnest(ARRAY['LATE-0', 'LATE-1']) AS code; "
        "RETURN NULL; END $$"
    )
    pg.execute(
        "CREATE TRIGGER write_late AFTER UPDATE OF status ON backfill_chunks FOR EACH ROW "
        f"WHEN (NEW.status = 'done' AND NEW.chunk_index = 1) EXECUTE FUNCTION write_late('{SEED_TENANT}')"
    )

    assert backfill_dag.test(run_conf=conf(delete_missing=True, max_deleted_rows=10)).state == "success"

    assert _job_counts(pg) == ("completed", 4, 4)  # the four deleted in the source; not the two written meanwhile
    landed = {r[3] for r in target_rows(pg, SEED_TENANT)}
    assert landed == {r["product_code"] for r in remaining} | set(late)


def test_a_dry_run_reports_the_rows_missing_from_the_source_and_writes_nothing(pg, bq, backfill_dag, caplog):
    _synced_then_deleted_in_source(pg, bq, backfill_dag)
    ledger_before = table_state(pg, "bigquery_backfill_jobs")
    target_before = table_state(pg, "inventory_movements")

    # a fleet's dry run: both tenants' keys in one read; the other tenant has target rows and none in the source
    dry = conf(tenant_id=None, tenant_ids=[SEED_TENANT, OTHER_TENANT], dry_run=True, delete_missing=True)
    assert backfill_dag.test(run_conf=dry).state == "success"

    lines = [line for line in caplog.text.splitlines() if "dry run: tenant" in line]
    assert len(lines) == 2
    seed, other = (next(line for line in lines if t in line) for t in (SEED_TENANT, OTHER_TENANT))
    assert "has 996 rows in" in seed and "; 4 of its target rows in inventory_movements have a key" in seed
    assert "has 0 rows in" in other and "; 50 of its target rows in inventory_movements have a key" in other
    assert table_state(pg, "bigquery_backfill_jobs") == ledger_before
    assert table_state(pg, "inventory_movements") == target_before

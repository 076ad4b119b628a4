"""What the source holds for the tenant: nothing (refused unless asked for), the tenant in another letter case, and
numbers with more decimals than the target keeps."""

from __future__ import annotations

from decimal import Decimal

from helpers import chunks, conf, jobs, scratch_tables

from devtools.seed import SEED_TENANT, as_tuples, create_source, inventory_rows, target_rows

MISTYPED = "aaaaaaaa-bbbb-cccc-dddd-000000000000"


def test_a_tenant_with_no_source_rows_fails_plan_naming_it(pg, bq, backfill_dag, caplog):
    create_source(bq, inventory_rows(SEED_TENANT, 300))

    dr = backfill_dag.test(run_conf=conf(tenant_id=MISTYPED))

    assert dr.state == "failed"
    assert {ti.task_id: ti.state for ti in dr.get_task_instances()}["plan_chunks"] == "failed"
    [job] = jobs(pg, MISTYPED)
    assert job["status"] == "failed"
    assert f"holds no row of tenant {MISTYPED}" in job["error_message"]
    assert "allow_empty_source=true" in job["error_message"]
    assert scratch_tables(bq) == []  # the empty snapshot is dropped
    assert pg.execute("SELECT count(*) FROM inventory_movements").fetchone() == (0,)


def test_an_empty_source_completes_when_allowed(pg, bq, backfill_dag):
    create_source(bq, inventory_rows(SEED_TENANT, 300))

    dr = backfill_dag.test(run_conf=conf(tenant_id=MISTYPED, allow_empty_source=True))

    assert dr.state == "success"
    [job] = jobs(pg, MISTYPED)
    assert (job["status"], job["total_records"], job["processed_records"]) == ("completed", 0, 0)


def test_a_tenant_stored_in_upper_case_in_the_source_is_found(pg, bq, backfill_dag):
    rows = inventory_rows(SEED_TENANT.upper(), 500)
    create_source(bq, rows)

    dr = backfill_dag.test(run_conf=conf())

    assert dr.state == "success"
    assert target_rows(pg, SEED_TENANT) == as_tuples([dict(r, tenant_id=SEED_TENANT) for r in rows])


def _with_extra_decimals(n: int = 500) -> tuple[list[dict], list[dict]]:
    rows = inventory_rows(SEED_TENANT, n)
    rows[10]["quantity"] = Decimal("1.23455")  # numeric(18,4) keeps 4 decimals: Postgres would store 1.2346
    rows[11]["unit_cost"] = Decimal("-2.00001")  # would be -2.0000
    rows[12]["quantity"] = Decimal("3.10000")  # trailing zeros only: the same number, nothing to round
    return rows, [dict(rows[10], quantity=Decimal("1.2346")), dict(rows[11], unit_cost=Decimal("-2.0000"))]


def test_a_number_with_more_decimals_than_the_target_keeps_is_rejected_by_default(pg, bq, backfill_dag):
    rows, _ = _with_extra_decimals()
    create_source(bq, rows)

    dr = backfill_dag.test(run_conf=conf(max_rejected_rows=2))

    assert dr.state == "success"
    [job] = jobs(pg)
    assert job["rejected_records"] == 2
    reasons = pg.execute("SELECT row_data->>'product_code', reason FROM backfill_quarantine ORDER BY 1").fetchall()
    assert reasons == [
        ("P0000010", "quantity has more than 4 decimal places"),
        ("P0000011", "unit_cost has more than 4 decimal places"),
    ]
    assert target_rows(pg, SEED_TENANT) == as_tuples(rows[:10] + rows[12:])


def test_rounding_when_asked_lands_the_rounded_value_counts_it_and_a_rerun_changes_nothing(pg, bq, backfill_dag):
    rows, rounded = _with_extra_decimals()
    create_source(bq, rows)

    dr = backfill_dag.test(run_conf=conf(numeric_rounding="round"))

    assert dr.state == "success"
    [job] = jobs(pg)
    rounded_records = pg.execute("SELECT rounded_records FROM bigquery_backfill_jobs").fetchone()[0]
    assert (job["rejected_records"], rounded_records) == (0, 2)
    assert sum(c["rows_inserted"] for c in chunks(pg, job["id"])) == 500
    assert target_rows(pg, SEED_TENANT) == as_tuples(rows[:10] + rounded + rows[12:])

    dr = backfill_dag.test(run_conf=conf(numeric_rounding="round"))  # the rounded rows compare equal now

    assert dr.state == "success"
    again = jobs(pg)[-1]
    assert {c["write_path"] for c in chunks(pg, again["id"])} <= {"proven", "unchanged"}
    assert sum(c["rows_updated"] + c["rows_inserted"] for c in chunks(pg, again["id"])) == 0

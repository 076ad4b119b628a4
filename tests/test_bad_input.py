"""Bad conf is refused before any task runs (nothing deleted); bad source rows land or go to quarantine."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from airflow.sdk.definitions.param import ParamValidationError
from helpers import chunks, conf, jobs, table_state

from bq_backfill import ledger
from devtools.seed import OTHER_TENANT, SEED_TENANT, as_tuples, create_source, inventory_rows, legacy_jobs, target_rows

INJECTION = "x'; DROP TABLE inventory_movements; --"


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        ({"tenant_id": "not-a-uuid"}, "tenant_id"),
        ({"tenant_id": INJECTION}, "tenant_id"),
        ({"tenant_ids": ["not-a-uuid"]}, "tenant_ids"),
        ({"tenant_ids": [SEED_TENANT, SEED_TENANT]}, "tenant_ids"),
        ({"tenant_ids": SEED_TENANT}, "tenant_ids"),
        ({"all_tenants": "yes"}, "all_tenants"),
        ({"exclude_tenant_ids": [INJECTION]}, "exclude_tenant_ids"),
        ({"model_type": "unknown"}, "model_type"),
        ({"model_type": INJECTION}, "model_type"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"chunk_size": -5}, "chunk_size"),
        ({"chunk_size": 10_000_000}, "chunk_size"),
        ({"chunk_size": "50000"}, "chunk_size"),
        ({"dry_run": "yes"}, "dry_run"),
        ({"max_rejected_rows": -1}, "max_rejected_rows"),
        ({"source_table": INJECTION}, "source_table"),
        ({"scratch_dataset": INJECTION}, "scratch_dataset"),
        ({"gcp_conn_id": INJECTION}, "gcp_conn_id"),
        ({"postgres_conn_id": INJECTION}, "postgres_conn_id"),
        ({"numeric_rounding": "truncate"}, "numeric_rounding"),
        # well-formed names the deployment did not allow ([bigquery_backfill] allowed_*)
        ({"gcp_conn_id": "other_gcp"}, "gcp_conn_id"),
        ({"postgres_conn_id": "other_pg"}, "postgres_conn_id"),
        ({"source_table": "analytics.elsewhere"}, "source_table"),
        ({"source_table": "other-project.analytics.nope"}, "source_table"),
        ({"scratch_dataset": "other_scratch"}, "scratch_dataset"),
    ],
)
def test_bad_conf_is_refused_before_any_task_runs(pg, backfill_dag, overrides, names):
    ledger.apply_schema(pg)
    legacy_jobs(pg, SEED_TENANT, "inventory", running=1, pending=3)
    before = table_state(pg, "bigquery_backfill_jobs")

    with pytest.raises(ParamValidationError, match=names):
        backfill_dag.test(run_conf=conf(**overrides))

    assert table_state(pg, "bigquery_backfill_jobs") == before  # nothing deleted, nothing written


def test_the_allowlists_come_from_the_deployments_configuration(airflow_db, monkeypatch):
    from airflow.dag_processing.dagbag import DagBag
    from helpers import ROOT

    from bq_backfill.settings import Settings

    monkeypatch.setenv("AIRFLOW__BIGQUERY_BACKFILL__ALLOWED_GCP_CONN_IDS", "gcp_eu, gcp_us")
    monkeypatch.setenv("AIRFLOW__BIGQUERY_BACKFILL__ALLOWED_SOURCE_TABLES", "analytics.inventory_v2")
    dag = DagBag(dag_folder=str(ROOT / "dags")).get_dag("bigquery_backfill")

    gcp = dag.params.get_param("gcp_conn_id")
    assert (gcp.value, gcp.schema["enum"]) == ("gcp_eu", ["gcp_eu", "gcp_us"])  # the default is not allowed here
    assert dag.params.get_param("source_table").schema["enum"] == [None, "analytics.inventory_v2"]
    # a run made under an earlier configuration is refused by its tasks, naming the setting to change
    params = {**dag.params.dump(), **conf(gcp_conn_id="google_cloud_default")}
    with pytest.raises(
        PermissionError, match=r"gcp_conn_id 'google_cloud_default' is not allowed.*allowed_gcp_conn_ids"
    ):
        Settings.from_params(params)


@pytest.mark.parametrize(
    ("overrides", "refusal"),
    [
        ({"tenant_id": None}, r"no tenant given: set tenant_id, tenant_ids \(a list\) or all_tenants=true"),
        ({"all_tenants": True}, "give either all_tenants or tenant_id / tenant_ids, not both"),
        ({"tenant_ids": [SEED_TENANT.upper()]}, rf"tenant\(s\) given twice: {SEED_TENANT}"),
        ({"exclude_tenant_ids": [OTHER_TENANT]}, "exclude_tenant_ids only applies with all_tenants=true"),
    ],
)
def test_tenants_named_in_two_ways_or_not_at_all_are_refused_by_every_task(backfill_dag, overrides, refusal):
    """What one Param cannot see alone (the form validates each on its own): refused by the settings every task
    reads, naming the fix."""
    from bq_backfill.settings import FleetConfError, Settings

    with pytest.raises(FleetConfError, match=refusal):
        Settings.from_params({**backfill_dag.params.dump(), **conf(**overrides)})


def test_a_run_without_a_tenant_fails_at_cleanup_and_deletes_nothing(pg, backfill_dag, caplog):
    ledger.apply_schema(pg)
    legacy_jobs(pg, SEED_TENANT, "inventory", running=0, pending=3)
    before = table_state(pg, "bigquery_backfill_jobs")

    dr = backfill_dag.test(run_conf={"model_type": "inventory"})

    assert dr.state == "failed"
    assert "no tenant given: set tenant_id, tenant_ids (a list) or all_tenants=true" in caplog.text
    assert table_state(pg, "bigquery_backfill_jobs") == before


def test_more_tenants_than_the_deployment_allows_are_refused_before_the_run_exists(airflow_db, monkeypatch):
    from airflow.dag_processing.dagbag import DagBag
    from helpers import ROOT

    monkeypatch.setenv("AIRFLOW__BIGQUERY_BACKFILL__MAX_FLEET_TENANTS", "1")
    dag = DagBag(dag_folder=str(ROOT / "dags")).get_dag("bigquery_backfill")

    with pytest.raises(ParamValidationError, match="tenant_ids"):
        dag.test(run_conf=conf(tenant_id=None, tenant_ids=[SEED_TENANT, OTHER_TENANT]))


def test_duplicate_and_null_keys_and_a_short_last_chunk(pg, bq, backfill_dag):
    rows = inventory_rows(SEED_TENANT, 1_010)
    # the same key again, changed 5 s later: later in the order key (which ends with updated_at), so it wins
    dup = dict(rows[500], quantity=rows[500]["quantity"] + 5, updated_at=rows[500]["updated_at"] + timedelta(seconds=5))
    null_keys = [dict(rows[10], branch_id=None), dict(rows[11], product_code=None, movement_date=None)]
    for r in null_keys:
        r["product_code"] = r["product_code"] and r["product_code"] + "-x"
    create_source(bq, [*rows, dup, *null_keys])

    dr = backfill_dag.test(run_conf=conf(chunk_size=250, max_rejected_rows=2))

    assert dr.state == "success"
    [job] = jobs(pg)
    assert job["status"] == "completed" and job["total_records"] == job["processed_records"] == 1_012
    assert job["rejected_records"] == 2
    duplicates = pg.execute("SELECT duplicate_source_rows FROM bigquery_backfill_jobs WHERE id = %s", [job["id"]])
    assert duplicates.fetchone() == (1,)  # resolved by the snapshot query, counted on the job
    done = chunks(pg, job["id"])
    assert [c["rows_read"] for c in done] == [250, 250, 250, 250, 12]
    assert sum(c["rows_duplicate"] for c in done) == 0
    assert sum(c["rows_rejected"] for c in done) == 2
    reasons = pg.execute("SELECT reason FROM backfill_quarantine WHERE job_id = %s ORDER BY reason", (job["id"],))
    assert [r for (r,) in reasons] == [
        "NULL key column branch_id",
        "NULL key column movement_date; NULL key column product_code",
    ]
    landed = target_rows(pg, SEED_TENANT)
    assert len(landed) == 1_010
    # the duplicate key: one row, the one later in the model's order key
    [dup_row] = [r for r in landed if r[3] == dup["product_code"]]
    assert (dup_row[4], dup_row[7]) == (dup["quantity"], dup["updated_at"])


def test_rejected_rows_over_the_limit_fail_the_run_after_landing_the_good_ones(pg, bq, backfill_dag):
    rows = inventory_rows(SEED_TENANT, 300)
    create_source(bq, [*rows, dict(rows[0], product_code=None)])

    dr = backfill_dag.test(run_conf=conf(chunk_size=100))

    assert dr.state == "failed"
    [job] = jobs(pg)
    assert job["status"] == "failed"
    assert "1 rows rejected, over max_rejected_rows=0" in job["error_message"]
    assert "backfill_quarantine" in job["error_message"]
    assert target_rows(pg, SEED_TENANT) == as_tuples(rows)


def test_out_of_range_numbers_nul_characters_long_text_unicode_and_edge_dates(pg, bq, backfill_dag):
    from datetime import UTC, date, datetime
    from decimal import Decimal

    rows = inventory_rows(SEED_TENANT, 400)
    rows[0].update(quantity=Decimal("100000000000000"))  # numeric(18,4) holds < 10^14
    rows[1].update(unit_cost=Decimal("-99999999999999.99996"))  # rounds to -10^14: refused by Postgres too
    rows[2].update(quantity=Decimal("99999999999999.9999"))  # the largest that fits: lands
    rows[3].update(movement_type="bad\x00byte")
    rows[4].update(movement_type="x" * 100_000)
    rows[5].update(branch_id="Zürich-分店-🚚", movement_type="réception ✓")
    rows[6].update(movement_date=date(1, 1, 1), updated_at=datetime(1, 1, 1, tzinfo=UTC))
    rows[7].update(movement_date=date(9999, 12, 31), updated_at=datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC))
    create_source(bq, rows)

    dr = backfill_dag.test(run_conf=conf(chunk_size=150, max_rejected_rows=3))

    assert dr.state == "success"
    [job] = jobs(pg)
    assert job["processed_records"] == 400 and job["rejected_records"] == 3
    quarantined = pg.execute(
        "SELECT row_data->>'product_code', reason, row_data->>'movement_type' FROM backfill_quarantine ORDER BY 1"
    ).fetchall()
    assert quarantined == [
        ("P0000000", "quantity out of range for numeric(18,4)", rows[0]["movement_type"]),
        (
            "P0000001",
            "unit_cost out of range for numeric(18,4); unit_cost has more than 4 decimal places",
            rows[1]["movement_type"],
        ),
        ("P0000003", "movement_type contains a NUL character", "bad\\u0000byte"),
    ]
    landed = {r[3]: r for r in target_rows(pg, SEED_TENANT)}
    assert len(landed) == 397
    expected = {t[3]: t for t in as_tuples(rows[2:3] + rows[4:])}
    assert landed == expected  # every other value exactly as in BigQuery, edges and all


def test_duplicate_keys_are_resolved_the_same_whatever_order_the_source_holds_them_in(
    pg, bq, backfill_dag, monkeypatch
):
    """A key given three times, far apart (other chunks between them), in two load orders, each chunk read in three
    shuffled streams: the latest by the order key wins; two rows tied on the whole order key resolve to the same one
    of them either way."""
    monkeypatch.setenv("BACKFILL_READ_STREAMS", "3")
    rows = inventory_rows(SEED_TENANT, 900)
    late = dict(rows[100], quantity=Decimal("7.25"), updated_at=rows[100]["updated_at"] + timedelta(hours=1))
    early = dict(rows[100], quantity=Decimal("1.25"), updated_at=rows[100]["updated_at"] - timedelta(hours=1))
    tie_a = dict(rows[700], quantity=Decimal("2.50"))
    tie_b = dict(rows[700], quantity=Decimal("9.75"))  # same key, same updated_at: the whole order key ties
    landed = []
    for order in ([late, *rows[:700], tie_b, *rows[701:], early, tie_a], [tie_a, early, *rows[701:], *rows[:700],
                                                                          tie_b, late]):  # fmt: skip
        pg.execute("DELETE FROM inventory_movements")
        create_source(bq, order)
        assert backfill_dag.test(run_conf=conf(chunk_size=250)).state == "success"
        job = jobs(pg)[-1]
        assert (job["status"], job["processed_records"]) == ("completed", 900)
        got = {r[3]: r for r in target_rows(pg, SEED_TENANT)}
        assert len(got) == 900
        assert (got[late["product_code"]][4], got[late["product_code"]][7]) == (late["quantity"], late["updated_at"])
        landed.append(got[tie_a["product_code"]][4])
    assert landed[0] == landed[1] and landed[0] in (tie_a["quantity"], tie_b["quantity"])
    counted = pg.execute("SELECT duplicate_source_rows FROM bigquery_backfill_jobs ORDER BY created_at").fetchall()
    assert counted[-2:] == [(3,), (3,)]

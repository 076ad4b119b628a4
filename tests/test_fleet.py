"""A fleet of tenants in one run: one snapshot of them all, chunks shared by small tenants and split for large ones,
each tenant's job on its own (counts, failure, resume), and a tenant refused or failing without stopping the rest."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from airflow_run import clear_with_downstream, drive
from helpers import chunks, conf, jobs, table_state, ti_states
from psycopg import sql

from bq_backfill import ledger
from devtools.seed import append_source, as_tuples, create_source, inventory_rows, legacy_jobs, target_rows

SIZES = [30, 700, 5, 260, 1]  # chunks of 250: tenants share a chunk, the 700-row one spans four
FLEET = [f"{i:08x}-0000-4000-8000-00000000000{i}" for i in range(1, len(SIZES) + 1)]
OUTSIDER = "99999999-0000-4000-8000-000000000009"  # in the source, not in the fleet


def _source(bq, sizes=SIZES, fleet=FLEET) -> dict[str, list[dict]]:
    rows = {t: inventory_rows(t, n, seed=i) for i, (t, n) in enumerate(zip(fleet, sizes, strict=True))}
    rows[OUTSIDER] = inventory_rows(OUTSIDER, 40)
    # the source holds the fleet out of order, one tenant in upper case
    stored = [{**r, "tenant_id": r["tenant_id"].upper()} if r["tenant_id"] == fleet[1] else r
              for t in reversed(list(rows)) for r in rows[t]]  # fmt: skip
    create_source(bq, stored)
    return rows


def _fleet_conf(**overrides) -> dict:
    return conf(tenant_id=None, tenant_ids=FLEET, **overrides)


def test_a_fleet_lands_every_tenant_on_its_own_job_in_chunks_shared_and_split(pg, bq, backfill_dag):
    rows = _source(bq)

    dr = backfill_dag.test(run_conf=_fleet_conf())

    assert dr.state == "success"
    for tenant, n in zip(FLEET, SIZES, strict=True):
        assert target_rows(pg, tenant) == as_tuples(rows[tenant]), tenant
        [job] = jobs(pg, tenant)
        assert (job["status"], job["total_records"], job["processed_records"]) == ("completed", n, n)
        assert job["dag_run_id"] == dr.run_id
    assert target_rows(pg, OUTSIDER) == [] and jobs(pg, OUTSIDER) == []
    # 996 rows in chunks of 250: four mapped tasks, each a range of the one snapshot holding the tenants in turn
    loads = sorted(ti.map_index for ti in dr.get_task_instances() if ti.task_id == "load_chunk")
    assert loads == [0, 1, 2, 3]
    parts = pg.execute(
        "SELECT c.chunk_index, j.tenant_id::text, c.start_offset, c.end_offset FROM backfill_chunks c "
        "JOIN bigquery_backfill_jobs j ON j.id = c.job_id ORDER BY 1, 3"
    ).fetchall()
    assert [(i, t) for i, t, _, _ in parts] == [
        (0, FLEET[0]), (0, FLEET[1]), (1, FLEET[1]), (2, FLEET[1]), (2, FLEET[2]), (2, FLEET[3]), (3, FLEET[3]),
        (3, FLEET[4]),
    ]  # fmt: skip
    assert parts[0][2:] == (0, 30) and parts[1][2:] == (30, 250)
    label = next(ti.rendered_map_index for ti in dr.get_task_instances() if ti.task_id == "load_chunk")
    assert "tenants" in label and "[" in label
    # one Asset event per tenant, its counts as extra, as one run of that tenant would emit
    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session

    with create_session() as session:
        extras = [e.extra for e in session.query(AssetEvent).filter_by(source_run_id=dr.run_id)]
    assert {e["tenant_id"]: e["inserted"] for e in extras} == dict(zip(FLEET, SIZES, strict=True))
    assert len(extras) == len(FLEET)


def test_a_fleet_run_again_with_nothing_changed_rewrites_no_row(pg, bq, backfill_dag):
    _source(bq)
    assert backfill_dag.test(run_conf=_fleet_conf()).state == "success"
    before = table_state(pg, "inventory_movements")

    assert backfill_dag.test(run_conf=_fleet_conf()).state == "success"

    assert table_state(pg, "inventory_movements") == before
    assert {j["status"] for t in FLEET for j in jobs(pg, t)} == {"completed"}
    assert all(len(jobs(pg, t)) == 2 for t in FLEET)


def _refuse_one_tenants_row(pg, tenant: str, product_code: str) -> None:
    pg.execute(
        sql.SQL(
            "ALTER TABLE inventory_movements ADD CONSTRAINT refuse_one CHECK "
            "(NOT (tenant_id = {} AND product_code = {}))"
        ).format(sql.Literal(tenant), sql.Literal(product_code))
    )


def test_a_tenant_whose_rows_cannot_land_fails_its_own_job_and_clearing_finishes_only_it(pg, bq, backfill_dag):
    rows = _source(bq)
    _refuse_one_tenants_row(pg, FLEET[3], "P0000100")  # offset 835: chunk 3, shared with FLEET[4]

    dr = backfill_dag.test(run_conf=_fleet_conf())

    assert dr.state == "failed"
    failed = jobs(pg, FLEET[3])[0]
    assert failed["status"] == "failed" and "refuse_one" in failed["error_message"]
    for tenant in (t for t in FLEET if t != FLEET[3]):  # its chunk neighbours landed all the same
        assert target_rows(pg, tenant) == as_tuples(rows[tenant]), tenant
        assert jobs(pg, tenant)[0]["status"] == "completed", tenant
    assert ti_states(dr)[("load_chunk", 3)] == "failed"
    states = {c["chunk_index"]: c["status"] for c in chunks(pg, failed["id"])}
    assert states[3] == "failed"
    landed_before = {t: table_state(pg, "inventory_movements", "tenant_id = %s", (t,)) for t in FLEET if t != FLEET[3]}

    pg.execute("ALTER TABLE inventory_movements DROP CONSTRAINT refuse_one")
    clear_with_downstream(backfill_dag, dr.run_id, [("load_chunk", 3)])
    dr = drive(backfill_dag, dr.run_id)

    assert dr.state == "success"
    assert target_rows(pg, FLEET[3]) == as_tuples(rows[FLEET[3]])
    assert jobs(pg, FLEET[3])[0]["status"] == "completed"
    for tenant, state in landed_before.items():  # the cleared chunk rewrote none of its other parts
        assert table_state(pg, "inventory_movements", "tenant_id = %s", (tenant,)) == state


def test_two_tenants_refused_in_one_chunk_keep_their_own_errors_and_a_cleared_plan_lands_them_around_the_done_one(
    pg, bq, backfill_dag
):
    """Chunk 2 holds the end of FLEET[1], all of FLEET[2] and the start of FLEET[3]. The first and last are refused
    (each by a constraint of its own), the middle one lands; each refused job keeps its own error. Clearing from
    plan_chunks lists only the two refused parts of chunk 2, around the done one: they land, nothing else rewritten."""
    rows = _source(bq)
    for name, tenant, product in (("refuse_one", FLEET[1], "P0000600"), ("refuse_two", FLEET[3], "P0000005")):
        check = "ALTER TABLE inventory_movements ADD CONSTRAINT {} CHECK (NOT (tenant_id = {} AND product_code = {}))"
        pg.execute(sql.SQL(check).format(sql.Identifier(name), sql.Literal(tenant), sql.Literal(product)))

    dr = backfill_dag.test(run_conf=_fleet_conf())

    assert dr.state == "failed"
    one, two = jobs(pg, FLEET[1])[0], jobs(pg, FLEET[3])[0]
    assert one["status"] == two["status"] == "failed"
    assert "refuse_one" in one["error_message"] and "refuse_two" not in one["error_message"]
    assert "refuse_two" in two["error_message"] and "refuse_one" not in two["error_message"]
    assert target_rows(pg, FLEET[2]) == as_tuples(rows[FLEET[2]])
    landed = table_state(pg, "inventory_movements", "tenant_id <> ALL(%s::uuid[])", ([FLEET[1], FLEET[3]],))

    pg.execute("ALTER TABLE inventory_movements DROP CONSTRAINT refuse_one, DROP CONSTRAINT refuse_two")
    clear_with_downstream(backfill_dag, dr.run_id, ["plan_chunks"], only_failed=False)
    dr = drive(backfill_dag, dr.run_id)

    assert dr.state == "success"
    for tenant in FLEET:
        assert target_rows(pg, tenant) == as_tuples(rows[tenant]), tenant
        assert jobs(pg, tenant)[0]["status"] == "completed"
    assert table_state(pg, "inventory_movements", "tenant_id <> ALL(%s::uuid[])", ([FLEET[1], FLEET[3]],)) == landed


def test_a_tenant_busy_elsewhere_is_refused_by_name_and_the_others_complete(pg, bq, backfill_dag, caplog):
    rows = _source(bq)
    ledger.apply_schema(pg)
    [busy] = legacy_jobs(pg, FLEET[2], "inventory", running=1, pending=0)
    pg.execute("UPDATE bigquery_backfill_jobs SET updated_at = now() WHERE id = %s", [busy])  # the old loop, running

    dr = backfill_dag.test(run_conf=_fleet_conf())

    assert dr.state == "failed"
    assert f"tenant {FLEET[2]} refused: " in caplog.text and "old loop is still running" in caplog.text
    assert "Tenants refused at cleanup have no job in this run" in caplog.text
    assert [j["dag_run_id"] for j in jobs(pg, FLEET[2])] == [None]  # its legacy job only, left as it was
    for tenant in (t for t in FLEET if t != FLEET[2]):
        assert target_rows(pg, tenant) == as_tuples(rows[tenant]), tenant
        assert jobs(pg, tenant)[0]["status"] == "completed"


def test_all_tenants_backfills_every_tenant_of_the_source_but_the_excluded(pg, bq, backfill_dag, caplog):
    rows = _source(bq)
    append_source(bq, inventory_rows("test-tenant", 3))  # not a uuid: left out, and said so

    dr = backfill_dag.test(run_conf=conf(tenant_id=None, all_tenants=True, exclude_tenant_ids=[FLEET[0].upper()]))

    assert dr.state == "success"
    assert "1 values of" in caplog.text and "'test-tenant'" in caplog.text
    assert target_rows(pg, FLEET[0]) == [] and jobs(pg, FLEET[0]) == []
    for tenant in [*FLEET[1:], OUTSIDER]:
        assert target_rows(pg, tenant) == as_tuples(rows[tenant]), tenant


def test_a_named_tenant_without_rows_fails_its_job_and_the_others_complete(pg, bq, backfill_dag):
    rows = _source(bq)
    missing = "77777777-0000-4000-8000-000000000007"

    dr = backfill_dag.test(run_conf=conf(tenant_id=None, tenant_ids=[*FLEET[:2], missing]))

    assert dr.state == "failed"
    [job] = jobs(pg, missing)
    assert job["status"] == "failed" and f"holds no row of tenant {missing}" in job["error_message"]
    for tenant in FLEET[:2]:
        assert target_rows(pg, tenant) == as_tuples(rows[tenant])


def test_a_jobs_chunk_rows_are_its_part_of_each_chunk_of_the_runs_snapshot(pg):
    """A tenant of 5,000 rows from offset 30,000 of the run's snapshot, chunks of 4,000: its parts of chunks 7 and 8
    (offsets past a smallint's range: the statement's arithmetic is bigint whatever the driver binds small ints as)."""
    claimed, _ = ledger.claim_jobs(pg, ledger.RunKey("bigquery_backfill", "parts"), [FLEET[0]], "inventory")
    job, _ = claimed[FLEET[0]]
    snapshot = pg.execute("SELECT pg_current_snapshot()::text").fetchone()[0]
    [job] = ledger.record_plans(pg, [ledger.PlanRecord(
        job.id, total_records=5_000, chunk_size=4_000, source_table="analytics.inventory_movements",
        snapshot_table="p.d.t", snapshot_at=datetime.now(UTC), target_snapshot=snapshot, snapshot_offset=30_000,
    )])  # fmt: skip

    todo = ledger.plan_chunks(pg, [job])[job.id]

    assert [(c["chunk_index"], c["start"], c["end"]) for c in todo] == [(7, 30_000, 32_000), (8, 32_000, 35_000)]


@pytest.mark.parametrize("tenants", [2_000])
def test_a_fleet_of_thousands_of_tiny_tenants_runs_as_a_few_chunks(pg, bq, backfill_dag, tenants):
    fleet = [f"{i:08x}-1111-4000-8000-000000000000" for i in range(tenants)]
    rows = [r for i, t in enumerate(fleet) for r in inventory_rows(t, 1 + i % 3)]
    create_source(bq, rows)

    dr = backfill_dag.test(run_conf=conf(tenant_id=None, tenant_ids=fleet, chunk_size=1_000))

    assert dr.state == "success"
    assert len([ti for ti in dr.get_task_instances() if ti.task_id == "load_chunk"]) == -(-len(rows) // 1_000)
    done = pg.execute(
        "SELECT count(*), sum(processed_records) FROM bigquery_backfill_jobs WHERE status = 'completed'"
    ).fetchone()
    assert done == (tenants, len(rows))
    assert pg.execute("SELECT count(*) FROM inventory_movements").fetchone() == (len(rows),)

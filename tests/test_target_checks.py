"""A target shaped otherwise than the run can write exactly is refused by cleanup before anything is read, naming
the table, the role and the fix: a column of another type, row-level security for the run's role, an old server."""

from __future__ import annotations

import pyarrow as pa
import pytest
from helpers import INVENTORY, conf, scratch_tables
from helpers import WRITER_ROLE as ROLE
from psycopg import sql

from bq_backfill import ledger, target_checks
from devtools.seed import SEED_TENANT, as_tuples, create_source, insert_target, inventory_rows, target_rows

MODEL = INVENTORY


def test_a_column_of_another_type_is_refused_before_anything_is_read(pg, bq, backfill_dag, caplog):
    source = inventory_rows(SEED_TENANT, 300)
    create_source(bq, source)
    pg.execute("ALTER TABLE inventory_movements ALTER COLUMN quantity TYPE bigint")
    pg.execute("ALTER TABLE inventory_movements ALTER COLUMN movement_type TYPE integer USING NULL")
    insert_target(pg, [{**source[0], "quantity": 1, "movement_type": None}])

    dr = backfill_dag.test(run_conf=conf())

    assert dr.state == "failed"
    assert {ti.task_id: ti.state for ti in dr.get_task_instances()}["cleanup_stale_jobs"] == "failed"
    message = (
        "model 'inventory': column 'quantity': BigQuery NUMERIC does not land in Postgres bigint; it lands in "
        "numeric; column 'movement_type': BigQuery STRING does not land in Postgres integer; it lands in text or "
        "character varying or uuid. Change the target column's type (or the source's)"
    )
    assert message in caplog.text
    assert scratch_tables(bq) == []  # no snapshot taken, nothing billed
    assert target_rows(pg, SEED_TENANT) == as_tuples([{**source[0], "quantity": 1, "movement_type": None}])


def test_a_column_altered_during_the_run_fails_its_chunk(pg):
    """The run's columns are fixed at cleanup (the job's model_columns); a chunk refuses a target altered since."""
    pg.execute("ALTER TABLE inventory_movements ALTER COLUMN quantity TYPE numeric(18,2)")
    with pg.transaction(), pytest.raises(target_checks.TargetRefusedError, match=r"quantity: the run has numeric"):
        target_checks.check_target(pg, MODEL, ledger.LEDGER_TABLES)


def test_text_longer_than_its_varchar_is_rejected_not_landed():
    from bq_backfill.models import Column
    from bq_backfill.validate import split_invalid

    model = MODEL.resolved(tuple(Column(c.name, "character varying(3)" if c.name == "movement_type" else c.pg_type)
                                 for c in MODEL.columns))  # fmt: skip
    rows = pa.Table.from_pylist([{**r, "_row_offset": i} for i, r in enumerate(inventory_rows(SEED_TENANT, 3))])
    rows = rows.set_column(rows.schema.get_field_index("movement_type"), "movement_type",
                           pa.array(["abc", "abcd", "äöü"]))  # fmt: skip

    checked = split_invalid(model, rows, "_row_offset")

    assert checked.rejected.offsets == [1] and checked.rejected.reasons == ["movement_type longer than 3 characters"]


def test_the_models_own_types_pass_however_postgres_spells_them(pg):
    with pg.transaction():
        assert target_checks.column_type_mismatches(pg, MODEL) == []  # e.g. timestamptz = timestamp with time zone
        target_checks.check_target(pg, MODEL, ledger.LEDGER_TABLES)


@pytest.fixture
def rls(pg):
    """Row-level security on the target, with a policy that shows each session only its own tenant's rows."""
    pg.execute("ALTER TABLE inventory_movements ENABLE ROW LEVEL SECURITY")
    pg.execute(
        "CREATE POLICY by_tenant ON inventory_movements "
        "USING (tenant_id::text = current_setting('app.tenant_id', true))"
    )


def test_row_level_security_for_the_runs_role_is_refused_until_it_bypasses_it(
    pg, bq, backfill_dag, writer_role, rls, caplog
):
    source = inventory_rows(SEED_TENANT, 300)
    create_source(bq, source)

    dr = backfill_dag.test(run_conf=conf(postgres_conn_id="writer_pg"))

    assert dr.state == "failed"
    assert {ti.task_id: ti.state for ti in dr.get_task_instances()}["cleanup_stale_jobs"] == "failed"
    assert f"row-level security is active on table inventory_movements for role {ROLE}" in caplog.text
    assert f"ALTER ROLE {ROLE} BYPASSRLS" in caplog.text and "DISABLE ROW LEVEL SECURITY" in caplog.text
    assert scratch_tables(bq) == []

    pg.execute(sql.SQL("ALTER ROLE {} BYPASSRLS").format(sql.Identifier(ROLE)))  # the first way out
    assert backfill_dag.test(run_conf=conf(postgres_conn_id="writer_pg")).state == "success"
    assert target_rows(pg, SEED_TENANT) == as_tuples(source)


def test_the_tables_owner_is_not_subject_to_its_row_level_security(pg, rls):
    with pg.transaction():
        target_checks.check_target(pg, MODEL, ledger.LEDGER_TABLES)  # the owner (a superuser here) bypasses it
    pg.execute("ALTER TABLE inventory_movements FORCE ROW LEVEL SECURITY")
    pg.execute("CREATE ROLE backfill_rls_owner")
    try:
        pg.execute("GRANT USAGE ON SCHEMA public TO backfill_rls_owner")
        pg.execute("ALTER TABLE inventory_movements OWNER TO backfill_rls_owner")
        with pg.transaction():
            pg.execute("SET LOCAL ROLE backfill_rls_owner")
            with pytest.raises(target_checks.TargetRefusedError, match="for role backfill_rls_owner"):
                target_checks.check_target(pg, MODEL, ledger.LEDGER_TABLES)
    finally:
        pg.execute("ALTER TABLE inventory_movements OWNER TO CURRENT_USER")
        pg.execute("DROP OWNED BY backfill_rls_owner")
        pg.execute("DROP ROLE backfill_rls_owner")


@pytest.mark.parametrize(("version_num", "shown"), [(120_015, "12.15"), (90_624, "9.6"), (110_000, "11.0")])
def test_a_server_older_than_13_is_refused_naming_its_version(version_num, shown):
    with pytest.raises(target_checks.TargetRefusedError, match=f"runs version {shown}; .* PostgreSQL 13 or newer"):
        target_checks.check_server_version(version_num)


def test_this_machines_servers_are_supported(pg):
    target_checks.check_server_version(130_000)
    target_checks.check_server_version(pg.info.server_version)

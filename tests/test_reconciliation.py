"""Each of finalize's checks can fail: a snapshot that gives fewer keys than its chunks read, and a quarantine row
that went missing; rows a trigger swallows fail their chunk before that."""

from __future__ import annotations

from airflow_run import clear_with_downstream, drive
from helpers import conf, jobs
from test_resume import cure_poison, poison

from bq_backfill import ledger
from devtools.seed import SEED_TENANT, create_source, insert_target, inventory_rows


def _swallow(pg, product_code: str) -> None:
    """A trigger that silently drops one row on insert (returns NULL): the statement succeeds without it."""
    pg.execute(
        "CREATE FUNCTION swallow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "IF NEW.product_code = TG_ARGV[0] THEN RETURN NULL; END IF; RETURN NEW; END $$"
    )
    pg.execute(
        "CREATE TRIGGER swallow BEFORE INSERT ON inventory_movements FOR EACH ROW "
        f"EXECUTE FUNCTION swallow('{product_code}')"
    )


def test_a_row_a_trigger_swallows_fails_its_chunk_naming_the_trigger_on_the_copy_and_the_upsert_paths(
    pg, bq, backfill_dag
):
    rows = inventory_rows(SEED_TENANT, 600)
    create_source(bq, rows)
    ledger.apply_schema(pg)
    insert_target(pg, rows[250:260])  # chunk 1's range holds rows already (the upsert); the others are empty
    _swallow(pg, "P0000300")  # in chunk 1
    pg.execute(
        "CREATE TRIGGER swallow_too BEFORE INSERT ON inventory_movements FOR EACH ROW "
        "EXECUTE FUNCTION swallow('P0000010')"
    )

    dr = backfill_dag.test(run_conf=conf())

    assert dr.state == "failed"
    [job] = jobs(pg)
    assert job["status"] == "failed"
    message = "do not hold the source's values: trigger(s) swallow, swallow_too on inventory_movements changed"
    assert "2 of 3 chunks did not finish" in job["error_message"]
    for chunk in ("#0 of 3 [0, 250)", "#1 of 3 [250, 500)"):  # a COPY range and an upsert range
        assert f"chunk {chunk}: after writing, 1 of 250 rows in inventory_movements {message}" in job["error_message"]


def _failed_then(pg, bq, backfill_dag, damage, quarantined: bool = True) -> str:
    """A run stopped at chunk 3, damaged by `damage(job_id)`, then resumed: finalize's message. `quarantined`: the
    source also has a row to quarantine."""
    rows = inventory_rows(SEED_TENANT, 1_200)
    create_source(bq, [*rows, dict(rows[0], product_code=None)] if quarantined else rows)
    ledger.apply_schema(pg)
    poison(pg)
    dr = backfill_dag.test(run_conf=conf(max_rejected_rows=1))
    assert dr.state == "failed"
    [job] = jobs(pg)
    damage(job["id"])
    cure_poison(pg)

    clear_with_downstream(backfill_dag, dr.run_id, [("load_chunk", 3)])
    dr = drive(backfill_dag, dr.run_id)

    assert dr.state == "failed"
    [job] = jobs(pg)
    assert job["status"] == "failed"
    return job["error_message"]


def test_a_snapshot_that_gives_fewer_keys_than_were_read_fails_the_key_check(pg, bq, backfill_dag):
    def shrink_snapshot(job_id: str) -> None:
        snapshot = pg.execute("SELECT snapshot_table FROM bigquery_backfill_jobs WHERE id = %s", (job_id,)).fetchone()
        bq.query(f"DELETE FROM `{snapshot[0]}` WHERE _row_offset < 10").result()  # noqa: S608 - our own name

    message = _failed_then(pg, bq, backfill_dag, shrink_snapshot)

    assert "read of rows [0, 250) ended with 1 slice(s) short, first [0, 250): 240 rows of 250" in message
    assert "the snapshot changed since the chunks read it" in message


def test_a_quarantine_row_gone_missing_fails_the_count_check(pg, bq, backfill_dag):
    message = _failed_then(pg, bq, backfill_dag, lambda job_id: pg.execute("DELETE FROM backfill_quarantine"))

    assert "rows rejected 1 != rows in backfill_quarantine 0" in message


def test_a_target_row_deleted_after_its_chunk_proved_its_range_is_still_found(pg, bq, backfill_dag, caplog):
    """Chunk 1 proved its key range (every slice one COPY into an empty range) and recorded it; a row of that range
    deleted before finalize changes the range's row versions: finalize reads that chunk's keys and finds it."""

    def delete_one(job_id: str) -> None:
        [proof] = pg.execute(
            "SELECT key_proof FROM backfill_chunks WHERE job_id = %s AND chunk_index = 1", (job_id,)
        ).fetchone()
        assert proof is not None and sum(proof["versions"].values()) == 250
        pg.execute("DELETE FROM inventory_movements WHERE product_code = 'P0000300'")  # offset 300: chunk 1

    caplog.set_level("INFO", logger="bq_backfill.tasks.finalize")
    message = _failed_then(pg, bq, backfill_dag, delete_one)

    assert "1 source keys of the snapshot have no row in inventory_movements" in message
    assert "its key range changed since it proved it; reading its keys" in caplog.text


def test_a_target_row_deleted_after_every_chunk_proved_its_range_is_still_found(pg, bq, backfill_dag, caplog):
    """Every chunk proved its range (nothing quarantined): the tenant-wide aggregate of row versions differs, then the
    chunk's own, then its keys are read and the row is found missing."""

    def delete_one(job_id: str) -> None:
        pg.execute("DELETE FROM inventory_movements WHERE product_code = 'P0000300'")  # offset 300: chunk 1

    caplog.set_level("INFO", logger="bq_backfill.tasks.finalize")
    message = _failed_then(pg, bq, backfill_dag, delete_one, quarantined=False)

    assert "1 source keys of the snapshot have no row in inventory_movements" in message
    assert "proven rows, no more" not in caplog.text
    assert "key check: 4 of 5 chunks by their key proofs" in caplog.text
    assert "its key range changed since it proved it; reading its keys" in caplog.text

"""BigQuery side against the emulator: the numbered snapshot and chunk reads through the Storage Read API."""

from __future__ import annotations

from datetime import timedelta

import pyarrow.compute as pc

from bq_backfill.models import get_model
from bq_backfill.source import BigQuerySource, TableRef
from devtools.seed import OTHER_TENANT, SEED_TENANT, append_source, create_source, inventory_table

MODEL = get_model("inventory")


def _source() -> BigQuerySource:
    return BigQuerySource.from_connection("google_cloud_default")


def test_snapshot_numbers_rows_by_the_full_key_and_large_chunks_read_whole(bq):
    rows = inventory_table(SEED_TENANT, 120_000)
    create_source(bq, rows)
    append_source(bq, inventory_table(OTHER_TENANT, 5_000))
    src = _source()
    snap = TableRef(src.project, "backfill_scratch", "snap_test")

    total = src.new_snapshot(MODEL, src.table(MODEL.source_table), SEED_TENANT, snap, src.now())
    assert total == 120_000

    cols = [*MODEL.column_names, "_row_offset"]
    chunk = src.read_rows(snap, 10_000, 110_000, cols)  # one 100k-row chunk: well over gRPC's default 4 MiB
    assert chunk.num_rows == 100_000
    assert pc.min(chunk["_row_offset"]).as_py() == 10_000 and pc.max(chunk["_row_offset"]).as_py() == 109_999
    expected = rows.sort_by([(c, "ascending") for c in MODEL.order_key]).slice(10_000, 100_000)
    got = chunk.sort_by("_row_offset").select(MODEL.column_names)
    assert got.to_pylist() == expected.to_pylist()


def test_snapshot_is_frozen_and_recreated_identically_from_its_timestamp(bq):
    create_source(bq, inventory_table(SEED_TENANT, 2_000))
    src = _source()
    as_of = src.now()
    first = TableRef(src.project, "backfill_scratch", "snap_a")
    src.new_snapshot(MODEL, src.table(MODEL.source_table), SEED_TENANT, first, as_of)
    append_source(bq, inventory_table(SEED_TENANT, 2_500).slice(2_000))  # the source moves on after plan

    again = TableRef(src.project, "backfill_scratch", "snap_b")
    total = src.keep_snapshot(MODEL, src.table(MODEL.source_table), SEED_TENANT, again, as_of)
    assert total == 2_000
    cols = [*MODEL.column_names, "_row_offset"]
    a = src.read_rows(first, 0, 2_000, cols).sort_by("_row_offset")
    b = src.read_rows(again, 0, 2_000, cols).sort_by("_row_offset")
    assert a.to_pylist() == b.to_pylist()
    # keeping an existing snapshot (a retried plan) leaves it as it is; a new one replaces it, as of its own time
    assert src.keep_snapshot(MODEL, src.table(MODEL.source_table), SEED_TENANT, first, as_of + timedelta(0)) == 2_000
    assert src.new_snapshot(MODEL, src.table(MODEL.source_table), SEED_TENANT, first, src.now()) == 2_500


def test_the_tenant_matches_in_either_letter_case(bq):
    create_source(bq, inventory_table(SEED_TENANT.upper(), 300))
    append_source(bq, inventory_table(SEED_TENANT, 1_000).slice(300))
    src = _source()
    snap = TableRef(src.project, "backfill_scratch", "snap_case")

    assert src.new_snapshot(MODEL, src.table(MODEL.source_table), SEED_TENANT, snap, src.now()) == 1_000
    assert src.count_tenant_rows(MODEL, src.table(MODEL.source_table), SEED_TENANT.upper()) == 1_000

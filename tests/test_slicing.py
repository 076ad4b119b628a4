"""A chunk's read cut into slices: the same slices whatever order BigQuery sends its rows in, and a clear failure when
an offset is missing, doubled or outside the chunk."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest

from bq_backfill.slicing import SnapshotReadError, complete_slices


def _rows(lo: int, hi: int) -> pa.Table:
    return pa.table({"_row_offset": pa.array(range(lo, hi), pa.int64()), "v": [f"r{i}" for i in range(lo, hi)]})


def _batches(table: pa.Table, order: list[int], size: int) -> list[pa.RecordBatch]:
    shuffled = table.take(pa.array(order))
    return shuffled.to_batches(max_chunksize=size)


def test_rows_in_offset_order_give_each_slice_as_soon_as_it_is_full():
    table = _rows(1_000, 1_950)
    got = []
    for piece in complete_slices(table.to_batches(max_chunksize=70), 1_000, 1_950, 200, "_row_offset"):
        got.append((piece.lo, piece.hi, piece.rows.num_rows))
    assert got == [
        (1_000, 1_200, 200),
        (1_200, 1_400, 200),
        (1_400, 1_600, 200),
        (1_600, 1_800, 200),
        (1_800, 1_950, 150),
    ]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_rows_in_any_order_give_the_same_slices_sorted_by_offset(seed):
    table = _rows(0, 1_000)
    order = list(range(1_000))
    random.Random(seed).shuffle(order)

    slices = list(complete_slices(_batches(table, order, 37), 0, 1_000, 300, "_row_offset"))

    assert sorted((p.lo, p.hi) for p in slices) == [(0, 300), (300, 600), (600, 900), (900, 1_000)]
    for piece in slices:
        assert piece.rows.equals(_rows(piece.lo, piece.hi))


def test_a_missing_offset_fails_naming_the_short_slice():
    table = _rows(0, 500).filter(pa.array([i != 321 for i in range(500)]))
    with pytest.raises(SnapshotReadError, match=r"1 slice\(s\) short, first \[300, 400\): 99 rows of 100"):
        list(complete_slices(table.to_batches(), 0, 500, 100, "_row_offset"))


def test_a_doubled_offset_fails():
    table = pa.concat_tables([_rows(0, 99), _rows(50, 51)])  # 100 rows for [0, 100), offset 50 twice, 99 missing
    with pytest.raises(SnapshotReadError, match=r"\[0, 100\) returned an offset twice"):
        list(complete_slices(table.to_batches(), 0, 100, 100, "_row_offset"))


def test_an_offset_outside_the_chunk_fails():
    with pytest.raises(SnapshotReadError, match=r"read of rows \[0, 100\) returned offsets 50..100"):
        list(complete_slices(_rows(50, 101).to_batches(), 0, 100, 100, "_row_offset"))

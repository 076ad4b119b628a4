"""A slice's key range: first and last key in byte order (as BigQuery sorts the snapshot) and whether a key occurs
twice. A slice usually arrives in key order, which is checked without sorting; any other order is sorted."""

from __future__ import annotations

from datetime import date

import pyarrow as pa
import pytest
from helpers import INVENTORY

from bq_backfill.target_rows import KeyRange, key_range, strictly_ascending

MODEL = INVENTORY
D1, D2 = date(2024, 1, 1), date(2024, 1, 2)


def _keys(*rows: tuple) -> pa.Table:
    cols = list(zip(*rows, strict=True))
    return pa.table(
        {
            "movement_date": pa.array(cols[0], pa.date32()),
            "branch_id": pa.array(cols[1], pa.string()),
            "product_code": pa.array(cols[2], pa.string()),
        }
    )


def test_rows_in_key_order_give_their_ends_without_duplicates():
    rows = _keys((D1, "B1", "p2"), (D1, "B2", "p1"), (D2, "B1", "p1"))
    assert strictly_ascending(rows, ["movement_date", "branch_id", "product_code"])
    kr = key_range(MODEL, rows)
    assert (kr.first, kr.last, kr.duplicates) == ([D1, "B1", "p2"], [D2, "B1", "p1"], False)


def test_rows_out_of_order_are_sorted_first():
    rows = _keys((D2, "B1", "p1"), (D1, "B2", "p1"), (D1, "B1", "p9"))
    assert not strictly_ascending(rows, ["movement_date", "branch_id", "product_code"])
    kr = key_range(MODEL, rows)
    assert (kr.first, kr.last, kr.duplicates) == ([D1, "B1", "p9"], [D2, "B1", "p1"], False)


@pytest.mark.parametrize(
    "rows",
    [
        [(D1, "B1", "p1"), (D1, "B1", "p1"), (D2, "B1", "p1")],  # next to each other
        [(D1, "B1", "p1"), (D2, "B1", "p1"), (D1, "B1", "p1")],  # apart: only a sort brings them together
    ],
    ids=["adjacent", "apart"],
)
def test_a_key_twice_is_a_duplicate(rows):
    kr = key_range(MODEL, _keys(*rows))
    assert (kr.first, kr.last, kr.duplicates) == ([D1, "B1", "p1"], [D2, "B1", "p1"], True)


def test_text_compares_as_bytes():
    # byte order: upper case before lower case, ASCII before any multi-byte character ("é" is C3 A9)
    rows = _keys((D1, "B1", "Z"), (D1, "B1", "a"), (D1, "B1", "z"), (D1, "B1", "é"))
    assert strictly_ascending(rows, ["product_code"])
    assert not strictly_ascending(_keys((D1, "B1", "é"), (D1, "B1", "z")), ["product_code"])
    assert key_range(MODEL, rows).last == [D1, "B1", "é"]


def test_a_later_column_only_decides_between_equal_earlier_ones():
    rows = _keys((D1, "B2", "a"), (D2, "B1", "a"))  # B2 > B1, but the dates already decide
    assert strictly_ascending(rows, ["movement_date", "branch_id", "product_code"])
    assert not strictly_ascending(rows, ["branch_id", "movement_date"])


def test_one_row_is_its_own_first_and_last_key():
    assert key_range(MODEL, _keys((D1, "B1", "p1"))) == KeyRange([D1, "B1", "p1"], [D1, "B1", "p1"], False)


def test_a_null_is_never_ascending():
    assert not strictly_ascending(_keys((D1, "B1", None), (D1, "B1", "p1")), ["product_code"])
    assert not strictly_ascending(_keys((D1, "B1", "p1"), (D1, "B1", None)), ["product_code"])

"""Cuts one chunk's read, whose rows may come in any order, into slices of consecutive `_row_offset`s.

A chunk is read with one Storage Read session; BigQuery promises no row order within or across its streams. Each
incoming batch is split by slice; a slice is handed on, sorted by offset, once all its rows have arrived. When rows
come roughly in offset order (as they mostly do) only the slices being filled are held; in the worst case, the whole
chunk. Every offset of the chunk must arrive exactly once, or the read fails naming the slice.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa


class SnapshotReadError(RuntimeError):
    """The snapshot returned other rows than the chunk's offsets, each once."""


@dataclass(frozen=True)
class RowSlice:
    lo: int
    hi: int
    rows: pa.Table  # sorted by offset: exactly the offsets lo..hi-1


def slice_bounds(start: int, end: int, step: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + step, end)) for lo in range(start, end, step)]


Ranges = list[tuple[int, int]]


def merged(ranges: Ranges) -> Ranges:
    """Ascending disjoint ranges with those that meet (one ends where the next starts) joined."""
    runs: Ranges = []
    for lo, hi in ranges:
        if runs and runs[-1][1] == lo:
            runs[-1] = (runs[-1][0], hi)
        else:
            runs.append((lo, hi))
    return runs


def complete_slices(
    batches: Iterable[pa.RecordBatch],
    start: int,
    end: int,
    step: int,
    offset_column: str,
    ranges: Ranges | None = None,
    skip: Ranges | None = None,
) -> Iterator[RowSlice]:
    """Slices [lo, hi) of [start, end), each yielded as soon as its last row has arrived (so not in offset order
    when rows come out of order). With `ranges` (disjoint, ascending, within [start, end)), only their offsets are
    expected, each range cut into slices of its own; rows in `skip`
    (ranges not wanted: done already) are dropped; any other offset fails the read."""
    wanted = ranges if ranges is not None else [(start, end)]
    bounds = [b for lo, hi in wanted for b in slice_bounds(lo, hi, step)]
    starts = np.array([lo for lo, _ in bounds], dtype=np.int64)
    ends = np.array([hi for _, hi in bounds], dtype=np.int64)
    skipped = sorted(skip or [])
    parts: dict[int, list[pa.Table]] = {}
    have = [0] * len(bounds)
    for batch in batches:
        if not batch.num_rows:
            continue
        table = pa.Table.from_batches([batch])
        offsets = table.column(offset_column).to_numpy()
        if offsets.min() < start or offsets.max() >= end:
            raise SnapshotReadError(f"read of rows [{start}, {end}) returned offsets {offsets.min()}..{offsets.max()}")
        if np.any(np.diff(offsets) < 0):  # out of order: one sort, then cut as below
            order = np.argsort(offsets, kind="stable")
            table, offsets = table.take(pa.array(order)), offsets[order]
        which = np.searchsorted(starts, offsets, side="right") - 1
        inside = (which >= 0) & (offsets < ends[np.maximum(which, 0)])
        if not inside.all():
            table, offsets, which = _drop_skipped(table, offsets, which, inside, skipped, start, end)
            if not len(offsets):
                continue
        # rows of one slice are now consecutive: cut at the slice changes, zero-copy
        cuts = [0, *(np.flatnonzero(np.diff(which)) + 1).tolist(), len(which)]
        for a, b in itertools.pairwise(cuts):
            i = int(which[a])
            parts.setdefault(i, []).append(table.slice(a, b - a))
            have[i] += b - a
            lo, hi = bounds[i]
            if have[i] > hi - lo:
                raise SnapshotReadError(f"read of rows [{lo}, {hi}) returned {have[i]} rows or more")
            if have[i] == hi - lo:
                yield _finish(lo, hi, parts.pop(i), offset_column)
    missing = [(bounds[i], n) for i, n in enumerate(have) if n < bounds[i][1] - bounds[i][0]]
    if missing:
        (lo, hi), n = missing[0]
        raise SnapshotReadError(
            f"read of rows [{start}, {end}) ended with {len(missing)} slice(s) short, first [{lo}, {hi}): {n} rows "
            f"of {hi - lo}"
        )


def _drop_skipped(
    table: pa.Table, offsets: np.ndarray, which: np.ndarray, inside: np.ndarray, skipped: Ranges, start: int, end: int
) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """The rows of wanted ranges only; rows of `skipped` ranges dropped, any other offset refused."""
    outside = offsets[~inside]
    dropped = np.zeros(len(outside), dtype=bool)
    for lo, hi in skipped:
        dropped |= (outside >= lo) & (outside < hi)
    if not dropped.all():
        stray = outside[~dropped]
        raise SnapshotReadError(
            f"read of rows [{start}, {end}) returned offsets outside the chunk's ranges ({stray.min()}..{stray.max()})"
        )
    keep = np.flatnonzero(inside)
    return table.take(pa.array(keep)), offsets[keep], which[keep]


def _finish(lo: int, hi: int, parts: list[pa.Table], offset_column: str) -> RowSlice:
    rows = pa.concat_tables(parts)
    expected = np.arange(lo, hi)
    if not np.array_equal(rows.column(offset_column).to_numpy(), expected):
        rows = rows.sort_by(offset_column)  # only when rows came out of order
        if not np.array_equal(rows.column(offset_column).to_numpy(), expected):
            raise SnapshotReadError(f"read of rows [{lo}, {hi}) returned an offset twice (and so missed one)")
    return RowSlice(lo, hi, rows.combine_chunks())

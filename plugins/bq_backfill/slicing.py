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


def complete_slices(
    batches: Iterable[pa.RecordBatch], start: int, end: int, step: int, offset_column: str
) -> Iterator[RowSlice]:
    """Slices [lo, hi) of [start, end), each yielded as soon as its last row has arrived (so not in offset order
    when rows come out of order)."""
    bounds = slice_bounds(start, end, step)
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
        which = (offsets - start) // step
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


def _finish(lo: int, hi: int, parts: list[pa.Table], offset_column: str) -> RowSlice:
    rows = pa.concat_tables(parts)
    expected = np.arange(lo, hi)
    if not np.array_equal(rows.column(offset_column).to_numpy(), expected):
        rows = rows.sort_by(offset_column)  # only when rows came out of order
        if not np.array_equal(rows.column(offset_column).to_numpy(), expected):
            raise SnapshotReadError(f"read of rows [{lo}, {hi}) returned an offset twice (and so missed one)")
    return RowSlice(lo, hi, rows.combine_chunks())

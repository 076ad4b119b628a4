"""What a backfill reads from BigQuery, from the tables' sizes and BigQuery's documented billing: the source scan of
the snapshot query, and the Storage Read API's reads of the snapshot, before and after the snapshot was partitioned
by chunk and read with one session per chunk.

Sizes follow BigQuery's documented logical data sizes (https://cloud.google.com/bigquery/pricing#data_size_calculation):
STRING 2 bytes + its UTF-8 length, DATE / TIMESTAMP / INT64 8, NUMERIC 16. Billing: a query bills the bytes of the
columns it reads (a table neither partitioned nor clustered on the tenant: all of the table's rows); a Storage Read
session bills the bytes of the selected columns it scans, after partition pruning only (a row restriction on an
unpartitioned table prunes nothing). List prices, US multi-region, on-demand: queries $6.25 per TiB, Storage Read API
$1.10 per TiB (https://cloud.google.com/bigquery/pricing).
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

TIB = 1024**4
QUERY_USD_PER_TIB = 6.25
STORAGE_READ_USD_PER_TIB = 1.10
FIXED_BYTES = {pa.date32(): 8, pa.int64(): 8}
OLD_SLICE_ROWS = 20_000  # before: one read session per slice of a chunk
OLD_KEY_CHECK_ROWS = 100_000  # before: one read session per key-check range


def logical_bytes(table: pa.Table) -> dict[str, float]:
    """Average BigQuery logical bytes per row, by column."""
    out = {}
    for name in table.column_names:
        col = table[name]
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            out[name] = 2 + pc.mean(pc.binary_length(col)).as_py()
        elif pa.types.is_decimal(col.type):
            out[name] = 16.0
        else:
            out[name] = 8.0  # DATE, TIMESTAMP, INT64
    return out


@dataclass(frozen=True)
class Reads:
    source_scan: float  # bytes the snapshot query bills (query pricing)
    snapshot_reads: float  # bytes the Storage Read API bills for reading the snapshot (chunks + key check)

    @property
    def usd(self) -> float:
        return self.source_scan / TIB * QUERY_USD_PER_TIB + self.snapshot_reads / TIB * STORAGE_READ_USD_PER_TIB


def backfill_reads(row_bytes: dict[str, float], key_columns: list[str], rows: int) -> dict[str, Reads]:
    """Bytes a backfill of `rows` tenant rows reads, before and after, for a source holding only that tenant (a
    source shared with other tenants and not clustered on the tenant adds their rows to the source scan). After:
    each chunk's session reads its own partition, whatever the chunk size; finalize reads the key columns once."""
    source_row = sum(row_bytes.values())
    snapshot_row = source_row + 8  # + _row_offset INT64
    snapshot = rows * snapshot_row
    keys = rows * (sum(row_bytes[c] for c in key_columns) + 8)
    slices = -(-rows // OLD_SLICE_ROWS)
    ranges = -(-rows // OLD_KEY_CHECK_ROWS)
    return {
        "before": Reads(rows * source_row, slices * snapshot + ranges * keys),
        "after": Reads(rows * source_row, snapshot + keys),
    }


def report(sample: pa.Table, key_columns: list[str]) -> tuple[dict, list[str]]:
    row_bytes = logical_bytes(sample)
    figures, lines = {}, []
    lines.append(f"average logical row: {sum(row_bytes.values()):.0f} bytes (BigQuery's sizes, from the seed rows)")
    lines.append("| tenant rows | | source scan | snapshot reads | list price |")
    lines.append("|---|---|---|---|---|")
    for rows in (1_000_000, 100_000_000):
        figures[rows] = {}
        for when, reads in backfill_reads(row_bytes, key_columns, rows).items():
            figures[rows][when] = {"source_scan": reads.source_scan, "snapshot_reads": reads.snapshot_reads}
            scan, snap = _size(reads.source_scan), _size(reads.snapshot_reads)
            lines.append(f"| {rows:,} | {when} | {scan} | {snap} | ${reads.usd:,.2f} |")
    return figures, lines


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)

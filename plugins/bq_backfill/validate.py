"""Checks a chunk's rows against the target's types before they reach Postgres.

A row that cannot land (a NULL key column, a number too large for its numeric(p,s) column, a text longer than
its varchar(n), a NUL character Postgres text cannot hold) is taken out of the chunk with the reason, for the
quarantine table, instead of failing the whole chunk. A number with more decimals than its column's scale, which
Postgres would round without a word, is rejected the same way, or rounded here (as Postgres rounds: half away from
zero) and counted, as the run's `numeric_rounding` says. Everything here is columnar (pyarrow compute): no Python
row objects for good rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal

import pyarrow as pa
import pyarrow.compute as pc

from bq_backfill.models import Model

_NUMERIC = re.compile(r"^numeric\((\d+),\s*(\d+)\)$")
_VARCHAR = re.compile(r"^character varying\((\d+)\)$")
# what Postgres's uuid input takes from BigQuery: 32 hex digits, dashed or not, optionally in braces
_UUID = r"^\{?[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}\}?$"


@dataclass(frozen=True)
class Rejected:
    offsets: list[int]
    reasons: list[str]
    rows: list[dict]


@dataclass(frozen=True)
class Validated:
    good: pa.Table  # rows that can land (numbers rounded to their column's scale when the run says so)
    rejected: Rejected
    rounded: int  # rows of `good` with a number rounded


def split_invalid(model: Model, rows: pa.Table, offset_column: str, numeric_rounding: str = "reject") -> Validated:
    """Rows that can land, and rejected rows with one reason each, naming every failed check. `numeric_rounding`:
    "reject" quarantines a number with more decimals than its column's scale, "round" rounds it and counts it."""
    problems: list[tuple[pa.Array, str]] = []
    rounded_rows = None
    for name in model.conflict_key:
        problems.append((pc.is_null(rows[name]), f"NULL key column {name}"))
    for column in model.columns:
        values = rows[column.name]
        numeric = _NUMERIC.match(column.pg_type)
        if numeric and (pa.types.is_decimal(values.type) or pa.types.is_integer(values.type)):
            precision, scale = int(numeric.group(1)), int(numeric.group(2))
            problems.append((_out_of_range(values, precision, scale),
                             f"{column.name} out of range for {column.pg_type}"))  # fmt: skip
            if pa.types.is_decimal(values.type) and values.type.scale > scale:
                rounded = pc.round(values, ndigits=scale, round_mode="half_towards_infinity")
                changed = pc.fill_null(pc.not_equal(rounded, values), False)
                if numeric_rounding == "round":
                    rows = rows.set_column(rows.schema.get_field_index(column.name), column.name, rounded)
                    rounded_rows = changed if rounded_rows is None else pc.or_(rounded_rows, changed)
                else:
                    problems.append((changed, f"{column.name} has more than {scale} decimal places"))
        elif _is_text(values.type):
            problems.append((pc.match_substring(values, "\x00"), f"{column.name} contains a NUL character"))
            if column.pg_type == "uuid" and column.name != model.tenant_column:  # the tenant's is checked by BigQuery
                not_uuid = pc.invert(pc.match_substring_regex(values, _UUID))
                problems.append((not_uuid, f"{column.name} is not a uuid"))
            if limit := _VARCHAR.match(column.pg_type):  # Postgres would refuse the whole chunk
                longer = pc.greater(pc.utf8_length(values), int(limit.group(1)))
                problems.append((longer, f"{column.name} longer than {limit.group(1)} characters"))
        elif pa.types.is_list(values.type) and _is_text(values.type.value_type):
            lists = values.combine_chunks()
            nul = pc.fill_null(pc.match_substring(pc.list_flatten(lists), "\x00"), False)
            parents = pc.list_parent_indices(lists)
            hit = pc.is_in(pa.array(range(len(values)), pa.int64()), value_set=pc.filter(parents, nul).cast(pa.int64()))
            problems.append((hit, f"{column.name} has an element with a NUL character"))
    bad = None
    for mask, _ in problems:
        mask = pc.fill_null(mask, False)
        bad = mask if bad is None else pc.or_(bad, mask)
    if bad is None or not pc.any(bad).as_py():
        return Validated(rows, Rejected([], [], []), _count(rounded_rows))
    rejected = rows.filter(bad)
    reasons = []
    masks = [(pc.fill_null(mask, False).filter(bad), reason) for mask, reason in problems]
    for i in range(rejected.num_rows):
        reasons.append("; ".join(reason for mask, reason in masks if mask[i].as_py()))
    keep = pc.invert(bad)
    return Validated(
        rows.filter(keep),
        Rejected(
            offsets=rejected[offset_column].to_pylist(),
            reasons=reasons,
            rows=rejected.drop([offset_column]).to_pylist(),
        ),
        _count(None if rounded_rows is None else pc.filter(rounded_rows, keep)),
    )


def _is_text(data_type: pa.DataType) -> bool:
    return pa.types.is_string(data_type) or pa.types.is_large_string(data_type)


def _count(mask: pa.ChunkedArray | pa.Array | None) -> int:
    return 0 if mask is None else int(pc.sum(pc.cast(mask, pa.int64())).as_py() or 0)


def _out_of_range(values: pa.ChunkedArray, precision: int, scale: int) -> pa.ChunkedArray:
    """Exactly what Postgres refuses for numeric(precision, scale): |value rounded to scale| >= 10^(p-s).
    Postgres rounds half away from zero before checking, so 99.995 does not fit numeric(4,2)."""
    if pa.types.is_integer(values.type):
        values = pc.cast(values, pa.decimal128(38, 0))
    source_digits, digits = values.type.precision - values.type.scale, precision - scale  # before the point
    if source_digits < digits or (source_digits == digits and values.type.scale <= scale):
        # every value of the source type fits (NUMERIC's decimal(38,9) into numeric(38,9)): nothing to refuse
        return pa.chunked_array([pa.array([False] * len(values), pa.bool_())])
    if source_digits == digits:  # rounding can carry into one more digit than the source type holds
        values = pc.cast(values, pa.decimal256(min(76, values.type.precision + 1), values.type.scale))
    rounded = pc.round(values, ndigits=scale, round_mode="half_towards_infinity")
    limit = pa.scalar(Decimal(10) ** (precision - scale), rounded.type)  # same type: no precision widening
    # a value whose rounding overflows the source type comes back as garbage: it is over the limit unrounded too
    too_big = pc.greater_equal(pc.abs(values), limit)
    return pc.or_(too_big, pc.greater_equal(pc.abs(rounded), limit))

"""The target read back as Arrow: a tenant's rows in a key range, in the source's column types, so that a chunk can
be compared with what is already there without sending it to Postgres.

A key range is in byte order, as BigQuery sorts the snapshot; a key column in another collation can sort a row
outside it, which callers treat as "not there" (the safe answer: they then take the exact path).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
from psycopg import sql

from bq_backfill.models import Model


@dataclass(frozen=True)
class KeyRange:
    first: list  # key columns after the tenant, smallest first in byte order (as BigQuery sorts)
    last: list
    duplicates: bool  # whether a key occurs more than once


def key_range(model: Model, rows: pa.Table) -> KeyRange:
    """First and last key of (non-empty) validated rows, and whether a key occurs twice."""
    key_cols = list(model.conflict_key[1:])
    ordered = rows.select(key_cols).sort_by([(c, "ascending") for c in key_cols])
    same_as_previous = None
    for c in key_cols:
        col = ordered[c]
        equal = pc.equal(col.slice(1), col.slice(0, len(col) - 1))
        same_as_previous = equal if same_as_previous is None else pc.and_(same_as_previous, equal)
    duplicates = same_as_previous is not None and bool(pc.any(same_as_previous).as_py())
    first, last = ordered.slice(0, 1).to_pylist()[0], ordered.slice(len(ordered) - 1, 1).to_pylist()[0]
    return KeyRange([first[c] for c in key_cols], [last[c] for c in key_cols], duplicates)


def rows_in_range(
    conn: psycopg.Connection, model: Model, tenant_id: str, keys: KeyRange, columns: list[str], schema: pa.Schema
) -> pa.Table | None:
    """The tenant's target rows with first <= key <= last, in the types of `schema` (None: see rows_matching)."""
    key = sql.SQL(", ").join(map(sql.Identifier, model.conflict_key[1:]))
    marks = sql.SQL(", ").join(sql.Placeholder() * (len(model.conflict_key) - 1))
    in_range = sql.SQL("({key}) >= ({lo}) AND ({key}) <= ({hi})").format(key=key, lo=marks, hi=marks)
    return rows_matching(conn, model, tenant_id, columns, schema, in_range, [*keys.first, *keys.last])


def rows_matching(
    conn: psycopg.Connection,
    model: Model,
    tenant_id: str,
    columns: list[str],
    schema: pa.Schema,
    where: sql.Composable | None = None,
    params: Sequence[object] = (),
) -> pa.Table | None:
    """The tenant's target rows (these columns, matching `where`) as Arrow in the types of `schema`, or None if a
    value does not parse back into its type (then the caller takes the slow, exact path).

    The rows come back as one text value, each row in Postgres's record syntax (CSV-like: NULL is an empty field,
    an empty string is "", a value with a separator, quote, backslash or parenthesis is quoted), parsed by Arrow's
    CSV reader: a row-by-row fetch or COPY TO spends more time in Python per row than the whole comparison takes.
    """
    query = sql.SQL(
        # btrim drops the record's parentheses: a value that starts or ends with one is quoted, so no more goes
        "SELECT string_agg(btrim(ROW({cols})::text, '()'), E'\\n') FROM {target} WHERE {tenant} = %s AND ({where})"
    ).format(
        cols=sql.SQL(", ").join(map(sql.Identifier, columns)),
        target=sql.Identifier(model.target_table),
        tenant=sql.Identifier(model.tenant_column),
        where=where or sql.SQL("TRUE"),
    )
    # timestamps come out as UTC with an explicit offset, whatever the server's default TimeZone
    conn.execute("SELECT set_config('TimeZone', 'UTC', true)")
    row = conn.execute(query, [tenant_id, *params]).fetchone()
    if row is None or row[0] is None:
        return schema.empty_table().select(columns)
    try:
        return pa_csv.read_csv(
            io.BytesIO(row[0].encode()),
            read_options=pa_csv.ReadOptions(column_names=columns),
            # inside quotes the record syntax doubles quotes and backslashes
            parse_options=pa_csv.ParseOptions(double_quote=True, escape_char="\\", newlines_in_values=True),
            convert_options=pa_csv.ConvertOptions(
                column_types={c: schema.field(c).type for c in columns},
                null_values=[""],  # a NULL field is empty; an empty string is written "" and stays ""
                strings_can_be_null=True,
                quoted_strings_can_be_null=False,
            ),
        )
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None

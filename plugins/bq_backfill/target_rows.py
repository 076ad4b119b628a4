"""The target read back as Arrow: a tenant's rows in a key range, in the source's column types, so that a chunk can
be compared with what is already there without sending it to Postgres.

A key range is in byte order, as BigQuery sorts the snapshot; a key column in another collation can sort a row
outside it, which callers treat as "not there" (the safe answer: they then take the exact path).
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
from psycopg import sql

from bq_backfill import pg_text
from bq_backfill.models import Model


@dataclass(frozen=True)
class KeyRange:
    first: list  # key columns after the tenant, smallest first in byte order (as BigQuery sorts)
    last: list
    duplicates: bool  # whether a key occurs more than once
    in_order: bool = True  # whether the rows came smallest key first, strictly ascending (first row = first key)


def key_range(model: Model, rows: pa.Table) -> KeyRange:
    """First and last key of (non-empty) validated rows, and whether a key occurs twice."""
    key_cols = list(model.conflict_key[1:])
    in_order = strictly_ascending(rows, key_cols)
    if in_order:  # the usual case: a slice of the snapshot comes in key order
        ordered = rows.select(key_cols)
        duplicates = False
    else:
        ordered = rows.select(key_cols).sort_by([(c, "ascending") for c in key_cols])
        duplicates = not strictly_ascending(ordered, key_cols)  # sorted: not strictly ascending = a key twice
    first, last = ordered.slice(0, 1).to_pylist()[0], ordered.slice(len(ordered) - 1, 1).to_pylist()[0]
    return KeyRange([first[c] for c in key_cols], [last[c] for c in key_cols], duplicates, in_order)


def strictly_ascending(rows: pa.Table, columns: list[str]) -> bool:
    """Whether each row's (columns) is greater than the previous row's, comparing text as bytes: sorted and no
    repeats. Vectorised over adjacent pairs (no sort); a NULL compares as not ascending."""
    if rows.num_rows < 2:
        return True
    ascending = None
    for c in reversed(columns):  # (a, b) < (a', b')  <=>  a < a'  or  (a = a' and b < b')
        before, after = rows[c].slice(0, rows.num_rows - 1), rows[c].slice(1)
        less = pc.less(before, after)
        ascending = less if ascending is None else pc.or_(less, pc.and_(pc.equal(before, after), ascending))
    return bool(pc.all(pc.fill_null(ascending, False)).as_py())


VERSION_COLUMN = "_backfill_row_version"  # a row's xmin, as text, when rows_in_range is asked for versions


def rows_in_range(
    conn: psycopg.Connection,
    model: Model,
    tenant_id: str,
    keys: KeyRange,
    columns: list[str],
    schema: pa.Schema,
    versions: bool = False,
) -> pa.Table | None:
    """The tenant's target rows with first <= key <= last (these columns, in the types of `schema`), in key order as
    the server's collations sort it, or None if a value does not parse back into its type (then the caller takes
    the slow, exact path). `versions`: also each row's version (xmin) as VERSION_COLUMN, read in the same statement.

    The rows come as COPY TO CSV: the server renders CSV at about half the cost of record text (measured), and
    Arrow parses it with no Python object per value. psycopg hands over COPY a row at a time, though, which costs
    Python time under the GIL: right for one fetch at a time (a chunk's slices), not for several in threads.
    """
    where, params = in_range(model, keys)
    select = [sql.Identifier(c) for c in columns]
    if versions:
        select.append(sql.SQL("xmin::text AS {}").format(sql.Identifier(VERSION_COLUMN)))
        columns, schema = [*columns, VERSION_COLUMN], schema.append(pa.field(VERSION_COLUMN, pa.string()))
    query = sql.SQL(
        "COPY (SELECT {cols} FROM {target} WHERE {tenant} = %s AND {where} ORDER BY {key}) TO STDOUT (FORMAT csv)"
    ).format(
        cols=sql.SQL(", ").join(select),
        key=sql.SQL(", ").join(map(sql.Identifier, model.conflict_key[1:])),
        target=sql.Identifier(model.target_table),
        tenant=sql.Identifier(model.tenant_column),
        where=where,
    )
    _utc(conn)
    data = bytearray()
    with conn.cursor() as cur, cur.copy(query, [tenant_id, *params]) as copy:
        for block in copy:  # a message per row
            data += block
    # COPY's CSV: NULL is an unquoted empty field, an empty string is written "" and stays ""
    return _parse_csv(data, columns, schema, pa_csv.ParseOptions(newlines_in_values=True))


# Key ranges asked about in one statement (a fleet's slice can hold the rows of many small tenants)
RANGES_PER_STATEMENT = 100


def empty_ranges(conn: psycopg.Connection, model: Model, ranges: list[tuple[str, KeyRange]]) -> list[bool]:
    """For each (tenant, key range): whether the target holds no row of the tenant with first <= key <= last;
    RANGES_PER_STATEMENT ranges a statement."""
    empty = [True] * len(ranges)
    for at in range(0, len(ranges), RANGES_PER_STATEMENT):
        branches, params = [], []
        for i, (tenant_id, keys) in enumerate(ranges[at : at + RANGES_PER_STATEMENT], start=at):
            where, bound = in_range(model, keys)
            branches.append(
                sql.SQL("SELECT {i} WHERE EXISTS (SELECT 1 FROM {target} WHERE {tenant} = %s AND {where})").format(
                    i=sql.Literal(i),
                    target=sql.Identifier(model.target_table),
                    tenant=sql.Identifier(model.tenant_column),
                    where=where,
                )
            )
            params += [tenant_id, *bound]
        for (i,) in conn.execute(sql.SQL(" UNION ALL ").join(branches), params).fetchall():
            empty[int(i)] = False
    return empty


def keys_in_range(
    conn: psycopg.Connection, model: Model, tenant_id: str, keys: KeyRange, schema: pa.Schema
) -> pa.Table | None:
    """The key columns (after the tenant) of the tenant's target rows with first <= key <= last, in no particular
    order, in the types of `schema`; None as for rows_in_range.

    The rows come back as one text value, each row in Postgres's record syntax: the client does no work per row,
    so several of these run at once in threads (finalize's key check) without waiting on each other for the GIL.
    """
    columns = list(model.conflict_key[1:])
    where, params = in_range(model, keys)
    query = sql.SQL(
        # btrim drops the record's parentheses: a value that starts or ends with one is quoted, so no more goes
        "SELECT string_agg(btrim(ROW({cols})::text, '()'), E'\\n') FROM {target} WHERE {tenant} = %s AND {where}"
    ).format(
        cols=sql.SQL(", ").join(map(sql.Identifier, columns)),
        target=sql.Identifier(model.target_table),
        tenant=sql.Identifier(model.tenant_column),
        where=where,
    )
    _utc(conn)
    row = conn.execute(query, [tenant_id, *params]).fetchone()
    text = row[0] if row and row[0] is not None else ""
    # record syntax: NULL is an empty field, an empty string is "", and inside quotes backslashes escape
    parse = pa_csv.ParseOptions(double_quote=True, escape_char="\\", newlines_in_values=True)
    return _parse_csv(text.encode(), columns, schema, parse)


def of_tenants(model: Model, alias: str | None = None) -> sql.Composable:
    """The condition "the row's tenant is one of %s" (one parameter: a list of tenants), in the tenant column's
    type, so the key's index serves it."""
    tenant = next(c for c in model.columns if c.name == model.tenant_column)
    column = sql.Identifier(*filter(None, [alias, model.tenant_column]))
    return sql.SQL("{} = ANY(%s::{}[])").format(column, sql.SQL(tenant.pg_type))


def in_range(model: Model, keys: KeyRange) -> tuple[sql.Composable, list]:
    """The condition first <= key <= last on the key columns after the tenant, and its parameters."""
    key = sql.SQL(", ").join(map(sql.Identifier, model.conflict_key[1:]))
    marks = sql.SQL(", ").join(sql.Placeholder() * (len(model.conflict_key) - 1))
    where = sql.SQL("(({key}) >= ({lo}) AND ({key}) <= ({hi}))").format(key=key, lo=marks, hi=marks)
    return where, [*keys.first, *keys.last]


def _utc(conn: psycopg.Connection) -> None:
    # timestamps come out as UTC with an explicit offset, dates as ISO and bytea as hex, whatever the server's defaults
    conn.execute(
        "SELECT set_config('TimeZone', 'UTC', true), set_config('DateStyle', 'ISO, YMD', true), "
        "set_config('bytea_output', 'hex', true)"
    )


def _parse_csv(
    data: bytes | bytearray, columns: list[str], schema: pa.Schema, parse: pa_csv.ParseOptions
) -> pa.Table | None:
    if not data:
        return schema.empty_table().select(columns)
    as_text = [c for c in columns if pg_text.needs_text(schema.field(c).type)]  # parsed by pg_text, after the CSV
    try:
        table = pa_csv.read_csv(
            pa.BufferReader(pa.py_buffer(data)),
            read_options=pa_csv.ReadOptions(column_names=columns),
            parse_options=parse,
            convert_options=pa_csv.ConvertOptions(
                column_types={c: pa.string() if c in as_text else schema.field(c).type for c in columns},
                null_values=[""],  # an unquoted empty field; a quoted one ("") is the empty string
                strings_can_be_null=True,
                quoted_strings_can_be_null=False,
                true_values=["t"],  # how Postgres writes a boolean
                false_values=["f"],
            ),
        )
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    for c in as_text:
        parsed = pg_text.from_copy_text(table.column(c), schema.field(c).type)
        if parsed is None:
            return None
        table = table.set_column(table.schema.get_field_index(c), c, parsed)
    return table

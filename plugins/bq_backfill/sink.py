"""Postgres side of a chunk: stage Arrow rows with COPY, quarantine bad keys, upsert the rest.

Everything here runs inside the caller's transaction, so a chunk lands completely with its progress, or not at all.
Identifiers come from the model registry and are composed with psycopg.sql; values are always bound.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
from psycopg import sql
from psycopg.copy import QueuedLibpqWriter
from psycopg.types.json import Jsonb

from bq_backfill.models import Model
from bq_backfill.validate import Rejected

OFFSET_COLUMN = "_row_offset"
STAGE = sql.Identifier("backfill_stage")
COPY_SLICE_ROWS = 4_096  # rows of CSV rendered at a time (about 0.5 MB)


def stage_rows(conn: psycopg.Connection, model: Model, rows: pa.Table) -> None:
    """COPY the chunk into a temp table that has the model's columns but none of the target's constraints."""
    _temp_table_from_arrow(conn, STAGE, model, model.column_names, rows)


def _temp_table_from_arrow(
    conn: psycopg.Connection, table: sql.Identifier, model: Model, columns: tuple[str, ...], rows: pa.Table
) -> None:
    """A transaction-scoped temp table of the given model columns (their types, no constraints) plus the source
    offset, filled from the Arrow rows with COPY. Replaces the previous slice's table of the same transaction."""
    typed = sql.SQL(", ").join(
        sql.SQL("{} {}").format(sql.Identifier(c.name), sql.SQL(c.pg_type)) for c in model.columns if c.name in columns
    )
    conn.execute(sql.SQL("DROP TABLE IF EXISTS pg_temp.{}").format(table))
    conn.execute(
        sql.SQL("CREATE TEMP TABLE {} ({}, {} bigint) ON COMMIT DROP").format(
            table, typed, sql.Identifier(OFFSET_COLUMN)
        )
    )
    _copy_arrow(conn, table, rows.select([*columns, OFFSET_COLUMN]))


def quarantine(conn: psycopg.Connection, job_id: str, chunk_index: int, rejected: Rejected) -> int:
    """Keeps rows that cannot land in backfill_quarantine, with the reason and the row as JSON."""
    if not rejected.offsets:
        return 0
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO backfill_quarantine (job_id, chunk_index, source_offset, reason, row_data) "
            "VALUES (%s, %s, %s, %s, %s)",
            [
                (job_id, chunk_index, offset, reason, Jsonb(row, dumps=_dumps))
                for offset, reason, row in zip(rejected.offsets, rejected.reasons, rejected.rows, strict=True)
            ],
        )
    return len(rejected.offsets)


def _dumps(row: dict) -> str:
    # jsonb cannot hold U+0000: show it as the text \u0000 instead
    clean = {k: v.replace("\x00", "\\u0000") if isinstance(v, str) else v for k, v in row.items()}
    return json.dumps(clean, default=str, ensure_ascii=False)


@dataclass(frozen=True)
class Landed:
    """How a chunk's rows reached the target: `copy` (empty key range: one COPY), `unchanged` (every row already
    there with the same values: nothing written) or `upsert` (staged, then INSERT ... ON CONFLICT)."""

    path: str
    distinct: int
    inserted: int
    updated: int


def land_rows(
    conn: psycopg.Connection, model: Model, tenant_id: str, rows: pa.Table, keys: KeyRange | None = None
) -> Landed:
    """Writes validated rows (every key column set) to the target by the cheapest path that gives the upsert's
    result. Offsets follow the key order, so a chunk covers one key range of the tenant: the target's rows in that
    range decide the path. `keys`: the rows' key_range(), if already computed (e.g. by a reader thread)."""
    if rows.num_rows == 0:
        return Landed("unchanged", 0, 0, 0)
    keys = keys or key_range(model, rows)
    if not keys.duplicates:
        columns = [c for c in model.column_names if c != model.tenant_column]
        existing = _target_rows_in_range(conn, model, tenant_id, keys, columns, rows.schema)
        if existing is not None and existing.num_rows == 0 and _copy_into_empty_range(conn, model, rows):
            return Landed("copy", rows.num_rows, rows.num_rows, 0)
        if existing is not None and _same_rows(model, rows, existing):
            return Landed("unchanged", rows.num_rows, 0, 0)
    stage_rows(conn, model, rows)
    return Landed("upsert", **upsert_staged(conn, model))


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


def _target_rows_in_range(
    conn: psycopg.Connection, model: Model, tenant_id: str, keys: KeyRange, columns: list[str], schema: pa.Schema
) -> pa.Table | None:
    """The tenant's target rows with first <= key <= last, in the types of `schema` (None: see _target_rows)."""
    key = sql.SQL(", ").join(map(sql.Identifier, model.conflict_key[1:]))
    marks = sql.SQL(", ").join(sql.Placeholder() * (len(model.conflict_key) - 1))
    in_range = sql.SQL("({key}) >= ({lo}) AND ({key}) <= ({hi})").format(key=key, lo=marks, hi=marks)
    return _target_rows(conn, model, tenant_id, columns, schema, in_range, [*keys.first, *keys.last])


def _target_rows(
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


def _same_rows(model: Model, rows: pa.Table, existing: pa.Table) -> bool:
    """True when the target already holds every chunk row with equal values, and nothing else in its range."""
    if rows.num_rows != existing.num_rows:
        return False
    order = [(c, "ascending") for c in model.conflict_key[1:]]
    incoming, existing = rows.select(existing.column_names).sort_by(order), existing.sort_by(order)
    return all(incoming[c].equals(existing[c]) for c in existing.column_names)


def _copy_into_empty_range(conn: psycopg.Connection, model: Model, rows: pa.Table) -> bool:
    """COPY straight into the target: what an upsert would do when no key of the chunk is there, at the cost of a
    plain COPY. Inside a savepoint: a row written meanwhile by someone else makes the COPY fail with a unique
    violation, which undoes only the COPY (returns False: take the upsert path)."""
    try:
        with conn.transaction():
            _copy_arrow(conn, sql.Identifier(model.target_table), rows.select(list(model.column_names)))
    except psycopg.errors.UniqueViolation:
        return False
    return True


def upsert_staged(conn: psycopg.Connection, model: Model) -> dict[str, int]:
    """Upserts the staged rows (already validated: every key column set) into the target.

    Duplicate keys in the chunk collapse to the last one by source offset (ON CONFLICT cannot touch a row twice);
    unchanged rows are not rewritten, so a re-run leaves no dead tuples. Returns distinct/inserted/updated counts.
    """
    target = sql.Identifier(model.target_table)
    cols = sql.SQL(", ").join(map(sql.Identifier, model.column_names))
    key = sql.SQL(", ").join(map(sql.Identifier, model.conflict_key))
    values = model.value_columns
    query = sql.SQL(
        """
        WITH src AS (
            SELECT DISTINCT ON ({key}) {cols}
            FROM {stage}
            ORDER BY {key}, {off} DESC
        ),
        upserted AS (
            INSERT INTO {target} AS t ({cols})
            SELECT {cols} FROM src
            ON CONFLICT ({key}) DO UPDATE SET {assign}
            WHERE ({current}) IS DISTINCT FROM ({incoming})
            RETURNING (xmax = 0) AS inserted
        )
        SELECT (SELECT count(*) FROM src)                            AS distinct_keys,
               (SELECT count(*) FROM upserted WHERE inserted)        AS inserted,
               (SELECT count(*) FROM upserted WHERE NOT inserted)    AS updated
        """
    ).format(
        key=key,
        cols=cols,
        stage=STAGE,
        off=sql.Identifier(OFFSET_COLUMN),
        target=target,
        assign=sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in values),
        current=sql.SQL(", ").join(sql.SQL("t.{}").format(sql.Identifier(c)) for c in values),
        incoming=sql.SQL(", ").join(sql.SQL("EXCLUDED.{}").format(sql.Identifier(c)) for c in values),
    )
    row = conn.execute(query).fetchone()
    assert row is not None
    return {"distinct": int(row[0]), "inserted": int(row[1]), "updated": int(row[2])}


def missing_keys(conn: psycopg.Connection, model: Model, tenant_id: str, job_id: str, keys: pa.Table) -> int:
    """How many of these source rows (key columns and _row_offset of one offset range of the snapshot) have no row
    with their key in the target, not counting rows this job quarantined. An Arrow anti-join with the target's keys
    in the same key range; the keys it leaves (or all, if the target's do not parse back: see _target_rows) are
    checked by a Postgres anti-join against a temp table of them."""
    key_cols = list(model.conflict_key[1:])
    if keys.num_rows == 0:
        return 0
    offsets = keys[OFFSET_COLUMN]
    quarantined = conn.execute(
        "SELECT source_offset FROM backfill_quarantine WHERE job_id = %s AND source_offset BETWEEN %s AND %s",
        [job_id, pc.min(offsets).as_py(), pc.max(offsets).as_py()],
    ).fetchall()
    if quarantined:
        value_set = pa.array([r[0] for r in quarantined], pa.int64())
        keys = keys.filter(pc.invert(pc.is_in(keys[OFFSET_COLUMN], value_set=value_set)))
        if keys.num_rows == 0:
            return 0
    existing = _target_rows_in_range(conn, model, tenant_id, key_range(model, keys), key_cols, keys.schema)
    if existing is not None:
        keys = keys.join(existing, keys=key_cols, join_type="left anti")
        if keys.num_rows == 0:
            return 0
        # Confirmed by Postgres key by key: the range is in byte order, and a key column in another collation
        # can sort a present key outside it.
    tmp = sql.Identifier("backfill_keys")
    _temp_table_from_arrow(conn, tmp, model, tuple(key_cols), keys)
    match = sql.SQL(" AND ").join(sql.SQL("t.{0} = k.{0}").format(sql.Identifier(c)) for c in key_cols)
    row = conn.execute(
        sql.SQL(
            "SELECT count(*) FROM {tmp} k "
            "WHERE NOT EXISTS (SELECT 1 FROM {target} t WHERE t.{tenant} = %(tenant_id)s AND {match})"
        ).format(
            tmp=tmp,
            target=sql.Identifier(model.target_table),
            tenant=sql.Identifier(model.tenant_column),
            match=match,
        ),
        {"tenant_id": tenant_id},
    ).fetchone()
    assert row is not None
    return int(row[0])


def _copy_arrow(conn: psycopg.Connection, table: sql.Identifier, rows: pa.Table) -> None:
    """COPY an Arrow table into a table with the same column names, as CSV rendered by Arrow (no Python rows).

    CSV NULL is an unquoted empty field; an empty string is written quoted, so both survive. The CSV is rendered a
    slice at a time while a writer thread sends the previous slices: Arrow formats on one core while the server
    parses on the other, and only a few slices of text are held at once.
    """
    rows = _csv_ready(rows)
    copy = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT csv)").format(
        table, sql.SQL(", ").join(map(sql.Identifier, rows.column_names))
    )
    options = pa_csv.WriteOptions(include_header=False, quoting_style="needed")
    with conn.cursor() as cur, cur.copy(copy, writer=QueuedLibpqWriter(cur)) as pipe:
        for batch in rows.to_batches(max_chunksize=COPY_SLICE_ROWS):
            buffer = io.BytesIO()
            pa_csv.write_csv(batch, buffer, options)
            pipe.write(buffer.getbuffer())


def _csv_ready(rows: pa.Table) -> pa.Table:
    """Timestamps with a time zone as UTC text with an explicit offset: Arrow's CSV writer formats them ~40x slower
    than this cast, and the offset makes Postgres read them the same whatever the session's TimeZone."""
    for i, field in enumerate(rows.schema):
        if pa.types.is_timestamp(field.type) and field.type.tz is not None:
            naive_utc = pc.cast(rows.column(i), pa.timestamp(field.type.unit))
            text = pc.binary_join_element_wise(pc.cast(naive_utc, pa.string()), "+00", "")
            rows = rows.set_column(i, field.name, text)
    return rows

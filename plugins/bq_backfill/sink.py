"""Postgres side of a chunk: stage Arrow rows with COPY, quarantine bad keys, upsert the rest.

Everything here runs inside the caller's transaction, so a chunk lands completely with its progress, or not at all.
Identifiers come from the model registry and are composed with psycopg.sql; values are always bound.
"""

from __future__ import annotations

import io
import json

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
from psycopg import sql
from psycopg.types.json import Jsonb

from bq_backfill.models import Model
from bq_backfill.validate import Rejected

OFFSET_COLUMN = "_row_offset"
STAGE = sql.Identifier("backfill_stage")


def stage_rows(conn: psycopg.Connection, model: Model, rows: pa.Table) -> None:
    """COPY the chunk into a temp table that has the model's columns but none of the target's constraints."""
    _temp_table_from_arrow(conn, STAGE, model, model.column_names, rows)


def _temp_table_from_arrow(
    conn: psycopg.Connection, table: sql.Identifier, model: Model, columns: tuple[str, ...], rows: pa.Table
) -> None:
    """A transaction-scoped temp table of the given model columns (their types, no constraints) plus the source
    offset, filled from the Arrow rows with COPY."""
    typed = sql.SQL(", ").join(
        sql.SQL("{} {}").format(sql.Identifier(c.name), sql.SQL(c.pg_type)) for c in model.columns if c.name in columns
    )
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


def insert_into_empty_range(conn: psycopg.Connection, model: Model, tenant_id: str, rows: pa.Table) -> int | None:
    """The cold-target fast path: COPY the rows straight into the target when none of their keys can be there.

    Offsets follow the key order, so a chunk covers one key range; if the target holds no row of this tenant in
    that range and the chunk has no duplicate key, an upsert would insert every row: COPY does the same at the
    cost of a plain COPY. Returns the rows inserted, or None when the upsert path must be taken (a row in the
    range, a duplicate key, or a concurrent writer's row making the COPY fail, which is then undone).
    """
    if rows.num_rows == 0:
        return 0
    key_cols = list(model.conflict_key[1:])
    ordered = rows.select(key_cols).sort_by([(c, "ascending") for c in key_cols])
    same_as_previous = None
    for c in key_cols:
        col = ordered[c]
        equal = pc.equal(col.slice(1), col.slice(0, len(col) - 1))
        same_as_previous = equal if same_as_previous is None else pc.and_(same_as_previous, equal)
    if same_as_previous is not None and pc.any(same_as_previous).as_py():
        return None
    first, last = ordered.slice(0, 1).to_pylist()[0], ordered.slice(len(ordered) - 1, 1).to_pylist()[0]
    key = sql.SQL(", ").join(map(sql.Identifier, key_cols))
    marks = sql.SQL(", ").join(sql.Placeholder() * len(key_cols))
    occupied = conn.execute(
        sql.SQL(
            "SELECT EXISTS (SELECT 1 FROM {target} WHERE {tenant} = %s AND ({key}) >= ({lo}) AND ({key}) <= ({hi}))"
        ).format(
            target=sql.Identifier(model.target_table),
            tenant=sql.Identifier(model.tenant_column),
            key=key,
            lo=marks,
            hi=marks,
        ),
        [tenant_id, *(first[c] for c in key_cols), *(last[c] for c in key_cols)],
    ).fetchone()
    if occupied is None or occupied[0]:
        return None
    try:
        with conn.transaction():  # a savepoint: a row written meanwhile by someone else undoes only this COPY
            _copy_arrow(conn, sql.Identifier(model.target_table), rows.select(list(model.column_names)))
    except psycopg.errors.UniqueViolation:
        return None
    return rows.num_rows


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
    """How many source rows (key columns and _row_offset of the snapshot) have no row with their key in the
    target, not counting rows this job quarantined."""
    key_cols = model.conflict_key[1:]
    tmp = sql.Identifier("backfill_keys")
    _temp_table_from_arrow(conn, tmp, model, key_cols, keys)
    match = sql.SQL(" AND ").join(sql.SQL("t.{0} = k.{0}").format(sql.Identifier(c)) for c in key_cols)
    row = conn.execute(
        sql.SQL(
            "SELECT count(*) FROM {tmp} k "
            "WHERE NOT EXISTS (SELECT 1 FROM {target} t WHERE t.{tenant} = %(tenant_id)s AND {match}) "
            "AND NOT EXISTS (SELECT 1 FROM backfill_quarantine q "
            "WHERE q.job_id = %(job_id)s AND q.source_offset = k.{off})"
        ).format(
            tmp=tmp,
            target=sql.Identifier(model.target_table),
            tenant=sql.Identifier(model.tenant_column),
            match=match,
            off=sql.Identifier(OFFSET_COLUMN),
        ),
        {"tenant_id": tenant_id, "job_id": job_id},
    ).fetchone()
    assert row is not None
    return int(row[0])


def _copy_arrow(conn: psycopg.Connection, table: sql.Identifier, rows: pa.Table) -> None:
    """COPY an Arrow table into a table with the same column names, as CSV rendered by Arrow (no Python rows).
    CSV NULL is an unquoted empty field; an empty string is written quoted, so both survive."""
    buffer = io.BytesIO()
    pa_csv.write_csv(rows, buffer, pa_csv.WriteOptions(include_header=False, quoting_style="needed"))
    copy = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT csv)").format(
        table, sql.SQL(", ").join(map(sql.Identifier, rows.column_names))
    )
    with conn.cursor() as cur, cur.copy(copy) as pipe:
        view = buffer.getbuffer()
        step = 1 << 20
        for start in range(0, len(view), step):
            pipe.write(view[start : start + step])

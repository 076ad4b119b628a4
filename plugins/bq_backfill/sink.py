"""Postgres side of a chunk: stage Arrow rows with COPY, quarantine bad keys, upsert the rest.

Everything here runs inside the caller's transaction, so a chunk lands completely with its progress, or not at all.
Identifiers come from the model registry and are composed with psycopg.sql; values are always bound.
"""

from __future__ import annotations

import io

import psycopg
import pyarrow as pa
import pyarrow.csv as pa_csv
from psycopg import sql

from bq_backfill.models import Model

OFFSET_COLUMN = "_row_offset"
STAGE = sql.Identifier("backfill_stage")


def stage_rows(conn: psycopg.Connection, model: Model, rows: pa.Table) -> None:
    """COPY the chunk into a temp table that has the model's columns but none of the target's constraints."""
    names = [*model.column_names, OFFSET_COLUMN]
    columns = sql.SQL(", ").join(
        sql.SQL("{} {}").format(sql.Identifier(c.name), sql.SQL(c.pg_type)) for c in model.columns
    )
    conn.execute(
        sql.SQL("CREATE TEMP TABLE {} ({}, {} bigint) ON COMMIT DROP").format(
            STAGE, columns, sql.Identifier(OFFSET_COLUMN)
        )
    )
    buffer = io.BytesIO()
    # CSV keeps the rows columnar end to end (no Python row objects); NULL is an unquoted empty field.
    pa_csv.write_csv(rows.select(names), buffer, pa_csv.WriteOptions(include_header=False, quoting_style="needed"))
    copy = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT csv)").format(STAGE, sql.SQL(", ").join(map(sql.Identifier, names)))
    with conn.cursor() as cur, cur.copy(copy) as pipe:
        view = buffer.getbuffer()
        step = 1 << 20
        for start in range(0, len(view), step):
            pipe.write(view[start : start + step])


def _null_key(model: Model) -> sql.Composable:
    return sql.SQL(" OR ").join(sql.SQL("{} IS NULL").format(sql.Identifier(k)) for k in model.conflict_key)


def quarantine_null_keys(conn: psycopg.Connection, model: Model, job_id: str, chunk_index: int) -> int:
    """Moves staged rows with a NULL key column to backfill_quarantine, with the columns named in the reason."""
    reason = sql.SQL("concat_ws(', ', {})").format(
        sql.SQL(", ").join(
            sql.SQL("CASE WHEN {} IS NULL THEN {} END").format(sql.Identifier(k), sql.Literal(k))
            for k in model.conflict_key
        )
    )
    cur = conn.execute(
        sql.SQL(
            "INSERT INTO backfill_quarantine (job_id, chunk_index, source_offset, reason, row_data) "
            "SELECT %(job_id)s, %(chunk_index)s, s.{off}, 'NULL key column: ' || {reason}, to_jsonb(s) "
            "FROM {stage} s WHERE {null_key}"
        ).format(off=sql.Identifier(OFFSET_COLUMN), reason=reason, stage=STAGE, null_key=_null_key(model)),
        {"job_id": job_id, "chunk_index": chunk_index},
    )
    return cur.rowcount


def upsert_staged(conn: psycopg.Connection, model: Model) -> dict[str, int]:
    """Upserts staged rows with a complete key into the target.

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
            WHERE NOT ({null_key})
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
        null_key=_null_key(model),
        off=sql.Identifier(OFFSET_COLUMN),
        target=target,
        assign=sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in values),
        current=sql.SQL(", ").join(sql.SQL("t.{}").format(sql.Identifier(c)) for c in values),
        incoming=sql.SQL(", ").join(sql.SQL("EXCLUDED.{}").format(sql.Identifier(c)) for c in values),
    )
    row = conn.execute(query).fetchone()
    assert row is not None
    return {"distinct": int(row[0]), "inserted": int(row[1]), "updated": int(row[2])}


def missing_keys(conn: psycopg.Connection, model: Model, tenant_id: str, keys: pa.Table) -> int:
    """How many of the given source keys (one tenant's, NULL-free) have no row in the target."""
    key_cols = model.conflict_key[1:]
    tmp = sql.Identifier("backfill_keys")
    conn.execute(
        sql.SQL("CREATE TEMP TABLE {} ({}) ON COMMIT DROP").format(
            tmp,
            sql.SQL(", ").join(
                sql.SQL("{} {}").format(sql.Identifier(c.name), sql.SQL(c.pg_type))
                for c in model.columns
                if c.name in key_cols
            ),
        )
    )
    buffer = io.BytesIO()
    pa_csv.write_csv(keys.select(list(key_cols)), buffer, pa_csv.WriteOptions(include_header=False))
    with (
        conn.cursor() as cur,
        cur.copy(
            sql.SQL("COPY {} ({}) FROM STDIN (FORMAT csv)").format(
                tmp, sql.SQL(", ").join(map(sql.Identifier, key_cols))
            )
        ) as pipe,
    ):
        pipe.write(buffer.getvalue())
    match = sql.SQL(" AND ").join(sql.SQL("t.{0} = k.{0}").format(sql.Identifier(c)) for c in key_cols)
    row = conn.execute(
        sql.SQL(
            "SELECT count(*) FROM {tmp} k WHERE NOT EXISTS "
            "(SELECT 1 FROM {target} t WHERE t.{tenant} = %(tenant_id)s AND {match})"
        ).format(
            tmp=tmp, target=sql.Identifier(model.target_table), tenant=sql.Identifier(model.tenant_column), match=match
        ),
        {"tenant_id": tenant_id},
    ).fetchone()
    assert row is not None
    return int(row[0])

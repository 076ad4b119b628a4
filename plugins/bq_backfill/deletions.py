"""Target rows of the tenant whose key is not in the run's snapshot: rows deleted from the source since an earlier
sync, counted by every run and deleted on request (delete_missing).

Only rows written before the plan are candidates: the plan records Postgres's snapshot (pg_current_snapshot) just
before it fixes BigQuery's as-of time, and a row whose last write (its xmin) is not visible in that snapshot was
inserted or updated afterwards, by someone else (the run's own rows all have snapshot keys), and is never counted
nor deleted. Another tenant's rows are never looked at.
"""

from __future__ import annotations

from collections.abc import Iterable

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
from psycopg import sql

from bq_backfill import sink, target_rows
from bq_backfill.models import Model
from bq_backfill.source import BigQuerySource, TableRef

KEYS = sql.Identifier("backfill_snapshot_keys")


def distinct_sorted_keys(model: Model, keys: pa.Table) -> int | None:
    """Distinct keys among rows that come in key order (the snapshot's offsets follow the model's order key), or None
    when the order key does not begin with the key columns (duplicates need not be adjacent then)."""
    key_cols = list(model.conflict_key[1:])
    if list(model.order_key[: len(key_cols)]) != key_cols or keys.num_rows == 0:
        return None if keys.num_rows else 0
    same = None
    for c in key_cols:
        eq = pc.equal(keys[c].slice(0, keys.num_rows - 1), keys[c].slice(1))
        same = eq if same is None else pc.and_(same, eq)
    return keys.num_rows - int(pc.sum(pc.cast(pc.fill_null(same, False), pa.int64())).as_py() or 0)


def tenant_rows(conn: psycopg.Connection, model: Model, tenant_id: str) -> int:
    query = sql.SQL("SELECT count(*) FROM {} WHERE {} = %s").format(
        sql.Identifier(model.target_table), sql.Identifier(model.tenant_column)
    )
    return int(conn.execute(query, [tenant_id]).fetchone()[0])


def load_snapshot_keys(
    conn: psycopg.Connection, model: Model, bq: BigQuerySource, snapshot: TableRef, ranges: list[tuple[int, int]]
) -> None:
    """Every key of the tenant's rows in the snapshot (its job's chunks' offset `ranges`; NULL-keyed rows left
    out) in a temp table, read with one read session per chunk (its own partition), a batch at a time."""
    key_cols = list(model.conflict_key[1:])
    load_keys(conn, model, (b for lo, hi in ranges for b in bq.read_chunk(snapshot, lo, hi, key_cols)))


def load_keys(
    conn: psycopg.Connection, model: Model, batches: Iterable[pa.Table | pa.RecordBatch], tenants: bool = False
) -> None:
    """Keys (the key columns after the tenant, or with `tenants` all of them; NULL-keyed ones left out) in a temp
    table for this transaction."""
    key_cols = list(model.conflict_key if tenants else model.conflict_key[1:])
    typed = sql.SQL(", ").join(
        sql.SQL("{} {}").format(sql.Identifier(c.name), sql.SQL(c.pg_type)) for c in model.columns if c.name in key_cols
    )
    conn.execute(sql.SQL("CREATE TEMP TABLE {} ({}) ON COMMIT DROP").format(KEYS, typed))
    for batch in batches:
        keys = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
        valid = None
        for c in key_cols:
            ok = pc.is_valid(keys[c])
            valid = ok if valid is None else pc.and_(valid, ok)
        if valid is not None:
            keys = keys.filter(valid)
        sink.copy_arrow(conn, KEYS, keys.select(key_cols))
    conn.execute(sql.SQL("CREATE INDEX ON {} ({})").format(KEYS, sql.SQL(", ").join(map(sql.Identifier, key_cols))))
    conn.execute(sql.SQL("ANALYZE {}").format(KEYS))


def _missing(model: Model) -> sql.Composable:
    """The tenant's target rows (alias t) whose key is not among the loaded snapshot keys."""
    match = sql.SQL(" AND ").join(sql.SQL("k.{0} = t.{0}").format(sql.Identifier(c)) for c in model.conflict_key[1:])
    return sql.SQL("t.{tenant} = %(tenant_id)s AND NOT EXISTS (SELECT 1 FROM {keys} k WHERE {match})").format(
        tenant=sql.Identifier(model.tenant_column), keys=KEYS, match=match
    )


# A row's xmin as a full 64-bit transaction id (xid8), from the current one's epoch: the row was written in this
# epoch if its 32-bit id is not above the current one's, else in the one before (a later epoch cannot be).
_WRITTEN_BEFORE_PLAN = sql.SQL(
    "pg_visible_in_snapshot((CASE WHEN t.xmin::text::bigint <= (cur.x & 4294967295) "
    "THEN ((cur.x >> 32) << 32) | t.xmin::text::bigint "
    "ELSE (((cur.x >> 32) - 1) << 32) | t.xmin::text::bigint END)::text::xid8, %(plan_snapshot)s::pg_snapshot)"
)
_CURRENT = sql.SQL("(SELECT pg_current_xact_id()::text::bigint AS x) AS cur")


def count_all_missing(conn: psycopg.Connection, model: Model, tenant_ids: list[str]) -> dict[str, int]:
    """Each tenant's target rows, however recent, whose key is not among the keys loaded with their tenant
    (load_keys(tenants=True)); one statement for all the tenants."""
    match = sql.SQL(" AND ").join(sql.SQL("k.{0} = t.{0}").format(sql.Identifier(c)) for c in model.conflict_key)
    query = sql.SQL(
        "SELECT t.{tenant}::text, count(*) FROM {target} AS t WHERE {of} "
        "AND NOT EXISTS (SELECT 1 FROM {keys} k WHERE {match}) GROUP BY t.{tenant}"
    ).format(
        tenant=sql.Identifier(model.tenant_column),
        target=sql.Identifier(model.target_table),
        of=target_rows.of_tenants(model, "t"),
        keys=KEYS,
        match=match,
    )
    found = {value.lower(): int(n) for value, n in conn.execute(query, [tenant_ids]).fetchall()}
    return {t: found.get(t.lower(), 0) for t in tenant_ids}


def count_missing(conn: psycopg.Connection, model: Model, tenant_id: str, plan_snapshot: str) -> tuple[int, int]:
    """(rows written before the plan, rows written after it) among the tenant's target rows whose key is not in the
    loaded snapshot keys."""
    query = sql.SQL(
        "SELECT count(*) FILTER (WHERE {before}), count(*) FILTER (WHERE NOT {before}) FROM {target} AS t, {cur} "
        "WHERE {missing}"
    ).format(
        before=_WRITTEN_BEFORE_PLAN, target=sql.Identifier(model.target_table), cur=_CURRENT, missing=_missing(model)
    )
    before, after = conn.execute(query, {"tenant_id": tenant_id, "plan_snapshot": plan_snapshot}).fetchone()
    return int(before), int(after)


def delete_missing(conn: psycopg.Connection, model: Model, tenant_id: str, plan_snapshot: str) -> int:
    """Deletes the tenant's target rows written before the plan whose key is not in the loaded snapshot keys."""
    query = sql.SQL("DELETE FROM {target} AS t USING {cur} WHERE {missing} AND {before}").format(
        target=sql.Identifier(model.target_table), cur=_CURRENT, missing=_missing(model), before=_WRITTEN_BEFORE_PLAN
    )
    return conn.execute(query, {"tenant_id": tenant_id, "plan_snapshot": plan_snapshot}).rowcount

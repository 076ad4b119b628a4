"""Postgres side of a chunk: quarantine rows that cannot land, land the rest by the cheapest path that gives the
upsert's result (one COPY into an empty key range, nothing when the rows are already there, a staged upsert
otherwise), and finalize's check that every source key is in the target.

Everything here runs inside the caller's transaction, so a chunk lands completely with its progress, or not at all.
Identifiers come from the model registry and are composed with psycopg.sql; values are always bound.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, replace

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
from psycopg import sql
from psycopg.copy import QueuedLibpqWriter
from psycopg.types.json import Jsonb

from bq_backfill import pg_text, range_proofs, target_rows, type_map
from bq_backfill.errors import PermanentChunkError
from bq_backfill.models import OFFSET_COLUMN, Model
from bq_backfill.validate import Rejected

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
    create_temp_table(conn, table, model, columns, sql.SQL("{} bigint").format(sql.Identifier(OFFSET_COLUMN)))
    copy_arrow(conn, table, rows.select([*columns, OFFSET_COLUMN]))


def create_temp_table(
    conn: psycopg.Connection,
    table: sql.Identifier,
    model: Model,
    columns: tuple[str, ...],
    extra: sql.Composable | None = None,
) -> None:
    """A transaction-scoped temp table of the given model columns (the model's types, in its order; no constraints),
    plus `extra` column definitions; replaces one of the same name earlier in the transaction."""
    typed = [
        sql.SQL("{} {}").format(sql.Identifier(c.name), sql.SQL(c.pg_type)) for c in model.columns if c.name in columns
    ]
    conn.execute(sql.SQL("DROP TABLE IF EXISTS pg_temp.{}").format(table))
    conn.execute(
        sql.SQL("CREATE TEMP TABLE {} ({}) ON COMMIT DROP").format(
            table, sql.SQL(", ").join([*typed, *filter(None, [extra])])
        )
    )


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
    """How a chunk's rows reached the target: `copy` (empty key range: one COPY), `proven` (the range holds the
    rows as an earlier run proved it: nothing fetched or written), `unchanged` (every row already there with the
    same values: nothing written) or `upsert` (staged, then INSERT ... ON CONFLICT).

    Each count is what the database reports or was seen to hold, not a difference of other counts; rows that a
    trigger or rule changed or swallowed fail the chunk instead (TargetRowsDifferError).

    `versions`: when the slice's key range was seen, in this transaction, to hold exactly its rows (a range proof
    recorded or used), the range's row versions (xmin -> rows); otherwise None."""

    path: str
    inserted: int
    updated: int
    unchanged: int
    versions: dict[str, int] | None = None


def land_rows(
    conn: psycopg.Connection,
    model: Model,
    tenant_id: str,
    rows: pa.Table,
    keys: target_rows.KeyRange | None = None,
    proof: range_proofs.ProofKey | None = None,
    triggers: tuple[str, ...] = (),
) -> Landed:
    """land_slices for one tenant's rows."""
    try:
        return land_slices(conn, model, [TenantRows(tenant_id, rows, keys, proof)], triggers)[0]
    except SliceFailedError as exc:
        assert exc.__cause__ is not None
        raise exc.__cause__ from None


@dataclass(frozen=True)
class TenantRows:
    """Validated rows of one tenant (every key column set), consecutive in the snapshot: so one key range of the
    tenant. `keys`: their key_range(), if already computed (e.g. by a reader thread); `proof`: their proof key, to
    use a proof an earlier run recorded, and to record one when the range ends up holding exactly these rows."""

    tenant_id: str
    rows: pa.Table
    keys: target_rows.KeyRange | None = None
    proof: range_proofs.ProofKey | None = None


class SliceFailedError(Exception):
    """The rows of slices[index] could not land (the cause says why); raised from that cause."""

    def __init__(self, index: int) -> None:
        super().__init__(f"slice {index}")
        self.index = index


def land_slices(
    conn: psycopg.Connection, model: Model, slices: list[TenantRows], triggers: tuple[str, ...] = ()
) -> list[Landed]:
    """Writes each slice of rows to the target by the cheapest path that gives the upsert's result (with a trigger
    on the target: the snapshot's values, or TargetRowsDifferError; a path that writes nothing fires nothing).
    Offsets follow the key order, so each slice covers one key range of its tenant: the target's rows in that range
    decide the path. Slices whose proof holds are `proven`; those whose ranges are empty land together by one COPY;
    each of the others is compared with its range, then skipped (`unchanged`) or upserted. `triggers`: the user
    triggers that fire on the target's inserts or updates (target_checks.write_guards); with any, rows are written
    only by the staged upsert, whose result is checked. A slice that cannot land raises SliceFailedError naming it."""
    landed: list[Landed | None] = [None] * len(slices)
    keyed: list[int] = []
    slices = list(slices)
    for i, piece in enumerate(slices):
        if piece.rows.num_rows == 0:
            landed[i] = Landed("unchanged", 0, 0, 0)
            continue
        if piece.keys is None:
            slices[i] = piece = replace(piece, keys=target_rows.key_range(model, piece.rows))
        if not piece.keys.duplicates:
            keyed.append(i)
    _land_proven(conn, model, slices, [i for i in keyed if slices[i].proof], landed)
    if not triggers:
        _land_copied(conn, model, slices, [i for i in keyed if landed[i] is None], landed)
    for i, piece in enumerate(slices):
        if landed[i] is None:
            try:
                landed[i] = _land_compared(conn, model, piece, triggers)
            except psycopg.OperationalError:
                raise  # the connection or the statement (e.g. a timeout), not these rows
            except (psycopg.DatabaseError, TargetRowsDifferError) as exc:
                raise SliceFailedError(i) from exc
    return [x for x in landed if x is not None]


def _land_proven(
    conn: psycopg.Connection, model: Model, slices: list[TenantRows], which: list[int], landed: list[Landed | None]
) -> None:
    """The slices whose range holds what a proof of their digest recorded: nothing to fetch or write."""
    checks = []
    for i in which:
        piece = slices[i]
        assert piece.proof is not None and piece.keys is not None
        checks.append((piece.proof, piece.keys, piece.rows.num_rows))
    held = range_proofs.holds(conn, model, checks)
    proven = [(i, versions) for i, versions in zip(which, held, strict=True) if versions is not None]
    range_proofs.record(conn, [(slices[i].proof, slices[i].rows.num_rows, v) for i, v in proven])  # now this job's
    for i, versions in proven:
        n = slices[i].rows.num_rows
        landed[i] = Landed("proven", 0, 0, n, versions)


def _land_copied(
    conn: psycopg.Connection, model: Model, slices: list[TenantRows], which: list[int], landed: list[Landed | None]
) -> None:
    """The slices whose key ranges hold no row yet, written by one COPY: what upserts would do, at the cost of one
    plain COPY. If that COPY cannot write them all (a row written meanwhile by someone else, a row the target
    refuses), it is undone and each slice is left to the compared path, which names the one that fails."""
    ranges = []
    for i in which:
        assert slices[i].keys is not None
        ranges.append((slices[i].tenant_id, slices[i].keys))
    empty = [i for i, free in zip(which, target_rows.empty_ranges(conn, model, ranges), strict=True) if free]
    if not empty:
        return
    columns = list(model.column_names)
    try:
        copied = _copy_into_empty_range(conn, model, pa.concat_tables([slices[i].rows.select(columns) for i in empty]))
    except psycopg.OperationalError:
        raise
    except (psycopg.DatabaseError, TargetRowsDifferError) as exc:
        if len(empty) == 1:
            raise SliceFailedError(empty[0]) from exc
        return
    if copied is None:
        return
    held = range_proofs.record_copied(conn, model, [(slices[i].proof, slices[i].rows) for i in empty])
    for i, versions in zip(empty, held, strict=True):
        landed[i] = Landed("copy", slices[i].rows.num_rows, 0, 0, versions)


def _land_compared(conn: psycopg.Connection, model: Model, piece: TenantRows, triggers: tuple[str, ...]) -> Landed:
    """One slice compared with what its key range holds: nothing written when equal, else a staged upsert."""
    rows, keys, proof, n = piece.rows, piece.keys, piece.proof, piece.rows.num_rows
    assert keys is not None
    if not keys.duplicates:
        columns = [c for c in model.column_names if c != model.tenant_column]
        existing = target_rows.rows_in_range(
            conn, model, piece.tenant_id, keys, columns, rows.schema, proof is not None
        )
        if existing is not None and existing.num_rows == 0 and not triggers:
            # empty now, though not when _land_copied asked, or its COPY failed: this slice alone
            copied = _copy_into_empty_range(conn, model, rows)
            if copied is not None:
                held = range_proofs.record_copied(conn, model, [(proof, rows)])[0]
                return Landed("copy", copied, 0, 0, held)
        if existing is not None and _same_rows(model, rows, existing.select(columns)):
            held = None
            if proof:  # versions read in the same statement as the rows they were compared on
                versions = range_proofs.versions_of(existing)
                held = versions if range_proofs.record(conn, [(proof, n, versions)])[0] else None
            return Landed("unchanged", 0, 0, n, held)
    stage_rows(conn, model, rows)
    return Landed("upsert", **upsert_staged(conn, model, triggers))


def _same_rows(model: Model, rows: pa.Table, existing: pa.Table) -> bool:
    """True when the target already holds every chunk row with equal values, and nothing else in its range."""
    if rows.num_rows != existing.num_rows:
        return False
    incoming = rows.select(existing.column_names)
    jsonb = {c.name for c in model.columns if type_map.postgres_base(c.pg_type) == "jsonb"}
    if _same_columns(incoming, existing, jsonb):  # the usual case: both in key order already, no sort needed
        return True
    # Another order (a key column in a collation that does not sort as bytes do, or a source whose order key does
    # not start with the conflict key): compare sorted.
    order = [(c, "ascending") for c in model.conflict_key[1:]]
    return _same_columns(incoming.sort_by(order), existing.sort_by(order), jsonb)


def _same_columns(a: pa.Table, b: pa.Table, jsonb: set[str]) -> bool:
    # column by column: types and values, not the schemas' nullability flags (BigQuery's REQUIRED, CSV's none);
    # jsonb as Postgres compares it (its text is normalised: key order, spacing, number spelling)
    return all(pg_text.same_json(a[c], b[c]) if c in jsonb else _same_values(a[c], b[c]) for c in a.column_names)


def _same_values(a: pa.ChunkedArray, b: pa.ChunkedArray) -> bool:
    """Equal values, NaN equal to NaN as Postgres has it (Arrow's equals has NaN unequal to itself)."""
    if a.equals(b):
        return True
    if pa.types.is_floating(a.type) and a.type == b.type:
        a, b = a.combine_chunks(), b.combine_chunks()
        nan_a, nan_b = pc.fill_null(pc.is_nan(a), False), pc.fill_null(pc.is_nan(b), False)
        return nan_a.equals(nan_b) and pc.if_else(nan_a, 0.0, a).equals(pc.if_else(nan_b, 0.0, b))
    if pa.types.is_list(a.type) and pa.types.is_floating(a.type.value_type) and a.type == b.type:
        a, b = a.combine_chunks(), b.combine_chunks()
        return (
            a.is_null().equals(b.is_null())
            and pc.fill_null(pc.list_value_length(a), 0).equals(pc.fill_null(pc.list_value_length(b), 0))
            and _same_values(pa.chunked_array([pc.list_flatten(a)]), pa.chunked_array([pc.list_flatten(b)]))
        )
    return False


def _copy_into_empty_range(conn: psycopg.Connection, model: Model, rows: pa.Table) -> int | None:
    """COPY straight into the target: what an upsert would do when no key of the rows is there, at the cost of a
    plain COPY; returns the rows written. Inside a savepoint, which undoes only the COPY: a row written meanwhile by
    someone else makes it fail with a unique violation (returns None: take the upsert path); a COPY that wrote
    fewer rows than it was given (a trigger created without the caller knowing, or a rule) raises
    TargetRowsDifferError; a row the server refuses raises the server's error."""
    try:
        with conn.transaction():
            copied = copy_arrow(conn, sql.Identifier(model.target_table), rows.select(list(model.column_names)))
            if copied != rows.num_rows:  # never a short COPY
                raise TargetRowsDifferError(_differs(model, rows.num_rows, copied, ()))
            return copied
    except psycopg.errors.UniqueViolation:
        return None


class TargetRowsDifferError(PermanentChunkError):
    """After a write, the target does not hold the source's values: a trigger or rule changed or skipped rows."""


def _differs(model: Model, staged: int, held: int, triggers: tuple[str, ...]) -> str:
    table = model.target_table
    cause = (
        f"trigger(s) {', '.join(triggers)} on {table} changed or skipped them"
        if triggers
        else f"no trigger on {table} fires on this session's writes: a rule, or another session, changed them"
    )
    return (
        f"after writing, {staged - held} of {staged} rows in {table} do not hold the source's values: {cause}. "
        "A backfill lands the source's values exactly: disable such triggers while it runs (ALTER TABLE "
        f"{table} DISABLE TRIGGER name) or make them leave the model's columns alone, then clear the chunk"
    )


def upsert_staged(conn: psycopg.Connection, model: Model, triggers: tuple[str, ...] = ()) -> dict[str, int]:
    """Upserts the staged rows (already validated: every key column set) into the target.

    Duplicate keys in the chunk collapse to the last one by source offset (ON CONFLICT cannot touch a row twice);
    unchanged rows are not rewritten, so a re-run leaves no dead tuples. Returns inserted/updated counts (from the
    statement's RETURNING) and unchanged: the staged rows the target then holds value for value, less those two.
    Raises TargetRowsDifferError when the target then holds fewer of the staged rows than there are (a trigger or
    rule changed or skipped some; `triggers` names those the caller knows of): the chunk rolls back.
    """
    target = sql.Identifier(model.target_table)
    cols = sql.SQL(", ").join(map(sql.Identifier, model.column_names))
    key = sql.SQL(", ").join(map(sql.Identifier, model.conflict_key))
    values = model.value_columns
    # the staged rows, one per key: the last by source offset
    src = sql.SQL("SELECT DISTINCT ON ({key}) {cols} FROM {stage} ORDER BY {key}, {off} DESC").format(
        key=key, cols=cols, stage=STAGE, off=sql.Identifier(OFFSET_COLUMN)
    )
    current = sql.SQL(", ").join(sql.SQL("t.{}").format(sql.Identifier(c)) for c in values)
    query = sql.SQL(
        """
        WITH src AS ({src}),
        upserted AS (
            INSERT INTO {target} AS t ({cols})
            SELECT {cols} FROM src
            ON CONFLICT ({key}) DO UPDATE SET {assign}
            WHERE ({current}) IS DISTINCT FROM ({incoming})
            RETURNING (xmax = 0) AS inserted
        )
        SELECT (SELECT count(*) FROM upserted WHERE inserted)        AS inserted,
               (SELECT count(*) FROM upserted WHERE NOT inserted)    AS updated,
               (SELECT count(*) FROM src)                            AS staged
        """
    ).format(
        src=src,
        key=key,
        cols=cols,
        target=target,
        assign=sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in values),
        current=current,
        incoming=sql.SQL(", ").join(sql.SQL("EXCLUDED.{}").format(sql.Identifier(c)) for c in values),
    )
    row = conn.execute(query).fetchone()
    assert row is not None
    inserted, updated, staged = int(row[0]), int(row[1]), int(row[2])
    # Checked after the statement, not derived from it: a row a trigger skipped or changed is not counted.
    holds = sql.SQL(
        "WITH src AS ({src}) SELECT count(*) FROM src JOIN {target} AS t USING ({key}) "
        "WHERE ({current}) IS NOT DISTINCT FROM ({staged})"
    ).format(
        src=src,
        target=target,
        key=key,
        current=current,
        staged=sql.SQL(", ").join(sql.SQL("src.{}").format(sql.Identifier(c)) for c in values),
    )
    found = conn.execute(holds).fetchone()
    assert found is not None
    matched = int(found[0])
    if matched != staged:
        raise TargetRowsDifferError(_differs(model, staged, matched, triggers))
    return {"inserted": inserted, "updated": updated, "unchanged": matched - inserted - updated}


def missing_keys(conn: psycopg.Connection, model: Model, tenant_id: str, job_id: str, keys: pa.Table) -> int:
    """How many of these source rows (key columns and _row_offset of one offset range of the snapshot) have no row
    with their key in the target, not counting rows this job quarantined. An Arrow anti-join with the target's keys
    in the same key range; the keys it leaves (or all, if the target's do not parse back) are checked by a Postgres
    anti-join against a temp table of them."""
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
    bounds = target_rows.key_range(model, keys)
    existing = target_rows.keys_in_range(conn, model, tenant_id, bounds, keys.schema)
    if existing is not None:
        if _same_columns(keys.select(key_cols), existing, set()):  # the range holds exactly these keys, in this order
            return 0
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


def copy_arrow(conn: psycopg.Connection, table: sql.Identifier, rows: pa.Table) -> int:
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
    with conn.cursor() as cur:
        with cur.copy(copy, writer=QueuedLibpqWriter(cur)) as pipe:
            for batch in rows.to_batches(max_chunksize=COPY_SLICE_ROWS):
                buffer = io.BytesIO()
                pa_csv.write_csv(batch, buffer, options)
                pipe.write(buffer.getbuffer())
        return cur.rowcount  # rows the server wrote (a row a trigger skipped is not among them)


def _csv_ready(rows: pa.Table) -> pa.Table:
    """Columns Arrow's CSV writer cannot render as Postgres reads them, as text (pg_text): bytes, lists, and
    timestamps with a time zone (as UTC with an explicit offset, so Postgres reads them the same whatever the
    session's TimeZone; Arrow's own CSV formatting of them is also ~40x slower)."""
    for i, field in enumerate(rows.schema):
        if pg_text.needs_text(field.type):
            rows = rows.set_column(i, field.name, pg_text.to_copy_text(rows.column(i)))
        elif pa.types.is_timestamp(field.type) and field.type.tz is not None:
            rows = rows.set_column(i, field.name, pg_text.scalar_text(rows.column(i)))
    return rows

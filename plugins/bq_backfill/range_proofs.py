"""Proofs that a key range of the target still holds exactly a slice of source rows, so that a re-run with nothing
changed neither fetches nor compares the rows again.

A proof is recorded when a slice lands by COPY into an empty range or is found equal value for value: the digest
of the slice's rows and the versions of the range's rows (xmin, with how many rows carry each); it is used only
once the range is found to hold exactly those versions. Row versions only
come and go with writes: any insert, update or delete in the range since, committed by anyone, changes them (a
new version carries the xid of a transaction that was not committed when the proof was taken, so it cannot be
among the proof's). The recording chunk's own later slices write only keys they hold themselves: a key repeated
across a slice boundary, which ends as the later slice's row, as the upsert would leave it. A re-run whose slice
has the same digest, over a range with the same row versions, is then known to hold the same rows. Anything else
(a new digest, a row changed, a range rewritten by VACUUM FULL or a restore, or frozen in a way that shows in
xmin) only costs the full comparison.

Row versions are 32-bit transaction ids of one cluster: a proof is trusted only on the server whose system
identifier it was recorded on, and only while fewer than MAX_XID_AGE transactions have passed since (64-bit ids:
pg_snapshot_xmax), so a ledger moved to another cluster (dump and restore, logical replication) or an id space that
wrapped around cannot match by chance. A role that may not read the system identifier records and uses no proof.
"""

from __future__ import annotations

import hashlib
import io
import weakref
from collections import Counter
from dataclasses import dataclass
from typing import Any

import psycopg
import pyarrow as pa
from psycopg import sql
from psycopg.types.json import Jsonb

from bq_backfill.models import Model
from bq_backfill.target_rows import RANGES_PER_STATEMENT, VERSION_COLUMN, KeyRange, in_range

PROOF_FORMAT = b"bq-backfill-2"
# A proof's row versions are xids of 32 bits: one older than this many transactions may name another row version.
MAX_XID_AGE = 2_000_000_000
_EPOCHS: weakref.WeakKeyDictionary[psycopg.Connection, dict[str, int] | None] = weakref.WeakKeyDictionary()


def epoch(conn: psycopg.Connection) -> dict[str, int] | None:
    """Where and when proofs are taken on this connection: {"system": the server's system identifier, "xid": the
    next 64-bit transaction id when first asked}, or None where the role may not call pg_control_system() (then no
    proof is recorded or used). Asked once per connection: a connection lives for one task, far less than the
    MAX_XID_AGE transactions that matter."""
    if conn not in _EPOCHS:
        allowed = conn.execute("SELECT has_function_privilege('pg_control_system()', 'EXECUTE')").fetchone()
        taken = None
        if allowed and allowed[0]:
            row = conn.execute(
                "SELECT system_identifier, pg_snapshot_xmax(pg_current_snapshot())::text::bigint "
                "FROM pg_control_system()"
            ).fetchone()
            taken = {"system": int(row[0]), "xid": int(row[1])} if row else None
        _EPOCHS[conn] = taken
    return _EPOCHS[conn]


def trusted(conn: psycopg.Connection, recorded: dict[str, Any] | None) -> bool:
    """Whether a proof recorded at `recorded` (an epoch) may be used here and now."""
    now = epoch(conn)
    if not recorded or now is None or recorded.get("system") != now["system"] or recorded.get("xid") is None:
        return False
    return 0 <= now["xid"] - int(recorded["xid"]) < MAX_XID_AGE


@dataclass(frozen=True)
class ProofKey:
    """What identifies a slice's proof: its tenant and model, and the digest of its rows; job_id records who used
    it last."""

    tenant_id: str
    model_type: str
    digest: bytes
    job_id: str


def digest(model: Model, rows: pa.Table) -> bytes:
    """A digest of the rows' model columns, in their order: Arrow IPC of one record batch (the same bytes for the
    same values and types, however the rows were batched), hashed with BLAKE2b."""
    table = rows.select(list(model.column_names)).combine_chunks()
    # A slice of a larger batch can carry its parent's buffers, which Arrow's IPC writer sends as they are: each
    # column copied into buffers of its own first, so the same values make the same bytes however they were cut.
    table = pa.Table.from_arrays(
        [pa.concat_arrays(column.chunks) if column.num_chunks else column for column in table.columns],
        schema=table.schema,
    )
    # personalised by proof format: proofs recorded before COPYs were refused on tables with insert triggers could
    # describe rows a trigger changed, and never match again
    hasher = hashlib.blake2b(digest_size=32, person=PROOF_FORMAT)
    # the IPC stream goes straight into the hash: no second copy of the slice in memory
    with pa.ipc.new_stream(pa.PythonFile(_HashWriter(hasher), mode="w"), table.schema) as writer:
        writer.write_table(table, max_chunksize=max(table.num_rows, 1))
    return hasher.digest()


class _HashWriter(io.RawIOBase):
    def __init__(self, hasher: Any) -> None:
        self.hasher = hasher

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.hasher.update(data)
        return len(data)


def versions_of(fetched: pa.Table) -> dict[str, int]:
    """Row versions (xmin text -> rows) of rows fetched with rows_in_range(versions=True)."""
    return dict(Counter(fetched[VERSION_COLUMN].to_pylist()))


def versions_in_range(conn: psycopg.Connection, model: Model, tenant_id: str, keys: KeyRange | None) -> dict[str, int]:
    """The row versions of the tenant's target rows with first <= key <= last, or of all its rows for None (one
    aggregate; no row leaves)."""
    where, params = in_range(model, keys) if keys else (sql.SQL("true"), [])
    # grouped by xmin itself, made text once per group: 40% faster than grouping the text (measured, 1M rows)
    query = sql.SQL("SELECT xmin::text, count(*) FROM {target} WHERE {tenant} = %s AND {where} GROUP BY xmin").format(
        target=sql.Identifier(model.target_table), tenant=sql.Identifier(model.tenant_column), where=where
    )
    return {version: int(n) for version, n in conn.execute(query, [tenant_id, *params]).fetchall()}


def versions_in_ranges(
    conn: psycopg.Connection, model: Model, ranges: list[tuple[str, KeyRange]]
) -> list[dict[str, int]]:
    """versions_in_range of each (tenant, key range), RANGES_PER_STATEMENT ranges a statement."""
    found: list[dict[str, int]] = [{} for _ in ranges]
    for at in range(0, len(ranges), RANGES_PER_STATEMENT):
        branches, params = [], []
        for i, (tenant_id, keys) in enumerate(ranges[at : at + RANGES_PER_STATEMENT], start=at):
            where, bound = in_range(model, keys)
            branches.append(
                sql.SQL(
                    "(SELECT {i}, xmin::text, count(*) FROM {target} WHERE {tenant} = %s AND {where} GROUP BY xmin)"
                ).format(
                    i=sql.Literal(i),
                    target=sql.Identifier(model.target_table),
                    tenant=sql.Identifier(model.tenant_column),
                    where=where,
                )
            )
            params += [tenant_id, *bound]
        for i, version, n in conn.execute(sql.SQL(" UNION ALL ").join(branches), params).fetchall():
            found[int(i)][version] = int(n)
    return found


def holds(
    conn: psycopg.Connection, model: Model, slices: list[tuple[ProofKey, KeyRange, int]]
) -> list[dict[str, int] | None]:
    """For each slice (proof key, key range, rows): the row versions its digest's proof recorded, if there is one
    and the range still holds exactly them; else None. One lookup and one aggregate per RANGES_PER_STATEMENT."""
    held: list[dict[str, int] | None] = [None] * len(slices)
    for at in range(0, len(slices), RANGES_PER_STATEMENT):
        batch = slices[at : at + RANGES_PER_STATEMENT]
        found = {
            (str(tenant), bytes(digest)): (rows, versions, {"system": system, "xid": xid})
            for tenant, digest, rows, versions, system, xid in conn.execute(
                "SELECT p.tenant_id, p.digest, p.row_count, p.row_versions, p.system_identifier, p.recorded_xid "
                "FROM backfill_range_proofs p JOIN unnest(%s::uuid[], %s::bytea[]) AS k (tenant_id, digest) "
                "ON p.tenant_id = k.tenant_id AND p.digest = k.digest WHERE p.model_type = %s",
                [[k.tenant_id for k, _, _ in batch], [k.digest for k, _, _ in batch], batch[0][0].model_type],
            ).fetchall()
        }  # fmt: skip
        candidates = []
        for i, (key, keys, rows) in enumerate(batch, start=at):
            proof = found.get((key.tenant_id.lower(), key.digest))
            if proof is not None and proof[0] == rows and trusted(conn, proof[2]):
                candidates.append((i, proof[1], key.tenant_id, keys))
        now = versions_in_ranges(conn, model, [(tenant, keys) for _, _, tenant, keys in candidates])
        for (i, recorded, _, _), versions in zip(candidates, now, strict=True):
            held[i] = recorded if versions == recorded else None
    return held


def record(conn: psycopg.Connection, proofs: list[tuple[ProofKey, int, dict[str, int]]]) -> list[bool]:
    """Records, for each (proof key, rows, versions), that the slice's range holds exactly its rows as these
    versions, when the caller has just seen so (the same rows, compared in the statement that read these versions);
    not if it holds more. In one pipelined batch."""
    taken = epoch(conn)
    kept = [taken is not None and sum(versions.values()) == rows for _, rows, versions in proofs]
    if taken is None or not any(kept):
        return kept
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO backfill_range_proofs (tenant_id, model_type, digest, row_count, row_versions, job_id, "
            "system_identifier, recorded_xid) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (tenant_id, model_type, digest) DO UPDATE SET row_count = EXCLUDED.row_count, "
            "row_versions = EXCLUDED.row_versions, job_id = EXCLUDED.job_id, recorded_at = now(), "
            "system_identifier = EXCLUDED.system_identifier, recorded_xid = EXCLUDED.recorded_xid",
            [(key.tenant_id, key.model_type, key.digest, rows, Jsonb(versions), key.job_id, taken["system"],
              taken["xid"]) for (key, rows, versions), keep in zip(proofs, kept, strict=True) if keep],
        )  # fmt: skip
    return kept


def record_copied(
    conn: psycopg.Connection, model: Model, slices: list[tuple[ProofKey | None, pa.Table]]
) -> list[dict[str, int] | None]:
    """Records a proof for each slice (proof key, rows) just written by one COPY, which wrote every row, into empty
    key ranges: each range holds its slice's rows, all of the COPY's one row version (read back by the first row's
    key); returns each slice's versions (None without a proof key).

    Not checked against the ranges here: a proof is only ever used after its range is found to hold exactly its
    versions (holds, chunk_proofs.still_holds). That check also sees another session's row landing in a range
    since, or a collation that puts some of the COPY's rows outside the range as Postgres reads it, and such a proof
    is then never used; checking now as well would read every row written a second time."""
    proven = [(key, rows) for key, rows in slices if key is not None and rows.num_rows]
    if not proven:
        return [None] * len(slices)
    key_cols = model.conflict_key[1:]
    first_key, first_rows = proven[0]
    first = first_rows.slice(0, 1).to_pylist()[0]
    match = sql.SQL(" AND ").join(sql.SQL("{} = %s").format(sql.Identifier(c)) for c in key_cols)
    own = conn.execute(
        sql.SQL("SELECT xmin::text FROM {target} WHERE {tenant} = %s AND {match}").format(
            target=sql.Identifier(model.target_table), tenant=sql.Identifier(model.tenant_column), match=match
        ),
        [first_key.tenant_id, *(first[c] for c in key_cols)],
    ).fetchone()
    if own is None:
        return [None] * len(slices)
    kept = iter(record(conn, [(key, rows.num_rows, {own[0]: rows.num_rows}) for key, rows in proven]))
    return [
        ({own[0]: rows.num_rows} if next(kept) else None) if key is not None and rows.num_rows else None
        for key, rows in slices
    ]


def keep_only(conn: psycopg.Connection, model_type: str, jobs: list[tuple[str, str]]) -> int:
    """For each (tenant, completed job): drops the tenant+model's proofs that the job did not record or use: they
    describe ranges as earlier runs left them. Returns how many were dropped."""
    cur = conn.execute(
        "DELETE FROM backfill_range_proofs p USING unnest(%s::uuid[], %s::uuid[]) AS k (tenant_id, job_id) "
        "WHERE p.tenant_id = k.tenant_id AND p.model_type = %s AND p.job_id <> k.job_id",
        [[t for t, _ in jobs], [j for _, j in jobs], model_type],
    )
    return cur.rowcount

"""Chunk key proofs: what lets finalize check a chunk's keys with one aggregate instead of reading them back.

A chunk whose every slice ended with its key range holding exactly the slice's rows (one COPY into an empty range,
or a range proof recorded or used: see range_proofs) has seen, in its own transaction, every key it read in the
target. It records its whole key range (first and last key) and the row versions of its slices' ranges. finalize
asks Postgres for the row versions of that range: the same versions mean nothing in it was written or deleted
since, so every key of the chunk is still there, and the chunk has as many distinct keys as rows. Anything else (a
write since, rows of the tenant between the slices' ranges that no slice holds, a collation that orders the range
otherwise, a slice with rejected or duplicate rows) only costs the full key check.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from bq_backfill import range_proofs, target_rows
from bq_backfill.models import Model
from bq_backfill.target_rows import KeyRange


def key_text(values: list[Any]) -> str:
    """A key's values as JSON text (dates and times as their text): comparable whether read from Arrow or stored."""
    return json.dumps(values, default=str)


@dataclass
class ChunkKeys:
    """A chunk's slices as they land, in whatever order; proof() once all have."""

    slices: list[tuple[int, list, list, dict[str, int]]] = field(default_factory=list)
    complete: bool = True

    def add(self, lo: int, keys: KeyRange | None, rejected: int, versions: dict[str, int] | None) -> None:
        if keys is None or rejected or versions is None or keys.duplicates or not keys.in_order:
            self.complete = False
        else:
            self.slices.append((lo, keys.first, keys.last, versions))

    def proof(self) -> dict[str, Any] | None:
        """{first, last, versions} if every slice's range held exactly its rows and the ranges follow each other in
        offset order without overlapping; else None."""
        if not self.complete or not self.slices:
            return None
        ordered = sorted(self.slices, key=lambda s: s[0])
        if any(not tuple(a[2]) < tuple(b[1]) for a, b in itertools.pairwise(ordered)):
            return None
        versions: Counter[str] = Counter()
        for *_, held in ordered:
            versions.update(held)
        return {
            "first": json.loads(key_text(ordered[0][1])),
            "last": json.loads(key_text(ordered[-1][2])),
            "versions": dict(versions),
        }


def still_holds(conn: psycopg.Connection, model: Model, tenant_id: str, proof: dict[str, Any]) -> bool:
    """Whether the chunk's key range holds the same row versions as when the chunk proved it."""
    keys = KeyRange(proof["first"], proof["last"], False)
    return range_proofs.versions_in_range(conn, model, tenant_id, keys) == proof["versions"]


def tenants_hold_only(conn: psycopg.Connection, model: Model, proofs: dict[str, list[dict[str, Any]]]) -> set[str]:
    """The tenants whose target rows are exactly their proven chunks' rows: all of a tenant's rows carry its chunks'
    row versions, each on as many rows (one aggregate over all the tenants, whatever the key ranges and their
    collation). A version's rows can only be deleted or rewritten once it is committed, never added to; so the same
    counts mean every chunk's rows are still there, and no other row of the tenant is."""
    if not proofs:
        return set()
    expected: dict[str, Counter[str]] = {t: Counter() for t in proofs}
    for tenant_id, chunk_proofs in proofs.items():
        for proof in chunk_proofs:
            expected[tenant_id].update(proof["versions"])
    query = sql.SQL(
        "SELECT {tenant}::text, xmin::text, count(*) FROM {target} WHERE {of} GROUP BY {tenant}, xmin"
    ).format(
        tenant=sql.Identifier(model.tenant_column),
        target=sql.Identifier(model.target_table),
        of=target_rows.of_tenants(model),
    )
    found: dict[str, dict[str, int]] = {}
    asked = {t.lower(): t for t in proofs}
    for value, version, n in conn.execute(query, [list(proofs)]).fetchall():
        found.setdefault(asked.get(value.lower(), value), {})[version] = int(n)
    return {t for t in proofs if found.get(t, {}) == dict(expected[t])}

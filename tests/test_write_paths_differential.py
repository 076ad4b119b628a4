"""The write paths against the plain upsert: seeded random cases (hypothesis) of a slice and a target state, written
twice, with what another session does between the two writes, through `sink.land_rows` (whichever path it takes:
copy, proven, unchanged, upsert) and through the staged upsert alone, each from the same state. The target must end
equal, value for value, every tenant's rows; when nothing changed between the writes, the second one rewrites no
row. Then another session acts once more and finalize's key check gives its verdict, by the chunk key proof the
paths recorded (while it holds) and by reading the keys back: it must be the same. A failing case is printed with
the blob that replays it (`@reproduce_failure`).

`BACKFILL_DIFFERENTIAL_EXAMPLES` sets the number of cases (`make test`: 300; `make differential`: more)."""

from __future__ import annotations

import os
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pyarrow as pa
import pytest
from helpers import INVENTORY
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bq_backfill import chunk_proofs, range_proofs, sink, target_rows
from devtools.seed import ARROW_SCHEMA, OTHER_TENANT, SEED_TENANT, insert_target

MODEL = INVENTORY
EXAMPLES = int(os.environ.get("BACKFILL_DIFFERENTIAL_EXAMPLES", "300"))
COLUMNS = ", ".join(MODEL.column_names)
# a small universe of keys, so that slices, target rows and other tenants' rows meet
KEYS = [(date(2024, 1, 1 + d), f"BR-{b}", f"P{p}") for d in range(2) for b in range(2) for p in range(3)]
QUANTITIES = [Decimal("0"), Decimal("1.5"), Decimal("-2.25"), None]
TYPES = ["sale", "receipt", None]
STAMP = datetime(2025, 1, 1, tzinfo=UTC)
BETWEEN = ["nothing", "update", "delete", "insert", "vacuum full", "cluster"]


@st.composite
def rows_of(draw, tenant: str, keys: list[tuple]) -> list[dict]:
    return [
        {"tenant_id": tenant, "movement_date": d, "branch_id": b, "product_code": p,
         "quantity": draw(st.sampled_from(QUANTITIES)), "unit_cost": draw(st.sampled_from(QUANTITIES)),
         "movement_type": draw(st.sampled_from(TYPES)),
         "updated_at": STAMP + timedelta(microseconds=draw(st.integers(0, 2)))}
        for d, b, p in keys
    ]  # fmt: skip


@st.composite
def cases(draw) -> dict:
    slice_keys = sorted(draw(st.sets(st.sampled_from(KEYS), min_size=1, max_size=8)))
    rows = draw(rows_of(SEED_TENANT, slice_keys))
    if draw(st.booleans()) and len(rows) > 1:  # a key twice (the later offset wins, as DISTINCT ON has it)
        at = draw(st.integers(0, len(rows) - 2))
        rows.insert(at + 1, {**rows[at], "movement_type": "again"})
    # the target before the first write: per key of the slice absent, equal or one value off; extra keys of the
    # tenant (inside the slice's range or not); another tenant's rows on the same keys
    target = []
    for row in rows:
        state = draw(st.sampled_from(["absent", "equal", "differs"]))
        if state != "absent" and row not in target and not any(_key(t) == _key(row) for t in target):
            target.append(row if state == "equal" else {**row, "quantity": Decimal("99")})
    extra = draw(st.sets(st.sampled_from([k for k in KEYS if k not in slice_keys] or KEYS), max_size=3))
    target += [r for r in draw(rows_of(SEED_TENANT, sorted(extra))) if not any(_key(t) == _key(r) for t in target)]
    target += draw(rows_of(OTHER_TENANT, sorted(draw(st.sets(st.sampled_from(KEYS), max_size=4)))))
    between = draw(st.sampled_from(BETWEEN))
    return {"rows": rows, "target": target, "between": between, "pick": draw(st.integers(0, 100)),
            "trigger": draw(st.sampled_from([False, False, False, True])),
            "after": draw(st.sampled_from(["nothing", "update", "delete", "insert", "vacuum full"]))}  # fmt: skip


def _key(row: dict) -> tuple:
    return row["tenant_id"], row["movement_date"], row["branch_id"], row["product_code"]


def _slice(rows: list[dict]) -> pa.Table:
    table = pa.Table.from_pylist(rows, schema=ARROW_SCHEMA)
    return table.append_column(sink.OFFSET_COLUMN, pa.array(range(len(rows)), pa.int64()))


def _state(pg) -> list[tuple]:
    return pg.execute(f"SELECT {COLUMNS} FROM inventory_movements ORDER BY 1, 2, 3, 4").fetchall()  # noqa: S608


def _versions(pg) -> list[str]:
    return [r[0] for r in pg.execute("SELECT xmin::text FROM inventory_movements ORDER BY ctid").fetchall()]


def _another_session(pg, case: dict, what: str) -> None:
    """What another session does between the two writes (the same on both sides), or after the last one."""
    rows = case["rows"]
    row = rows[case["pick"] % len(rows)]
    if what == "update":
        pg.execute(
            "UPDATE inventory_movements SET movement_type = 'theirs' WHERE tenant_id = %s AND movement_date = %s "
            "AND branch_id = %s AND product_code = %s",
            list(_key(row)),
        )
    elif what == "delete":
        pg.execute(
            "DELETE FROM inventory_movements WHERE tenant_id = %s AND movement_date = %s AND branch_id = %s "
            "AND product_code = %s",
            list(_key(row)),
        )
    elif what == "insert":  # a new key inside the slice's key range
        pg.execute(
            "INSERT INTO inventory_movements (tenant_id, movement_date, branch_id, product_code, movement_type) "
            "VALUES (%s, %s, %s, %s, 'theirs') ON CONFLICT DO NOTHING",
            [SEED_TENANT, row["movement_date"], row["branch_id"], row["product_code"] + "-theirs"],
        )
    elif what == "vacuum full":
        pg.execute("VACUUM FULL inventory_movements")
    elif what == "cluster":
        pg.execute("CLUSTER inventory_movements USING inventory_movements_key")


def _reset(pg, case: dict) -> None:
    pg.execute("DELETE FROM inventory_movements")
    pg.execute("DELETE FROM backfill_range_proofs")
    if case["target"]:
        insert_target(pg, case["target"])


def _write(pg, case: dict, *, paths: bool) -> tuple[str, dict | None]:
    """The path taken, and the chunk key proof a chunk of this one slice would record (None: it records none)."""
    rows = _slice(case["rows"])
    triggers = ("noop_trigger",) if case["trigger"] else ()
    with pg.transaction():
        if paths:
            proof = range_proofs.ProofKey(SEED_TENANT, "inventory", range_proofs.digest(MODEL, rows), "0" * 32)
            keys = target_rows.key_range(MODEL, rows)
            landed = sink.land_rows(pg, MODEL, SEED_TENANT, rows, keys, proof=proof, triggers=triggers)
            chunk = chunk_proofs.ChunkKeys()
            chunk.add(0, keys, 0, landed.versions)
            return landed.path, chunk.proof()
        sink.stage_rows(pg, MODEL, rows)
        sink.upsert_staged(pg, MODEL, triggers)
        return "upsert", None


def _missing(pg, case: dict, key_proof: dict | None) -> int:
    """finalize's verdict on the slice's keys: by the chunk's key proof while it holds, else by reading them back."""
    if key_proof is not None and chunk_proofs.still_holds(pg, MODEL, SEED_TENANT, key_proof):
        return 0
    rows = _slice(case["rows"])
    with pg.transaction():  # as finalize's connection: its temp table lives for the transaction
        return sink.missing_keys(
            pg, MODEL, SEED_TENANT, "0" * 32, rows.select([*MODEL.conflict_key[1:], sink.OFFSET_COLUMN])
        )


@pytest.fixture
def differential_target(pg):
    pg.execute(
        "CREATE FUNCTION noop() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$; "
        "CREATE TRIGGER noop_trigger BEFORE INSERT OR UPDATE ON inventory_movements FOR EACH ROW "
        "WHEN (current_setting('backfill.test_trigger', true) = 'on') EXECUTE FUNCTION noop()"
    )
    return pg


@settings(max_examples=EXAMPLES, deadline=None, print_blob=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip
@given(case=cases())
def test_every_write_path_ends_where_the_plain_upsert_ends(differential_target, case):
    pg = differential_target
    pg.execute("SELECT set_config('backfill.test_trigger', %s, false)", ["on" if case["trigger"] else "off"])
    ends, taken, verdicts = [], [], []
    for paths in (True, False):
        _reset(pg, case)
        taken.append(_write(pg, case, paths=paths)[0])
        first, versions = _state(pg), _versions(pg)
        _another_session(pg, case, case["between"])
        moved = _versions(pg)
        path, key_proof = _write(pg, case, paths=paths)
        taken.append(path)
        ends.append(_state(pg))
        if paths and case["between"] == "nothing":
            assert _versions(pg) == versions, f"a second write with nothing changed rewrote rows ({taken})"
        if paths and case["between"] in ("vacuum full", "cluster"):
            assert _state(pg) == first and _versions(pg) == moved, f"a rewritten table's rows were written ({taken})"
        # then another session again, before finalize checks the chunk's keys
        _another_session(pg, case, case["after"])
        verdicts.append(_missing(pg, case, key_proof))
    assert ends[0] == ends[1], f"paths {taken[:2]} ended elsewhere than the upsert"
    assert verdicts[0] == verdicts[1], f"finalize's key check differs with the chunk key proof ({taken}): {verdicts}"
    deleted = _key(case["rows"][case["pick"] % len(case["rows"])]) if case["after"] == "delete" else None
    assert verdicts[0] == sum(_key(row) == deleted for row in case["rows"])  # source rows whose key is gone

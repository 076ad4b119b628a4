"""load_chunk: one chunk of the snapshot, read a slice at a time and written in one Postgres transaction."""

from __future__ import annotations

import bisect
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pyarrow as pa

from bq_backfill import chunk_proofs, ledger, process_memory, range_proofs, sink, slicing, target_checks, target_rows
from bq_backfill.connections import bigquery, postgres
from bq_backfill.errors import PartsFailedError, PermanentChunkError, SourceReadError
from bq_backfill.models import Model
from bq_backfill.settings import Settings
from bq_backfill.source import BigQuerySource
from bq_backfill.validate import Rejected, split_invalid

log = logging.getLogger(__name__)


def slice_rows() -> int:
    """Rows read and written at a time inside a chunk (BACKFILL_SLICE_ROWS, default 20,000): bounds a chunk task's
    memory whatever chunk_size is."""
    value = int(os.environ.get("BACKFILL_SLICE_ROWS", "20000"))
    if value < 1:
        raise ValueError(f"BACKFILL_SLICE_ROWS must be a positive number of rows, not {value}")
    return value


def read_streams() -> int:
    """Streams of a chunk's read session, read side by side (BACKFILL_READ_STREAMS, default 1; BigQuery gives fewer
    for a small table). One stream already keeps the reader ahead of the writer (3 measured no faster on the
    emulator); more help where BigQuery's throughput per stream, not Postgres, is the limit."""
    value = int(os.environ.get("BACKFILL_READ_STREAMS", "1"))
    if value < 1:
        raise ValueError(f"BACKFILL_READ_STREAMS must be a positive number of streams, not {value}")
    return value


# Slices validated and digested at once, each by a thread of its own, while the writer writes an earlier one (3
# measured faster than 1 or 2 when nothing needs writing; each slice in flight holds its rows in memory).
READERS = 3


@dataclass
class Part:
    """One tenant's rows in a chunk: its job's chunk row, counted and proved on its own."""

    job_id: str
    tenant_id: str
    start: int
    end: int
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTS, 0))
    paths: list[str] = field(default_factory=list)
    key_proof: chunk_proofs.ChunkKeys = field(default_factory=chunk_proofs.ChunkKeys)
    read_seconds: float = 0.0
    write_seconds: float = 0.0


COUNTS = ("read", "inserted", "updated", "unchanged", "duplicate", "rejected", "rounded")


class PartFailedError(Exception):
    """Tenants' parts of a chunk cannot land (a trigger changed their rows, Postgres refused one, a newer run
    completed): the chunk's transaction is undone and the chunk tried again without those parts."""

    def __init__(self, failures: dict[str, tuple[Part, str]]) -> None:
        super().__init__("; ".join(why for _, why in failures.values()))
        self.failures = failures  # job id -> (part, why)

    @classmethod
    def one(cls, part: Part, message: str) -> PartFailedError:
        return cls({part.job_id: (part, message)})


def load_chunk(s: Settings, run: ledger.RunKey, chunk: dict[str, Any]) -> dict[str, int]:
    """Lands the chunk's parts (one per tenant) in one transaction; a part that cannot land fails its own job (named,
    recorded on its chunk row) and the others are landed without it; then the task fails naming those tenants, so
    clearing it tries only them again (the landed parts are done)."""
    model = Model.from_record(s.declaration, chunk["columns"])  # as cleanup resolved it; checked by write_guards
    index, start, end = chunk["chunk_index"], chunk["start"], chunk["end"]
    tenants = {p["job_id"]: p["tenant_id"] for p in chunk["parts"]}
    label = f"chunk #{index} of {chunk['chunks']} [{start}, {end})"
    if len(tenants) > 1:
        label += f" ({len(tenants)} tenants)"
    refused: dict[str, str] = {}
    counts: dict[str, int] = {}
    while len(refused) < len(tenants):
        # a fresh count for each attempt: a refused part undoes the whole transaction
        todo = [Part(p["job_id"], p["tenant_id"], p["start"], p["end"]) for p in chunk["parts"]
                if p["job_id"] not in refused]  # fmt: skip
        try:
            counts = _land_chunk(s, model, chunk, todo, label)
            break
        except PartFailedError as exc:
            with postgres(s.postgres_conn_id) as conn:  # on its own: the other parts are landed again without them
                for job_id, (part, why) in exc.failures.items():
                    refused[job_id] = why
                    log.error("%s: tenant %s fails (its job): %s", label, part.tenant_id, why)
                    ledger.fail_job(conn, run, f"{label}: {why}", index, job_id=job_id)
    if refused and len(tenants) == 1:
        raise PermanentChunkError(f"{label}: {next(iter(refused.values()))}")
    if refused:
        raise PartsFailedError(
            f"{label}: {len(refused)} of {len(tenants)} tenants' rows did not land (each its job's error)"
            + (", the others did" if len(refused) < len(tenants) else "")
            + ": "
            + "; ".join(f"tenant {tenants[j]}: {why}" for j, why in list(refused.items())[:10])
        )
    return counts


def _land_chunk(s: Settings, model: Model, chunk: dict[str, Any], parts: list[Part], label: str) -> dict[str, int]:
    index = chunk["chunk_index"]
    process_memory.release_freed_buffers()  # peak memory follows what is in flight, not what passed through
    bq = bigquery(s.gcp_conn_id)
    # A chunk is one transaction, read with one Storage Read session and written a slice at a time: memory holds a
    # few slices, never the chunk, and the next slices are read, validated and digested while this one is written.
    # A slice holds consecutive offsets, whichever parts (tenants) they belong to: small tenants share slices.
    step = slice_rows()
    ranges = [(p.start, p.end) for p in parts]
    span = (ranges[0][0], ranges[-1][1])
    # between the pending parts: parts done (a plan cleared lists only the others), parts refused, unused offsets
    skipped = [(a[1], b[0]) for a, b in itertools.pairwise(ranges) if a[1] < b[0]]
    t0 = time.monotonic()
    current: Part | None = None
    try:
        with ExitStack() as stack:
            # Reading starts before Postgres is reached (plan passes the snapshot's name): the read session's
            # round trips overlap the connection, the chunk's locks and the checks below.
            planned = chunk.get("snapshot")
            reader = SliceReader(bq, s, model, planned, label, span, ranges, skipped, step) if planned else None
            if reader:
                stack.enter_context(reader)
            conn = stack.enter_context(postgres(s.postgres_conn_id))
            # shows in pg_stat_activity which chunk (and which worker process) a session belongs to
            # A chunk's reads are index range scans of a few thousand rows, each in a statement of its own: a
            # parallel plan (which a statement over several tenants' ranges gets) only adds its workers' start.
            conn.execute(
                "SELECT set_config('application_name', %s, true), set_config('max_parallel_workers_per_gather', '0', "
                "true)",
                [f"bigquery_backfill chunk {index} pid {os.getpid()}"],
            )
            triggers = target_checks.write_guards(conn, model, ledger.LEDGER_TABLES)
            if triggers:
                log.info(
                    "%s: trigger(s) %s fire on writes to %s: every slice is upserted and its result checked",
                    label,
                    ", ".join(triggers),
                    model.target_table,
                )
            snapshot = None
            pending: dict[int, Part] = {}
            # the parts' chunk rows stay locked until this transaction ends: another attempt waits, then sees them
            # done
            locked = ledger.lock_chunks(conn, [p.job_id for p in parts], index)
            jobs = ledger.find_jobs_by_id(conn, [p.job_id for p in parts if locked.get(p.job_id) not in ("done", None)])
            declaration = s.declaration
            if any(ledger.run_model(declaration, job) != model for job in jobs.values()):
                raise PermanentChunkError(
                    f"{label}: the job's model columns changed since plan_chunks listed this chunk: clear the run "
                    "from plan_chunks"
                )
            # older data never over newer
            refusals = ledger.old_snapshot_refusals(conn, list(jobs.values()), s.model_type, s.max_snapshot_age_hours)
            if refusals and len(parts) == 1:
                raise next(iter(refusals.values()))
            if refusals:  # each fails its own job; the others go on
                raise PartFailedError({p.job_id: (p, str(refusals[p.job_id])) for p in parts if p.job_id in refusals})
            for part in parts:
                if locked.get(part.job_id) == "done":
                    continue
                job = jobs.get(part.job_id)
                if job is None:  # its job was deleted since (a later run's cleanup): nothing of it to write
                    log.warning("%s: tenant %s's job %s is gone: its part skipped", label, part.tenant_id, part.job_id)
                    continue
                assert job.snapshot_table is not None
                snapshot = job.snapshot_table
                pending[part.start] = part
            if not pending:
                log.info("%s already done: skipped, nothing written (the read started ahead is stopped)", label)
                return {"read": 0, "skipped": 1}
            if reader is None or reader.snapshot != snapshot:  # the jobs' snapshot is the one to read
                assert snapshot is not None
                reader = stack.enter_context(SliceReader(bq, s, model, snapshot, label, span, ranges, skipped, step))
            starts = sorted(pending)
            for pieces in _timed(reader, pending, starts):
                written = time.monotonic()
                try:
                    _land_slice(s, conn, model, index, pieces, triggers)
                except _PieceFailedError as exc:
                    current = exc.part
                    raise exc.cause from None
                _charge(pieces, time.monotonic() - written, "write_seconds")
            done = []
            for part in pending.values():
                timing = {"read_seconds": part.read_seconds, "write_seconds": part.write_seconds}
                proven = part.key_proof.proof()
                taken = range_proofs.epoch(conn) if proven else None
                done.append(
                    ledger.ChunkDone(
                        part.job_id,
                        {**part.counts, **timing},
                        _paths(part.paths),
                        {**proven, "epoch": taken} if proven and taken else None,
                    )
                )
            states = ledger.complete_chunks(conn, index, done)
    except psycopg.OperationalError:
        raise  # connection-level: a retry can succeed
    except (sink.TargetRowsDifferError, target_checks.TargetRefusedError) as exc:
        if current is not None:
            raise PartFailedError.one(current, str(exc)) from exc
        raise PermanentChunkError(f"{label}: {exc}") from exc
    except psycopg.DatabaseError as exc:
        if current is not None:
            raise PartFailedError.one(current, f"Postgres refused its rows: {exc}".strip()) from exc
        raise PermanentChunkError(f"{label}: Postgres refused the chunk: {exc}".strip()) from exc
    done = list(pending.values())
    counts = {k: sum(p.counts[k] for p in done) for k in COUNTS}
    t2 = time.monotonic()
    paths = _paths([x for p in done for x in p.paths])
    log.info(
        "%s: read %d · inserted %d · updated %d · unchanged %d · duplicate %d · rejected %d · rounded %d · "
        "written by %s · %.0f rows/s (waited for BigQuery %.2f s, wrote %.2f s)%s",
        label,
        counts["read"],
        counts["inserted"],
        counts["updated"],
        counts["unchanged"],
        counts["duplicate"],
        counts["rejected"],
        counts["rounded"],
        paths,
        counts["read"] / max(t2 - t0, 1e-9),
        sum(p.read_seconds for p in done),
        sum(p.write_seconds for p in done),
        f" · job {states[0]['processed_records']}/{states[0]['total_records']} rows" if len(states) == 1 else
        f" · {len(done)} tenants' parts done",
    )  # fmt: skip
    return counts


def _timed(reader: SliceReader, pending: dict[int, Part], starts: list[int]) -> Iterator[list[tuple[Part, Piece]]]:
    """The reader's slices, each as its pieces of pending parts with their part; the time spent waiting charged to
    those parts."""
    slices = iter(reader)
    while True:
        waited = time.monotonic()
        pieces = next(slices, None)
        if pieces is None:
            return
        mine = []
        for piece in pieces:
            part = pending.get(starts[bisect.bisect_right(starts, piece.lo) - 1]) if starts else None
            if part is not None and part.start <= piece.lo < part.end:
                mine.append((part, piece))  # others: parts done by an earlier attempt, read along, not written
        if mine:
            _charge(mine, time.monotonic() - waited, "read_seconds")
            yield mine


# The write paths, cheapest first: a chunk whose slices differ records them in this order, whatever order they landed
PATHS = ("copy", "proven", "unchanged", "upsert")


def _paths(taken: list[str]) -> str:
    """The paths a chunk's slices took, e.g. "copy" or "copy+upsert": the same for the same slices whichever order
    BigQuery sent their rows in."""
    return "+".join(p for p in PATHS if p in taken)


def _charge(pieces: list[tuple[Part, Piece]], seconds: float, what: str) -> None:
    """Shares a slice's seconds among its parts by rows."""
    rows = sum(piece.read for _, piece in pieces) or 1
    for part, piece in pieces:
        setattr(part, what, getattr(part, what) + seconds * piece.read / rows)


class _PieceFailedError(Exception):
    def __init__(self, part: Part, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.part, self.cause = part, cause


def _land_slice(
    s: Settings, conn: psycopg.Connection, model: Model, index: int, pieces: list[tuple[Part, Piece]], triggers: tuple
) -> None:
    """One slice's pieces (one per part, i.e. tenant), quarantined and landed together; a piece that cannot land
    raises _PieceFailedError naming its part."""
    rejected = []
    for part, piece in pieces:
        try:
            rejected.append(sink.quarantine(conn, part.job_id, index, piece.rejected))
        except psycopg.OperationalError:
            raise
        except psycopg.DatabaseError as exc:
            raise _PieceFailedError(part, exc) from exc
    batch = [
        sink.TenantRows(
            part.tenant_id,
            piece.good,
            piece.keys,
            range_proofs.ProofKey(part.tenant_id, s.model_type, piece.digest, part.job_id) if piece.digest else None,
        )
        for part, piece in pieces
    ]
    try:
        landed = sink.land_slices(conn, model, batch, triggers)
    except sink.SliceFailedError as exc:
        assert exc.__cause__ is not None
        raise _PieceFailedError(pieces[exc.index][0], exc.__cause__) from exc.__cause__
    for (part, piece), quarantined, result in zip(pieces, rejected, landed, strict=True):
        _tally(part.counts, piece, quarantined, result, part.paths)
        part.key_proof.add(piece.lo, piece.keys, quarantined, result.versions)


@dataclass(frozen=True)
class Piece:
    """One part's rows of a slice, as a reader thread leaves them: validated, with key range, digest and distinct
    keys."""

    lo: int  # its first offset
    read: int
    good: pa.Table
    rejected: Rejected
    rounded: int
    keys: target_rows.KeyRange | None
    digest: bytes | None
    distinct: int  # distinct keys among the good rows, counted here (the write path counts what it wrote)


class SliceReader:
    """The chunk's slices, each as its pieces (one per part it holds), validated, with key range and digest, in the
    order their rows arrive. Reading starts at once: a thread reads the chunk's one read session and cuts it into
    slices; READERS threads prepare them; at most READERS slices wait for the writer, so a slow Postgres holds the
    reader back instead of filling memory."""

    def __init__(
        self,
        bq: BigQuerySource,
        s: Settings,
        model: Model,
        snapshot: str,
        label: str,
        span: tuple[int, int],
        ranges: slicing.Ranges,
        skipped: slicing.Ranges,
        step: int,
    ) -> None:
        self.snapshot, self._label, self._s, self._model = snapshot, label, s, model
        self._range = (span[0], span[1], step)
        self._ranges, self._skipped = ranges, skipped
        self._bq = bq
        self._done = object()
        self._ready: queue.Queue[Any] = queue.Queue(maxsize=READERS)
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(READERS, thread_name_prefix="slice")
        threading.Thread(target=self._read, name="bq-read", daemon=True).start()

    def _put(self, item: Any) -> None:
        while not self._stop.is_set():
            try:
                self._ready.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def _read(self) -> None:
        start, end, step = self._range
        try:
            columns = [*self._model.column_names, sink.OFFSET_COLUMN]
            batches = self._bq.read_chunk(self._bq.table(self.snapshot), start, end, columns, read_streams())
            runs = slicing.merged(self._ranges)  # a slice spans parts that follow each other
            cut = slicing.complete_slices(batches, start, end, step, sink.OFFSET_COLUMN, runs, self._skipped)
            starts = [lo for lo, _ in self._ranges]
            for rows in cut:
                if self._stop.is_set():
                    return
                self._put(self._pool.submit(_prepare_slice, self._s, self._model, rows, starts))
            self._put(self._done)
        except Exception as exc:  # raised in the writer's thread, with this one as its cause
            self._put(exc)

    def __iter__(self) -> Iterator[list[Piece]]:
        start, end, _ = self._range
        while (item := self._ready.get()) is not self._done:
            if isinstance(item, Exception):
                raise SourceReadError(
                    f"{self._label}: BigQuery read of {self.snapshot} rows [{start}, {end}) through connection "
                    f"{self._s.gcp_conn_id!r} failed: {item}"
                ) from item
            yield item.result()

    def close(self) -> None:
        self._stop.set()  # the reader stops at its next slice; it is not waited for
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> SliceReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _prepare_slice(s: Settings, model: Model, rows: slicing.RowSlice, starts: list[int]) -> list[Piece]:
    """A slice of a chunk cut at its parts' first offsets (`starts`), each piece prepared: done by a reader thread."""
    cuts = [rows.lo, *(at for at in starts if rows.lo < at < rows.hi), rows.hi]
    return [
        _prepare(s, model, lo, rows.rows.slice(lo - rows.lo, hi - lo)) for lo, hi in itertools.pairwise(cuts)
    ]  # the rows are exactly the offsets lo..hi-1, in order


def _prepare(s: Settings, model: Model, lo: int, rows: pa.Table) -> Piece:
    """One part's rows of a slice, validated, with their key range and digest."""
    checked = split_invalid(model, rows, sink.OFFSET_COLUMN, s.numeric_rounding)
    good = checked.good
    read = rows.num_rows
    if not good.num_rows:
        return Piece(lo, read, good, checked.rejected, checked.rounded, None, None, 0)
    keys = target_rows.key_range(model, good)
    distinct = good.num_rows
    if keys.duplicates:
        distinct = good.group_by(list(model.conflict_key[1:])).aggregate([]).num_rows
    digest = range_proofs.digest(model, good)
    return Piece(lo, read, good, checked.rejected, checked.rounded, keys, digest, distinct)


def _tally(counts: dict[str, int], piece: Piece, rejected: int, landed: sink.Landed, paths: list[str]) -> None:
    """Adds one slice's outcome to its chunk's counts. Each is counted where it happens (rows read by the reader,
    duplicate keys among the good rows by the reader, inserted / updated / unchanged by the write path, rejected by
    the quarantine), so read = inserted + updated + unchanged + duplicate + rejected is a check finalize can fail."""
    counts["read"] += piece.read
    counts["inserted"] += landed.inserted
    counts["updated"] += landed.updated
    counts["unchanged"] += landed.unchanged
    counts["duplicate"] += piece.good.num_rows - piece.distinct
    counts["rejected"] += rejected
    counts["rounded"] += piece.rounded
    paths.append(landed.path)

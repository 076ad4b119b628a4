"""Throughput benchmark: this DAG against the raw-COPY ceiling and the google provider's BigQueryToPostgresOperator,
on the same emulated BigQuery source and the same Postgres, in one run. Prints a table of medians and ratios,
writes bench/results/results.json and bench/results/chart.png. `make bench` (or: .venv/bin/python -m bench.run).

Timing is wall clock on a shared 2-core machine: quote medians, and ratios to the ceiling measured in the same round
(the ratio shown for the DAG is the median of its per-round ratios).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HOME = Path(tempfile.mkdtemp(prefix="bq_backfill_bench_"))
sys.path[:0] = [str(ROOT), str(ROOT / "plugins")]

from devtools import services  # noqa: E402

os.environ.update({**services.airflow_home_env(HOME), "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING"})

import psycopg  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.csv as pa_csv  # noqa: E402

from devtools.seed import (  # noqa: E402
    OTHER_TENANT,
    PROJECT,
    SEED_TENANT,
    append_source,
    bq_client,
    create_source,
    inventory_schema,
    inventory_table,
)

SOURCE_ROWS = 1_032_601
OUT = ROOT / "bench" / "results"
KEY = ("tenant_id", "movement_date", "branch_id", "product_code")


def say(msg: str) -> None:
    print(msg, flush=True)


def reset_target(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        from bq_backfill.setup import setup_database

        setup_database(conn, None, False, inventory_schema)  # the deployment's setup step


def ceiling(dsn: str, rows: pa.Table) -> float:
    """One raw COPY of all rows (CSV rendered beforehand) into the empty keyed table."""
    buf = io.BytesIO()
    pa_csv.write_csv(rows, buf, pa_csv.WriteOptions(include_header=False))
    data = buf.getvalue()
    reset_target(dsn)
    with psycopg.connect(dsn) as conn:
        t = time.perf_counter()
        with conn.cursor().copy(
            f"COPY inventory_movements ({', '.join(rows.column_names)}) FROM STDIN (FORMAT csv)"
        ) as copy:
            copy.write(data)
        conn.commit()
        return time.perf_counter() - t


class QueryCounter:
    """Counts BigQuery query jobs made in this process, and those that read the source table."""

    def __init__(self) -> None:
        from google.cloud import bigquery

        self.queries: list[str] = []
        original = bigquery.Client.query

        def counting(client, query, *args, **kwargs):
            self.queries.append(query)
            return original(client, query, *args, **kwargs)

        bigquery.Client.query = counting

    def take(self) -> dict:
        source_scans = sum("`analytics`.`inventory_movements`" in q for q in self.queries)
        out = {"queries": len(self.queries), "source_scans": source_scans}
        self.queries = []
        return out


def dag_run(dag, dsn: str, chunk_size: int | None = None) -> dict:
    """One whole DAG run through dag.test; chunk_size None: the DAG's default."""
    conf = {"tenant_id": SEED_TENANT} | ({"chunk_size": chunk_size} if chunk_size else {})
    t = time.perf_counter()
    dr = dag.test(run_conf=conf)
    wall = time.perf_counter() - t
    if dr.state != "success":
        raise RuntimeError(f"bench run failed: {dr.state}")
    tis = dr.get_task_instances()
    dur = {}
    for ti in tis:
        dur[ti.task_id] = dur.get(ti.task_id, 0.0) + (ti.duration or 0.0)
    with psycopg.connect(dsn) as conn:
        read_s, write_s = conn.execute(
            "SELECT sum(read_seconds), sum(write_seconds) FROM backfill_chunks c JOIN bigquery_backfill_jobs j "
            "ON j.id = c.job_id WHERE j.dag_run_id = %s",
            (dr.run_id,),
        ).fetchone()
    return {
        "wall_s": wall,
        "cleanup_s": dur.get("cleanup_stale_jobs", 0.0),
        "plan_snapshot_s": dur.get("plan_chunks", 0.0),
        "chunks_s": dur.get("load_chunk", 0.0),
        "chunk_read_s": float(read_s or 0),
        "chunk_write_s": float(write_s or 0),
        "finalize_s": dur.get("finalize", 0.0),
    }


def empty_target_ceiling(dsn: str, rows: pa.Table) -> float:
    """The raw COPY ceiling, then the target emptied again for a cold run."""
    took = ceiling(dsn, rows)
    reset_target(dsn)
    return took


def interleaved_rounds(
    repeat: int, ceiling_of: Callable[[], float], run: Callable[[], dict], label: str, after: Callable | None = None
) -> tuple[list[float], list[dict], list[dict]]:
    """`repeat` rounds of: the ceiling (ceiling_of() leaves the target as a cold run needs it), a cold run, a run with
    nothing changed, then after(). Ratios are taken within a round: runs minutes apart at most, however the machine's
    load drifts over the whole benchmark."""
    ceilings: list[float] = []
    cold: list[dict] = []
    noop: list[dict] = []
    for _ in range(repeat):
        ceilings.append(ceiling_of())
        cold.append(run())
        noop.append(run())
        if after:
            after()
        say(f"{label}: ceiling {ceilings[-1]:.2f} s, cold {cold[-1]['wall_s']:.2f} s, "
            f"nothing changed {noop[-1]['wall_s']:.2f} s")  # fmt: skip
    return ceilings, cold, noop


def peer(dsn: str, rest: str) -> dict:
    """The provider's BigQueryToPostgresOperator, replace=True on the conflict key, same source, same Postgres."""
    from airflow.providers.google.cloud.transfers.bigquery_to_postgres import BigQueryToPostgresOperator

    with psycopg.connect(dsn, autocommit=True) as conn:
        # It sends TIMESTAMP as microseconds since the epoch: a bigint column takes it (timestamptz refuses it).
        conn.execute(
            "DROP TABLE IF EXISTS inventory_movements_peer; CREATE TABLE inventory_movements_peer ("
            "tenant_id uuid, movement_date date, branch_id text, product_code text, quantity numeric(18,4), "
            "unit_cost numeric(18,4), movement_type text, updated_at bigint, "
            "UNIQUE (tenant_id, movement_date, branch_id, product_code))"
        )
    os.environ["BIGQUERY_EMULATOR_HOST"] = rest  # the only way to point this operator's client elsewhere
    op = BigQueryToPostgresOperator(
        task_id="peer",
        dataset_table="analytics.inventory_movements",
        target_table_name="inventory_movements_peer",
        postgres_conn_id="postgres_default",
        gcp_conn_id="google_cloud_default",
        replace=True,
        replace_index=list(KEY),
        selected_fields=["tenant_id", "movement_date", "branch_id", "product_code", "quantity", "unit_cost",
                         "movement_type", "updated_at"],
        batch_size=10_000,
    )  # fmt: skip
    t = time.perf_counter()
    try:
        op.execute(context={})
    finally:
        del os.environ["BIGQUERY_EMULATOR_HOST"]
    wall = time.perf_counter() - t
    with psycopg.connect(dsn) as conn:
        landed = conn.execute("SELECT count(*) FROM inventory_movements_peer").fetchone()[0]
    return {"wall_s": wall, "rows_landed": landed}


LATENCY_S = 0.25


def latency_rounds(dag, dsn: str, rows: pa.Table, emu: dict, repeat: int) -> dict:
    """Cold runs with every BigQuery request, and every read stream's response, delayed by LATENCY_S (loopback
    proxies in front of the emulator: a far-away API's round trip), each against a raw COPY measured just before."""
    from devtools.grpc_recorder import GrpcRecordingProxy
    from devtools.http_recorder import RecordingProxy

    rest, grpc = RecordingProxy(emu["rest"], delay=LATENCY_S), GrpcRecordingProxy(emu["storage"], delay=LATENCY_S)
    connection = json.loads(services.gcp_connection(PROJECT, emu))
    connection["extra"].update(bigquery_endpoint=rest.url, storage_read_endpoint=grpc.endpoint)
    plain = os.environ["AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT"]
    os.environ["AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT"] = json.dumps(connection)
    ceilings, runs, calls = [], [], []
    try:
        for _ in range(repeat):
            ceilings.append(ceiling(dsn, rows))
            reset_target(dsn)
            rest.requests.clear()
            grpc.calls.clear()
            runs.append(dag_run(dag, dsn))
            calls.append({"rest": len(rest.requests), "grpc": len(grpc.calls)})
            say(f"latency round: ceiling {ceilings[-1]:.2f} s, cold {runs[-1]['wall_s']:.2f} s, {calls[-1]}")
    finally:
        os.environ["AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT"] = plain
        rest.close()
        grpc.close()
    return {
        "delay_s": LATENCY_S,
        "ceiling_copy_s": statistics.median(ceilings),
        "cold_s": statistics.median(r["wall_s"] for r in runs),
        "ratio_cold": statistics.median(r["wall_s"] / c for r, c in zip(runs, ceilings, strict=True)),
        "requests": calls[-1],
        "rounds": [{"ceiling_s": c, "cold_s": r["wall_s"]} for c, r in zip(ceilings, runs, strict=True)],
    }


def chunk_rss(chunk_size: int) -> float:
    """Peak RSS (MB) of a process doing what one load_chunk task does, for one chunk of chunk_size rows,
    read from a snapshot of the whole tenant."""
    from bq_backfill import ledger, target_checks
    from bq_backfill.model_file import get_declaration
    from bq_backfill.models import resolve
    from bq_backfill.source import BigQuerySource, TableRef

    declaration = get_declaration("inventory")
    src = BigQuerySource.from_connection("google_cloud_default")
    source = src.table(declaration.source_table)
    snap = TableRef(src.project, "backfill_scratch", "bench_rss")
    reset_target(os.environ["BENCH_DSN"])
    with psycopg.connect(os.environ["BENCH_DSN"]) as conn:
        target = target_checks.target_columns(conn, declaration.target_table)
        model = resolve(declaration, target, src.source_schema(source)).model
    src.locate(source, snap.dataset)
    as_of = src.now()
    total = src.new_snapshot(model, source, {SEED_TENANT: 0}, snap, as_of, chunk_size)[SEED_TENANT]
    with psycopg.connect(os.environ["BENCH_DSN"]) as conn:
        claimed, _ = ledger.claim_jobs(conn, ledger.RunKey("bench", f"rss-{chunk_size}"), [SEED_TENANT], "inventory")
        job, _ = claimed[SEED_TENANT]
        ledger.record_models(conn, [job], model, [])
        target_snapshot = conn.execute("SELECT pg_current_snapshot()::text").fetchone()[0]
        [job] = ledger.record_plans(conn, [ledger.PlanRecord(
            job.id, total_records=total, chunk_size=chunk_size, source_table=model.source_table,
            snapshot_table=str(snap), snapshot_at=as_of, target_snapshot=target_snapshot,
        )])  # fmt: skip
        ledger.plan_chunks(conn, [job])
        conn.commit()
    code = (
        "import json, sys; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/plugins'];"
        "from bq_backfill.settings import Settings; from bq_backfill.tasks.chunk import load_chunk;"
        "s = Settings.from_params(json.loads(sys.argv[2])); chunk = json.loads(sys.argv[3]);"
        "from bq_backfill.ledger import RunKey; load_chunk(s, RunKey('bench', 'rss'), chunk);"
        # VmHWM, not ru_maxrss: the latter keeps the forking parent's size across exec
        "print(int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) / 1024)"
    )
    params = {"tenant_id": SEED_TENANT, "model_type": "inventory", "chunk_size": chunk_size, "dry_run": False,
              "max_rejected_rows": 0, "scratch_dataset": "backfill_scratch", "gcp_conn_id": "google_cloud_default",
              "postgres_conn_id": "postgres_default"}  # fmt: skip
    end = min(2 * chunk_size, total)  # the second chunk: the first pays imports and the session's setup
    part = {"job_id": job.id, "tenant_id": SEED_TENANT, "start": chunk_size, "end": end}
    chunk = {"chunk_index": 1, "start": chunk_size, "end": end, "chunks": 1, "parts": [part],
             "columns": model.as_record()}  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-c", code, str(ROOT), json.dumps(params), json.dumps(chunk)],
        capture_output=True, text=True,
    )  # fmt: skip
    if out.returncode:
        raise RuntimeError(f"the chunk of {chunk_size} rows failed:\n{out.stderr[-3000:]}")
    return float(out.stdout.strip().splitlines()[-1])


@contextmanager
def bench_services() -> Iterator[tuple[str, str, dict, Any]]:
    """Postgres and the emulator, the connections and Airflow's metadata set up, an empty `analytics` dataset;
    yields (admin DSN, bench DSN, emulator endpoints, a BigQuery client)."""
    with services.postgres_server() as admin, services.bigquery_emulator(PROJECT, HOME / "bqemulator.log") as emu:
        dsn = services.recreate_database(admin, "backfill_bench")
        os.environ["BENCH_DSN"] = dsn
        os.environ["AIRFLOW_CONN_POSTGRES_DEFAULT"] = services.airflow_conn_uri(dsn)
        os.environ["AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT"] = services.gcp_connection(PROJECT, emu)
        subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True)
        client = bq_client(emu["rest"])
        client.create_dataset("analytics", exists_ok=True)
        yield admin, dsn, emu, client


@contextmanager
def seeded_services(source_rows: int = SOURCE_ROWS) -> Iterator[tuple[str, str, dict, pa.Table]]:
    """bench_services, the source seeded (the tenant's rows + 200,000 of another); yields (admin DSN, bench DSN,
    emulator endpoints, the tenant's rows). The tenant's rows go to the emulator a million at a time (bounded memory
    there)."""
    with bench_services() as (admin, dsn, emu, client):
        rows = inventory_table(SEED_TENANT, source_rows)
        create_source(client, rows.slice(0, 1_000_000))
        for start in range(1_000_000, source_rows, 1_000_000):
            append_source(client, rows.slice(start, 1_000_000))
        append_source(client, inventory_table(OTHER_TENANT, 200_000, seed=3))
        yield admin, dsn, emu, rows


def load_dag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(ROOT / "dags")).get_dag("bigquery_backfill")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3, help="runs per measured configuration (median reported)")
    parser.add_argument("--no-peer", action="store_true", help="skip BigQueryToPostgresOperator (~1.5 min)")
    parser.add_argument("--latency-only", action="store_true", help="only the cold runs with BigQuery latency")
    parser.add_argument(
        "--rss-only", type=int, metavar="SOURCE_ROWS",
        help="only measure chunk-task peak RSS with this many source rows; merged into results.json",
    )  # fmt: skip
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.rss_only:
        return rss_only(args.rss_only)
    if args.latency_only:
        return latency_only(args.repeat)
    path = OUT / "results.json"
    # measurements not repeated in this run (--no-peer, --rss-only) keep their earlier figures
    results: dict = json.loads(path.read_text()) if path.exists() else {}
    results.update({"source_rows": SOURCE_ROWS, "repeat": args.repeat})
    with seeded_services() as (admin, dsn, emu, rows):
        say(f"source: {SOURCE_ROWS:,} rows for one tenant + 200,000 of another; Postgres {admin.split('@')[-1]}")
        dag = load_dag()
        counter = QueryCounter()
        reset_target(dsn)
        dag_run(dag, dsn)  # warm-up, not counted: the process's first run pays imports and connection setup
        # Each round measures the ceiling, then the DAG cold, then the DAG again with nothing changed: the ratios
        # compare runs minutes apart at most, however the machine's load drifts over the whole benchmark.
        ceilings, cold, noop = interleaved_rounds(
            args.repeat, lambda: empty_target_ceiling(dsn, rows), lambda: dag_run(dag, dsn), "round"
        )
        results["ceiling_copy_s"] = statistics.median(ceilings)
        results["ratio_cold"] = statistics.median(r["wall_s"] / c for r, c in zip(cold, ceilings, strict=True))
        results["ratio_noop"] = statistics.median(r["wall_s"] / c for r, c in zip(noop, ceilings, strict=True))
        results["rounds"] = [
            {"ceiling_s": c, "cold_s": a["wall_s"], "noop_s": b["wall_s"]}
            for c, a, b in zip(ceilings, cold, noop, strict=True)
        ]
        counter.take()
        reset_target(dsn)
        dag_run(dag, dsn)
        results["chunk_size"] = dag.params["chunk_size"]
        results["bigquery_per_backfill"] = counter.take()
        results["dag_cold"] = {k: statistics.median(r[k] for r in cold) for k in cold[0]}
        results["dag_noop"] = {k: statistics.median(r[k] for r in noop) for k in noop[0]}
        say(f"this DAG, cold:   {results['dag_cold']}")
        say(f"this DAG, re-run: {results['dag_noop']}")

        results["latency"] = latency_rounds(dag, dsn, rows, emu, args.repeat)
        say(f"with {LATENCY_S * 1000:.0f} ms per BigQuery request: {results['latency']}")

        sweep = {}
        for size in (10_000, 50_000, 200_000, 500_000, 1_000_000):
            reset_target(dsn)
            sweep[size] = dag_run(dag, dsn, size)["wall_s"]
            say(f"chunk_size {size:>7,}: {sweep[size]:.1f} s cold")
        results["chunk_size_sweep_cold_s"] = sweep

        rss = {str(size): chunk_rss(size) for size in (10_000, 50_000, 200_000, 500_000)}
        results.setdefault("chunk_task_peak_rss_mb_by_source_rows", {})[str(SOURCE_ROWS)] = rss
        say(f"chunk task peak RSS (MB) by chunk size: {rss}")

        if not args.no_peer:
            reset_target(dsn)
            results["peer"] = peer(dsn, emu["rest"])
            say(f"BigQueryToPostgresOperator: {results['peer']}")
        services.drop_database(admin, "backfill_bench")

    if "peer" in results:
        results["speedup_vs_peer"] = results["peer"]["wall_s"] / results["dag_cold"]["wall_s"]
    results["cost_model"], lines = cost_report(rows)
    say("\nWhat a backfill reads from BigQuery (cost model, bench/cost_model.py):\n" + "\n".join(lines))
    table = summary(results)
    say("\n| path | median s | × raw COPY | BigQuery |\n|---|---|---|---|")
    for name, secs, ratio, bq in table:
        say(f"| {name} | {secs:.1f} | {ratio:.2f}× | {bq} |")
    if "speedup_vs_peer" in results:
        say(f"\nthis DAG is {results['speedup_vs_peer']:.1f}× faster than BigQueryToPostgresOperator")
    (OUT / "results.json").write_text(json.dumps(results, indent=2, default=str))
    chart(table, results)
    say(f"\nwrote {OUT / 'results.json'} and {OUT / 'chart.png'}")
    return 0


def summary(results: dict) -> list[tuple[str, float, float, str]]:
    """(path, median seconds, ratio to the ceiling, BigQuery work) rows of the printed table and the chart."""
    c = results["ceiling_copy_s"]
    old_loop_queries = -(-SOURCE_ROWS // 500)
    ours = results["bigquery_per_backfill"]
    table = [
        ("raw COPY (ceiling)", c, 1.0, "-"),
        ("this DAG, cold", results["dag_cold"]["wall_s"], results["ratio_cold"],
         f"{ours['queries']} queries, {ours['source_scans']} source scan"),
        ("this DAG, nothing changed", results["dag_noop"]["wall_s"], results["ratio_noop"], "same"),
    ]  # fmt: skip
    if "latency" in results:
        lat = results["latency"]
        calls = f"{lat['requests']['rest']} REST requests, {lat['requests']['grpc']} gRPC calls"
        table.append((f"this DAG, cold, +{lat['delay_s'] * 1000:.0f} ms per BigQuery call", lat["cold_s"],
                      lat["ratio_cold"], calls))  # fmt: skip
    if "peer" in results:
        p = results["peer"]["wall_s"]
        table.append(("BigQueryToPostgresOperator", p, p / c, "tabledata.list of the whole table (every tenant)"))
    table.append(("old loop (estimate)", 30 * 60, 30 * 60 / c, f"{old_loop_queries:,} queries, each a full scan"))
    return table


def cost_report(rows: pa.Table) -> tuple[dict, list[str]]:
    from bench.cost_model import report
    from bq_backfill.model_file import get_declaration

    return report(rows.slice(0, 200_000), list(get_declaration("inventory").conflict_key[1:]))


def latency_only(repeat: int) -> int:
    """The latency rounds alone (with a warm-up run), merged into results.json."""
    path = OUT / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    with seeded_services() as (admin, dsn, emu, rows):
        dag = load_dag()
        reset_target(dsn)
        dag_run(dag, dsn)  # warm-up
        results["latency"] = latency_rounds(dag, dsn, rows, emu, repeat)
        services.drop_database(admin, "backfill_bench")
    results["cost_model"], lines = cost_report(rows)
    say("\n".join(lines))
    say(f"with {LATENCY_S * 1000:.0f} ms per BigQuery request: {results['latency']}")
    path.write_text(json.dumps(results, indent=2, default=str))
    return 0


def rss_only(source_rows: int) -> int:
    """Peak RSS of one chunk task at 10k/50k/200k/500k rows, with `source_rows` rows of the tenant in the snapshot."""
    path = OUT / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    with services.postgres_server() as admin, services.bigquery_emulator(PROJECT, HOME / "bqemulator.log") as emu:
        dsn = services.recreate_database(admin, "backfill_bench")
        os.environ["BENCH_DSN"] = dsn
        os.environ["AIRFLOW_CONN_POSTGRES_DEFAULT"] = services.airflow_conn_uri(dsn)
        os.environ["AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT"] = services.gcp_connection(PROJECT, emu)
        client = bq_client(emu["rest"])
        client.create_dataset("analytics", exists_ok=True)
        create_source(client, inventory_table(SEED_TENANT, min(source_rows, 1_000_000)))
        for start in range(1_000_000, source_rows, 1_000_000):  # in slices: bounded memory here and in the emulator
            batch = inventory_table(SEED_TENANT, min(source_rows, start + 1_000_000), seed=0).slice(start)
            append_source(client, batch)
        rss = {str(size): chunk_rss(size) for size in (10_000, 50_000, 200_000, 500_000)}
        services.drop_database(admin, "backfill_bench")
    results.setdefault("chunk_task_peak_rss_mb_by_source_rows", {})[str(source_rows)] = rss
    say(f"chunk task peak RSS (MB) with {source_rows:,} source rows: {rss}")
    path.write_text(json.dumps(results, indent=2, default=str))
    if "dag_cold" in results:  # redraw with the new memory figures
        chart(summary(results), results)
    return 0


def chart(table: list, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right, memory) = plt.subplots(1, 3, figsize=(16, 4.5))
    names = [row[0] for row in table if row[0] != "old loop (estimate)"]
    secs = [row[1] for row in table if row[0] != "old loop (estimate)"]
    left.barh(names, secs, color=["#999", "#2a7", "#7c4", "#c55"][: len(names)])
    left.set_xlabel(f"seconds for {SOURCE_ROWS:,} rows (median)")
    left.invert_yaxis()
    for i, v in enumerate(secs):
        left.text(v, i, f" {v:.1f} s", va="center")
    sweep = results["chunk_size_sweep_cold_s"]
    right.plot([int(k) for k in sweep], list(sweep.values()), marker="o")
    right.set_xscale("log")
    right.set_xlabel("chunk_size (rows)")
    right.set_ylabel("cold backfill, seconds")
    right.set_title("chunk-size sweep")
    for source_rows, by_size in sorted(results.get("chunk_task_peak_rss_mb_by_source_rows", {}).items()):
        sizes = sorted(int(k) for k in by_size)
        memory.plot(sizes, [by_size[str(k)] for k in sizes], marker="o", label=f"{int(source_rows):,} source rows")
    memory.set_xscale("log")
    memory.set_xlabel("chunk_size (rows)")
    memory.set_ylabel("chunk task peak RSS, MB")
    memory.set_ylim(0, 400)
    memory.axhline(300, color="#c55", linestyle=":", linewidth=1)
    memory.set_title("memory of one chunk task")
    memory.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(OUT / "chart.png", dpi=110)


if __name__ == "__main__":
    sys.exit(main())

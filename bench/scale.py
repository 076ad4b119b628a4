"""The benchmark's scale configurations (docs/performance.md), each against a raw COPY measured in the same round:

  --shared-target N   the target already holds N rows of other tenants (default 20,000,000, loaded by COPY before
                      timing); the ceiling is a raw COPY of the tenant's rows into that same table
  --scheduler         trigger through the REST API -> run success, under api-server + scheduler + dag-processor with
                      LocalExecutor (the deployment settings of docs/deploy.md "Settings for a deployment")
  --tenant-rows N     the whole DAG, cold and with nothing changed, for a tenant of N rows (e.g. 5,000,000)

`make bench` runs all three after bench/run.py's rounds. Figures are merged into bench/results/results.json.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
import uuid

import psycopg
import pyarrow as pa
import pyarrow.csv as pa_csv

from bench.run import (
    HOME,
    OUT,
    ROOT,
    dag_run,
    empty_target_ceiling,
    interleaved_rounds,
    load_dag,
    reset_target,
    say,
    seeded_services,
)
from devtools import services
from devtools.seed import PROJECT, SEED_TENANT, inventory_table

DAG = "bigquery_backfill"
LEDGER = ("backfill_chunks", "backfill_quarantine", "backfill_range_proofs", "backfill_source_progress",
          "bigquery_backfill_jobs")  # fmt: skip
# What a deployment sets for a short run's latency (docs/deploy.md "Settings for a deployment", docker-compose.yaml).
DEPLOYMENT_ENV = {
    "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.2",
    "AIRFLOW__BIGQUERY_BACKFILL__PRELOAD_TASK_MODULES": "True",
}


def _csv(rows: pa.Table) -> bytes:
    buf = io.BytesIO()
    pa_csv.write_csv(rows, buf, pa_csv.WriteOptions(include_header=False))
    return buf.getvalue()


def _copy(conn: psycopg.Connection, rows: pa.Table, data: bytes) -> None:
    with conn.cursor().copy(f"COPY inventory_movements ({', '.join(rows.column_names)}) FROM STDIN (FORMAT csv)") as cp:
        cp.write(data)


def load_other_tenants(dsn: str, n: int) -> None:
    """n rows of other tenants (a million per tenant) into the keyed target, by COPY; then VACUUM ANALYZE."""
    t = time.perf_counter()
    with psycopg.connect(dsn) as conn:
        for k in range(-(-n // 1_000_000)):
            rows = inventory_table(str(uuid.UUID(int=k + 1)), min(1_000_000, n - k * 1_000_000), seed=k)
            _copy(conn, rows, _csv(rows))
            conn.commit()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE inventory_movements")
        size = conn.execute("SELECT pg_size_pretty(pg_total_relation_size('inventory_movements'))").fetchone()[0]
    took = time.perf_counter() - t
    say(f"target holds {n:,} rows of other tenants ({size} with its key index), loaded in {took:.0f} s")


def clear_tenant(dsn: str) -> None:
    """The tenant's target rows and the whole ledger gone, dead rows vacuumed: the shared table as before a cold run."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM inventory_movements WHERE tenant_id = %s", [SEED_TENANT])
        conn.execute(f"TRUNCATE {', '.join(LEDGER)}")
        conn.execute("VACUUM ANALYZE inventory_movements")


def shared_ceiling(dsn: str, rows: pa.Table, data: bytes) -> float:
    """A raw COPY of the tenant's rows into the shared table (then taken out again)."""
    with psycopg.connect(dsn) as conn:
        t = time.perf_counter()
        _copy(conn, rows, data)
        conn.commit()
        took = time.perf_counter() - t
    clear_tenant(dsn)
    return took


def shared_target(others: int, repeat: int) -> dict:
    with seeded_services() as (admin, dsn, _emu, rows):
        reset_target(dsn)
        load_other_tenants(dsn, others)
        dag = load_dag()
        dag_run(dag, dsn)  # warm-up
        clear_tenant(dsn)
        data = _csv(rows)
        ceilings, cold, noop = interleaved_rounds(
            repeat,
            lambda: shared_ceiling(dsn, rows, data),
            lambda: dag_run(dag, dsn),
            "shared target round",
            after=lambda: clear_tenant(dsn),
        )
        services.drop_database(admin, "backfill_bench")
    return _summary(ceilings, cold, noop) | {"other_rows": others}


def _summary(ceilings: list[float], cold: list[dict], noop: list[dict]) -> dict:
    out = {
        "ceiling_copy_s": statistics.median(ceilings),
        "cold_s": statistics.median(r["wall_s"] for r in cold),
        "ratio_cold": statistics.median(r["wall_s"] / c for r, c in zip(cold, ceilings, strict=True)),
        "rounds": [{"ceiling_s": c, "cold_s": a["wall_s"]} for c, a in zip(ceilings, cold, strict=True)],
        "dag_cold": {k: statistics.median(r[k] for r in cold) for k in cold[0]},
    }
    if noop:
        out["noop_s"] = statistics.median(r["wall_s"] for r in noop)
        out["ratio_noop"] = statistics.median(r["wall_s"] / c for r, c in zip(noop, ceilings, strict=True))
        out["dag_noop"] = {k: statistics.median(r[k] for r in noop) for k in noop[0]}
        for r, b in zip(out["rounds"], noop, strict=True):
            r["noop_s"] = b["wall_s"]
    return out


def tenant_rows(n: int, repeat: int) -> dict:
    with seeded_services(n) as (admin, dsn, _emu, rows):
        dag = load_dag()
        reset_target(dsn)
        dag_run(dag, dsn)  # warm-up
        ceilings, cold, noop = interleaved_rounds(
            repeat, lambda: empty_target_ceiling(dsn, rows), lambda: dag_run(dag, dsn), f"{n:,}-row tenant round"
        )
        services.drop_database(admin, "backfill_bench")
    return _summary(ceilings, cold, noop) | {"tenant_rows": n}


def _scheduled_run(stack) -> dict:
    """Trigger through the REST API, poll until the run ends; wall time and where it went (from the task
    instances' own times)."""
    from datetime import datetime

    t = time.perf_counter()
    run_id = stack.trigger(DAG, {"tenant_id": SEED_TENANT})
    while (state := stack.run_state(DAG, run_id)) not in ("success", "failed"):
        time.sleep(0.05)
    wall = time.perf_counter() - t
    if state != "success":
        raise RuntimeError(f"scheduler bench run {run_id} {state}; logs in {stack.home}")
    run = stack.api("GET", f"/dags/{DAG}/dagRuns/{run_id}")
    tis = stack.api("GET", f"/dags/{DAG}/dagRuns/{run_id}/taskInstances", params={"limit": 100})["task_instances"]
    when = datetime.fromisoformat
    first_start = min(when(ti["start_date"]) for ti in tis)
    busy = sum(ti["duration"] or 0 for ti in tis)
    stages = {}
    for ti in tis:
        s = stages.setdefault(ti["task_id"], [when(ti["start_date"]), when(ti["end_date"])])
        s[0], s[1] = min(s[0], when(ti["start_date"])), max(s[1], when(ti["end_date"]))
    return {
        "wall_s": wall,
        "queued_to_first_task_s": (first_start - when(run["queued_at"])).total_seconds(),
        "task_seconds": busy,
        "stage_s": {k: (v[1] - v[0]).total_seconds() for k, v in stages.items()},
    }


def scheduler(repeat: int) -> dict:
    from devtools.airflow_stack import airflow_stack

    with seeded_services() as (admin, dsn, emu, rows):
        env = {
            "AIRFLOW_CONN_POSTGRES_DEFAULT": services.airflow_conn_uri(dsn),
            "AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT": services.gcp_connection(PROJECT, emu),
            **DEPLOYMENT_ENV,
        }
        port = services.free_port()
        with airflow_stack(HOME / "airflow", port, admin, "backfill_bench_airflow", env) as stack:
            stack.wait_for_dag(DAG)
            reset_target(dsn)
            _scheduled_run(stack)  # warm-up
            ceilings, cold, noop = interleaved_rounds(
                repeat, lambda: empty_target_ceiling(dsn, rows), lambda: _scheduled_run(stack), "scheduler round"
            )
        services.drop_database(admin, "backfill_bench")
    out = _summary(ceilings, [{"wall_s": r["wall_s"]} for r in cold], [{"wall_s": r["wall_s"]} for r in noop])
    out["settings"] = DEPLOYMENT_ENV
    out["cold_runs"] = cold
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared-target", type=int, nargs="?", const=20_000_000, metavar="OTHER_ROWS")
    parser.add_argument("--scheduler", action="store_true")
    parser.add_argument("--tenant-rows", type=int, metavar="N")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    path = OUT / "results.json"
    OUT.mkdir(parents=True, exist_ok=True)
    results = json.loads(path.read_text()) if path.exists() else {}
    if args.shared_target:
        results["shared_target"] = shared_target(args.shared_target, args.repeat)
        say(f"shared target: {_line(results['shared_target'])}")
    if args.scheduler:
        results["scheduler"] = scheduler(args.repeat)
        say(f"under the scheduler: {_line(results['scheduler'])}")
    if args.tenant_rows:
        results.setdefault("tenant_rows", {})[str(args.tenant_rows)] = tenant_rows(args.tenant_rows, args.repeat)
        say(f"{args.tenant_rows:,}-row tenant: {_line(results['tenant_rows'][str(args.tenant_rows)])}")
    path.write_text(json.dumps(results, indent=2, default=str))
    say(f"wrote {path.relative_to(ROOT)}")
    return 0


def _line(r: dict) -> str:
    text = f"ceiling {r['ceiling_copy_s']:.2f} s, cold {r['cold_s']:.2f} s ({r['ratio_cold']:.2f}x)"
    if "noop_s" in r:
        text += f", nothing changed {r['noop_s']:.2f} s ({r['ratio_noop']:.2f}x)"
    return text


if __name__ == "__main__":
    raise SystemExit(main())

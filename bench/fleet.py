"""Fleet benchmark: many tenants in one run against the raw-COPY ceiling of the same rows and against one run per
tenant, on one emulated source and one Postgres. `make bench` runs it after bench.run (or: .venv/bin/python -m
bench.fleet [--tenants 200 --tenant-rows 5000 --repeat 3 --sample 10]).

Each round measures the ceiling (one COPY of all the fleet's rows into the empty keyed table), the fleet cold (one
dag.test of every tenant), the fleet again with nothing changed, then `--sample` tenants one run each, cold: one run
per tenant is extrapolated from that sample's median to the whole fleet. Figures: medians, ratios within a round.
Merged into bench/results/results.json under "fleet".
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import psycopg
import pyarrow as pa

from bench.run import OUT, bench_services, ceiling, load_dag, reset_target, say
from devtools import services
from devtools.seed import append_source, create_source, inventory_table


def fleet_tenants(n: int) -> list[str]:
    return [f"{i:08x}-2222-4000-8000-000000000000" for i in range(n)]


STAGES: dict[str, list[float]] = {}


def run(dag, conf: dict, stages: str | None = None) -> float:
    """One dag.test; with `stages`, each task's seconds (mapped tasks summed) kept under that name."""
    t = time.perf_counter()
    dr = dag.test(run_conf=conf)
    wall = time.perf_counter() - t
    if dr.state != "success":
        raise RuntimeError(f"bench run failed: {dr.state}")
    if stages:
        spent: dict[str, float] = {}
        for ti in dr.get_task_instances():
            spent[ti.task_id] = spent.get(ti.task_id, 0.0) + (ti.duration or 0.0)
        for task, seconds in spent.items():
            STAGES.setdefault(f"{stages} {task}", []).append(seconds)
    return wall


def empty_fleet_target(dsn: str, tenants: list[str]) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM inventory_movements WHERE tenant_id = ANY(%s::uuid[])", [tenants])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tenants", type=int, default=200)
    parser.add_argument("--tenant-rows", type=int, default=5_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sample", type=int, default=10, help="tenants run one at a time per round")
    args = parser.parse_args()
    tenants = fleet_tenants(args.tenants)
    with bench_services() as (admin, dsn, _, client):
        tables = [inventory_table(t, args.tenant_rows, seed=i) for i, t in enumerate(tenants)]
        rows = pa.concat_tables(tables)
        step = max(1, 1_000_000 // args.tenant_rows)  # a million rows per load
        create_source(client, pa.concat_tables(tables[:step]))
        for at in range(step, len(tables), step):
            append_source(client, pa.concat_tables(tables[at : at + step]))
        say(f"fleet: {args.tenants} tenants of {args.tenant_rows:,} rows ({rows.num_rows:,} rows)")
        dag = load_dag()
        fleet_conf = {"tenant_id": None, "tenant_ids": tenants}
        reset_target(dsn)
        # dag.test keeps a run's conf on the DAG object: each conf names both ways of giving tenants
        # warm-up: the process's first run pays imports and connection setup
        run(dag, {"tenant_id": tenants[0], "tenant_ids": []})
        rounds = []
        for r in range(args.repeat):
            copy_s = ceiling(dsn, rows)
            reset_target(dsn)
            cold_s = run(dag, fleet_conf, "cold")
            noop_s = run(dag, fleet_conf, "nothing changed")
            sample = tenants[r * args.sample % len(tenants) :][: args.sample]
            empty_fleet_target(dsn, sample)
            one_each = [run(dag, {"tenant_id": t, "tenant_ids": []}) for t in sample]
            per_tenant = statistics.median(one_each) * len(tenants)
            rounds.append(
                {"ceiling_s": copy_s, "cold_s": cold_s, "noop_s": noop_s,
                 "one_run_median_s": statistics.median(one_each), "one_run_per_tenant_s": per_tenant}
            )  # fmt: skip
            say(f"fleet round: ceiling {copy_s:.2f} s, fleet cold {cold_s:.2f} s, nothing changed {noop_s:.2f} s; "
                f"one run per tenant {statistics.median(one_each):.2f} s median of {len(sample)} → "
                f"{per_tenant:.0f} s for {len(tenants)}")  # fmt: skip
        services.drop_database(admin, "backfill_bench")
    result = {
        "tenants": args.tenants,
        "tenant_rows": args.tenant_rows,
        "ceiling_copy_s": statistics.median(r["ceiling_s"] for r in rounds),
        "cold_s": statistics.median(r["cold_s"] for r in rounds),
        "noop_s": statistics.median(r["noop_s"] for r in rounds),
        "ratio_cold": statistics.median(r["cold_s"] / r["ceiling_s"] for r in rounds),
        "ratio_noop": statistics.median(r["noop_s"] / r["ceiling_s"] for r in rounds),
        "one_run_per_tenant_s": statistics.median(r["one_run_per_tenant_s"] for r in rounds),
        "speedup_vs_one_run_per_tenant": statistics.median(r["one_run_per_tenant_s"] / r["cold_s"] for r in rounds),
        "rounds": rounds,
        "stages_s": {name: statistics.median(v) for name, v in STAGES.items()},
    }
    say(
        f"\n| fleet of {args.tenants} × {args.tenant_rows:,} | median s | × raw COPY |\n|---|---|---|\n"
        f"| raw COPY (ceiling) | {result['ceiling_copy_s']:.1f} | 1.00× |\n"
        f"| one fleet run, cold | {result['cold_s']:.1f} | {result['ratio_cold']:.2f}× |\n"
        f"| one fleet run, nothing changed | {result['noop_s']:.1f} | {result['ratio_noop']:.2f}× |\n"
        f"| one run per tenant (median of {args.sample} × {args.tenants}) | {result['one_run_per_tenant_s']:.0f} | "
        f"{result['one_run_per_tenant_s'] / result['ceiling_copy_s']:.0f}× |\n\n"
        f"one fleet run is {result['speedup_vs_one_run_per_tenant']:.0f}× faster than one run per tenant\n"
        + "stages (median s): "
        + ", ".join(f"{k} {v:.2f}" for k, v in result["stages_s"].items())
    )
    path = OUT / "results.json"
    OUT.mkdir(parents=True, exist_ok=True)
    results = json.loads(path.read_text()) if path.exists() else {}
    results["fleet"] = result
    path.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

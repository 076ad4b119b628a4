"""`make demo`: the stuck tenant of the old backfill, fixed by one run of the DAG under a real Airflow.

Starts (and stops) everything it needs: Postgres ($BACKFILL_PG_DSN, else the local server, else an embedded one),
the BigQuery emulator seeded with 1,032,601 rows for the tenant plus other tenants, and Airflow's api-server,
scheduler and dag-processor on 127.0.0.1. Recreates the stuck state (207 job rows, 20,796 rows synced), triggers
`bigquery_backfill` through the REST API with the tenant in conf, prints progress, then before/after.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time

import psycopg

from devtools import services
from devtools.airflow_stack import airflow_stack
from devtools.seed import (
    OTHER_TENANT,
    PROJECT,
    SEED_TENANT,
    append_source,
    bq_client,
    create_source,
    inventory_schema,
    inventory_table,
    legacy_jobs,
)

sys.path.insert(0, str(services.ROOT / "plugins"))  # as Airflow's plugins folder does for the DAG

SOURCE_ROWS = 1_032_601
SYNCED_ROWS = 20_796
THIRD_TENANT = "22222222-3333-4444-5555-666666666666"
WORK = services.ROOT / ".cache" / "demo"
DAG = "bigquery_backfill"


def say(message: str) -> None:
    print(message, flush=True)


def seed_bigquery(endpoint: str) -> None:
    client = bq_client(endpoint)
    client.create_dataset("analytics", exists_ok=True)
    t = time.monotonic()
    create_source(client, inventory_table(SEED_TENANT, SOURCE_ROWS))
    append_source(client, inventory_table(OTHER_TENANT, 120_000, seed=3))
    append_source(client, inventory_table(THIRD_TENANT, 80_000, seed=5))
    say(f"  source analytics.inventory_movements: {SOURCE_ROWS:,} rows for tenant {SEED_TENANT}, "
        f"200,000 for two other tenants (loaded in {time.monotonic() - t:.1f} s)")  # fmt: skip


def recreate_stuck_state(dsn: str) -> None:
    """What the old self-re-invoking loop left: 207 jobs (1 running, 206 pending) and 2% of the rows."""
    from bq_backfill.setup import setup_database

    synced = inventory_table(SEED_TENANT, SYNCED_ROWS)
    with psycopg.connect(dsn, autocommit=True) as conn:
        setup_database(conn, None, False, inventory_schema)  # the deployment's setup step
        legacy_jobs(conn, SEED_TENANT, "inventory", running=1, pending=206)
        with conn.cursor().copy(
            "COPY inventory_movements (tenant_id, movement_date, branch_id, product_code, quantity, unit_cost, "
            "movement_type, updated_at) FROM STDIN"
        ) as copy:
            for row in synced.to_pylist():
                copy.write_row(list(row.values()))


def snapshot(dsn: str) -> dict:
    with psycopg.connect(dsn) as conn:
        jobs = conn.execute(
            "SELECT status, count(*) FROM bigquery_backfill_jobs WHERE tenant_id = %s AND model_type = 'inventory' "
            "GROUP BY status ORDER BY status",
            (SEED_TENANT,),
        ).fetchall()
        rows = conn.execute("SELECT count(*) FROM inventory_movements WHERE tenant_id = %s", (SEED_TENANT,))
        return {"jobs": dict(jobs), "rows": rows.fetchone()[0]}


def describe(label: str, state: dict) -> None:
    jobs = ", ".join(f"{n} {status}" for status, n in state["jobs"].items()) or "none"
    total = sum(state["jobs"].values())
    say(f"{label}: job rows for tenant+inventory: {total} ({jobs}); target rows for the tenant: "
        f"{state['rows']:,} of {SOURCE_ROWS:,} ({100 * state['rows'] / SOURCE_ROWS:.1f}%)")  # fmt: skip


def progress(dsn: str, run_id: str, started: float, last: list) -> None:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT j.processed_records, j.total_records, j.status, "
            "(SELECT count(*) FROM backfill_chunks c WHERE c.job_id = j.id AND c.status = 'done'), "
            "(SELECT count(*) FROM backfill_chunks c WHERE c.job_id = j.id) "
            "FROM bigquery_backfill_jobs j WHERE j.dag_run_id = %s",
            (run_id,),
        ).fetchone()
    if row is None or row[1] is None:
        return
    processed, total, status, done, chunks = row
    if last and last[0] == (processed, status):
        return
    last[:] = [(processed, status)]
    elapsed = time.monotonic() - started
    rate = processed / elapsed if elapsed else 0
    eta = f"ETA {(total - processed) / rate:.0f} s" if rate and processed < total else ""
    say(f"  [{elapsed:6.1f} s] chunk {done}/{chunks} · {processed:,} / {total:,} rows "
        f"({100 * processed / max(total, 1):.0f}%) · {rate:,.0f} rows/s {eta} · job {status}")  # fmt: skip


def main() -> int:
    logging.basicConfig(level=logging.WARNING)
    shutil.rmtree(WORK, ignore_errors=True)
    (WORK / "airflow").mkdir(parents=True)
    say("== bigquery_backfill demo ==")
    with services.postgres_server() as admin:
        dsn = services.recreate_database(admin, "backfill_demo")
        say(f"Postgres: {psycopg.conninfo.conninfo_to_dict(dsn).get('host')} database backfill_demo")
        with services.bigquery_emulator(PROJECT, WORK / "bqemulator.log") as bq_env:
            say(f"BigQuery emulator: REST {bq_env['rest']}, Storage Read API {bq_env['storage']}")
            seed_bigquery(bq_env["rest"])
            recreate_stuck_state(dsn)
            before = snapshot(dsn)
            describe("Before", before)

            env = {
                "AIRFLOW_CONN_POSTGRES_DEFAULT": services.airflow_conn_uri(dsn),
                "AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT": services.gcp_connection(PROJECT, bq_env),
            }
            t = time.monotonic()
            say("Starting Airflow (api-server, scheduler, dag-processor on 127.0.0.1) ...")
            with airflow_stack(WORK / "airflow", services.free_port(), admin, "backfill_demo_airflow", env) as stack:
                stack.wait_for_dag(DAG)
                say(f"  ready in {time.monotonic() - t:.0f} s: UI at {stack.base} (user admin, password in "
                    f"{WORK / 'airflow' / 'simple_auth_manager_passwords.json.generated'})")  # fmt: skip
                conf = {"tenant_id": SEED_TENANT, "model_type": "inventory"}
                started = time.monotonic()
                run_id = stack.trigger(DAG, conf)
                say(f"Triggered {DAG} run {run_id} with conf {json.dumps(conf)}")
                last: list = []
                state = stack.wait_run(DAG, run_id, timeout=1800, probe=lambda: progress(dsn, run_id, started, last))
                elapsed = time.monotonic() - started
                progress(dsn, run_id, started, last)
                say(f"Run {state} in {elapsed:.1f} s")
                if state != "success":
                    say(f"  task states: {stack.task_states(DAG, run_id)}; logs under {WORK / 'airflow'}")
            after = snapshot(dsn)
            describe("Before", before)
            describe("After ", after)
            synced = after["rows"] - before["rows"]
            say(f"Rows landed by this run: {synced:,} new + updates, {SOURCE_ROWS / elapsed:,.0f} source rows/s "
                f"end to end ({elapsed:.1f} s, Airflow scheduling included)")  # fmt: skip
            say("All processes started by the demo are stopped.")
            return 0 if state == "success" else 1


if __name__ == "__main__":
    sys.exit(main())

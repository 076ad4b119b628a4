"""`make up`: the demo's local services, left running until Ctrl-C, to click through the Airflow UI.

Postgres (the stuck tenant: 207 job rows, 2% of its rows synced), the BigQuery emulator seeded as for `make demo`,
and Airflow's api-server, scheduler, dag-processor and triggerer on 127.0.0.1. Prints the UI's address, user and
password; docs/airflow.md "Try it in the UI" walks through a run.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import sys
import time

from devtools import services
from devtools.airflow_stack import airflow_stack
from devtools.demo import DAG, recreate_stuck_state, say, seed_bigquery
from devtools.seed import PROJECT, SEED_TENANT

WORK = services.ROOT / ".cache" / "up"
PREFERRED_PORT = 8080


def _port() -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", PREFERRED_PORT))
            return PREFERRED_PORT
        except OSError:
            return services.free_port()


def main() -> int:
    logging.basicConfig(level=logging.WARNING)
    shutil.rmtree(WORK, ignore_errors=True)
    (WORK / "airflow").mkdir(parents=True)
    with services.postgres_server() as admin:
        dsn = services.recreate_database(admin, "backfill_up")
        with services.bigquery_emulator(PROJECT, WORK / "bqemulator.log") as bq_env:
            say("Seeding the BigQuery emulator and the stuck tenant ...")
            seed_bigquery(bq_env["rest"])
            recreate_stuck_state(dsn)
            env = {
                "AIRFLOW_CONN_POSTGRES_DEFAULT": services.airflow_conn_uri(dsn),
                "AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT": services.gcp_connection(PROJECT, bq_env),
            }
            say("Starting Airflow (api-server, scheduler, dag-processor, triggerer) ...")
            with airflow_stack(WORK / "airflow", _port(), admin, "backfill_up_airflow", env) as stack:
                stack.start("triggerer", "triggerer")
                stack.wait_for_dag(DAG)
                password = json.loads((WORK / "airflow" / "simple_auth_manager_passwords.json.generated").read_text())[
                    "admin"
                ]
                say(
                    f"\nAirflow UI:     {stack.base}\n"
                    f"user:           admin\n"
                    f"password:       {password}\n"
                    f"Backfills page: {stack.base}/backfills/ (also in the UI's Browse menu)\n"
                    f"tenant to try:  {SEED_TENANT}\n"
                    f"target:         {dsn} (the stuck tenant: 207 job rows, 2% synced)\n"
                    f"logs:           {WORK / 'airflow'}\n"
                    "Everything runs until Ctrl-C."
                )
                try:
                    while True:
                        time.sleep(3600)
                except KeyboardInterrupt:
                    say("\nstopping ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Airflow plugin: imports the backfill tasks' code and libraries (the BigQuery clients, pyarrow, psycopg) once, in
each Airflow process that loads plugins.

The scheduler loads plugins before its LocalExecutor forks its worker processes, and each task process is forked
from one of those: it then starts with these modules already imported instead of importing them itself, which costs
a task about 0.6 s on a quiet 2-core machine and up to 1.7 s on a busy one, four times per run (cleanup, plan, the
chunks, finalize). Like any plugin, the code is read when the process starts: restart the scheduler and workers
after changing it (docs/deploy.md "Settings for a deployment"). It imports these libraries into every Airflow process
of the environment (the scheduler, the api-server, other DAGs' workers), so it is off unless the deployment sets
`[bigquery_backfill] preload_task_modules = True` (docker-compose.yaml does).

Registered by the installed package's `airflow.plugins` entry point, or found by Airflow in a deployed plugins
folder (plugins/task_preload_plugin.py imports it from here).
"""

from __future__ import annotations

import importlib
import logging
import time

from airflow.configuration import conf
from airflow.plugins_manager import AirflowPlugin

log = logging.getLogger(__name__)

MODULES = (
    "bq_backfill.tasks.cleanup",
    "bq_backfill.tasks.plan",
    "bq_backfill.tasks.chunk",
    "bq_backfill.tasks.finalize",
    "bq_backfill.lineage",
)


def preload() -> None:
    started = time.monotonic()
    for name in MODULES:
        try:
            importlib.import_module(name)
        except Exception:  # a task that needs it imports it again and fails with the real error, in its own log
            log.warning("bigquery_backfill: could not preload %s", name, exc_info=True)
            return
    log.debug("bigquery_backfill: task modules preloaded in %.2f s", time.monotonic() - started)


if conf.getboolean("bigquery_backfill", "preload_task_modules", fallback=False):
    preload()


class TaskPreloadPlugin(AirflowPlugin):
    name = "bigquery_backfill_task_preload"

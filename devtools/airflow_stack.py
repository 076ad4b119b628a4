"""A real Airflow deployment on loopback for end-to-end tests: api-server, scheduler, dag-processor, and Celery
workers when the executor is CeleryExecutor.

Metadata in a Postgres database of its own, LocalExecutor unless `extra_env` says otherwise, the project's dags/ and
plugins/. Every process is started in its own process group and stopped (TERM, then KILL) when the context exits,
whatever happened.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from devtools import services

ROOT = services.ROOT


class AirflowStack:
    def __init__(self, home: Path, port: int, env: dict[str, str]) -> None:
        self.home, self.port, self.env = home, port, env
        self.base = f"http://127.0.0.1:{port}"
        self.procs: list[subprocess.Popen] = []
        self.names: dict[int, str] = {}
        self.client: httpx.Client | None = None
        self.token = ""  # the admin user's JWT, once healthy

    def airflow(self, *args: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "airflow", *args], env=self.env, capture_output=True, text=True, timeout=300
        )
        if out.returncode:
            raise RuntimeError(f"airflow {' '.join(args)} failed:\n{out.stderr[-4000:]}")
        return out.stdout

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.home / f"{name}.log", "w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "airflow", *args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append(proc)
        self.names[proc.pid] = name
        return proc

    def process_of(self, pid: int) -> str | None:
        """The name of the stack's process (e.g. "worker-1") that `pid` runs under, if any: its parents are walked."""
        while pid > 1:
            if pid in self.names:
                return self.names[pid]
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                return None
            pid = int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state: the parent's pid
        return None

    def kill(self, name: str) -> None:
        """SIGKILL a stack process and everything it started (its process group): a machine lost, as far as
        Airflow and the broker can tell."""
        [proc] = [p for p in self.procs if self.names[p.pid] == name]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        if self.client:
            self.client.close()

    def wait_healthy(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc.args[3:]} exited with {proc.returncode}; see {self.home}")
            try:
                if httpx.get(f"{self.base}/api/v2/monitor/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise RuntimeError(f"api-server not healthy after {timeout} s; logs in {self.home}")
        self.token = self.login("admin")
        self.client = httpx.Client(
            base_url=f"{self.base}/api/v2", headers={"Authorization": f"Bearer {self.token}"}, timeout=30
        )

    def login(self, username: str) -> str:
        """A JWT for one of the simple auth manager's users (its generated password)."""
        password = json.loads((self.home / "simple_auth_manager_passwords.json.generated").read_text())[username]
        token = httpx.post(f"{self.base}/auth/token", json={"username": username, "password": password}, timeout=10)
        token.raise_for_status()
        return token.json()["access_token"]

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        assert self.client is not None
        response = self.client.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise RuntimeError(f"{method} {path} -> {response.status_code}: {response.text[:2000]}")
        return response.json() if response.content else None

    def wait_for_dag(self, dag_id: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.api("GET", f"/dags/{dag_id}")
                return
            except RuntimeError:
                time.sleep(1)
        raise RuntimeError(f"{dag_id} not parsed after {timeout} s; see {self.home}/dag-processor.log")

    def trigger(self, dag_id: str, conf: dict) -> str:
        return self.api("POST", f"/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf})["dag_run_id"]

    def run_state(self, dag_id: str, run_id: str) -> str:
        return self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}")["state"]

    def wait_run(self, dag_id: str, run_id: str, states=("success", "failed"), timeout: float = 300, probe=None) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.run_state(dag_id, run_id)
            if probe:
                probe()
            if state in states:
                return state
            time.sleep(0.5)
        raise RuntimeError(f"run {run_id} still {state} after {timeout} s; logs in {self.home}")

    def task_states(self, dag_id: str, run_id: str) -> dict[tuple[str, int], str]:
        tis = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances", params={"limit": 1000})
        return {(t["task_id"], t["map_index"]): t["state"] for t in tis["task_instances"]}


@contextmanager
def airflow_stack(
    home: Path,
    port: int,
    pg_admin: str,
    meta_db: str,
    extra_env: dict[str, str],
    dags_folder: Path | None = None,
    celery_workers: int = 0,
) -> Iterator[AirflowStack]:
    """Starts api-server, scheduler and dag-processor with metadata in a fresh database `meta_db`, on the project's
    dags/ (or `dags_folder`); `extra_env` overrides the defaults below. With `celery_workers`, the executor is
    CeleryExecutor (extra_env must set AIRFLOW__CELERY__BROKER_URL) and that many workers run, named worker-1...,
    each taking two tasks at a time."""
    meta_dsn = services.recreate_database(pg_admin, meta_db)
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": services.sqlalchemy_url(meta_dsn),
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder or ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "600",
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        # as docker-compose.yaml: the tasks' modules imported once, before LocalExecutor forks its workers
        "AIRFLOW__BIGQUERY_BACKFILL__PRELOAD_TASK_MODULES": "True",
    }
    if celery_workers:
        env["AIRFLOW__CORE__EXECUTOR"] = "CeleryExecutor"
        env["AIRFLOW__CELERY__RESULT_BACKEND"] = "db+" + services.sqlalchemy_url(meta_dsn)
    env.update(extra_env)
    stack = AirflowStack(home, port, env)
    try:
        stack.airflow("db", "migrate")
        stack.airflow("pools", "set", "bigquery_backfill_postgres", "4", "Postgres writers of bigquery_backfill")
        stack.start("api-server", "api-server", "--host", "127.0.0.1", "--port", str(port))
        stack.start("scheduler", "scheduler", "--skip-serve-logs")
        stack.start("dag-processor", "dag-processor")
        for n in range(1, celery_workers + 1):
            name = f"worker-{n}"
            stack.start(name, "celery", "worker", "--concurrency", "2", "--celery-hostname", f"{name}@%h",
                        "--skip-serve-logs")  # fmt: skip
        stack.wait_healthy()
        yield stack
    finally:
        stack.stop()
        services.drop_database(pg_admin, meta_db)

"""Local services for tests, the demo and the benchmark: a PostgreSQL server, the BigQuery emulator, and Redis (the
Celery broker).

Postgres, in order: $BACKFILL_PG_DSN if set; else the server at 127.0.0.1:5432 if it answers; else an embedded
server (the `pgserver` wheel, PostgreSQL binaries inside) in a temporary directory, stopped on exit.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parents[1]
LOCAL_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def airflow_home_env(home: Path) -> dict[str, str]:
    """Environment for an in-process Airflow (dag.test) on SQLite in `home`, with this project's dags and plugins.
    Set it before anything imports airflow: its configuration is read at import time."""
    return {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
    }


def _answers(dsn: str) -> bool:
    try:
        with psycopg.connect(dsn, connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False


@contextmanager
def postgres_server() -> Iterator[str]:
    """Yields an admin DSN (database `postgres`) of a running server; an embedded one is stopped afterwards."""
    dsn = os.environ.get("BACKFILL_PG_DSN")
    if dsn and dsn != "embedded":
        yield dsn
        return
    if not dsn and _answers(LOCAL_DSN):
        yield LOCAL_DSN
        return
    import pgserver

    data = Path(tempfile.mkdtemp(prefix="bq_backfill_pg_"))
    server = pgserver.get_server(data, cleanup_mode="delete")
    log.info("embedded PostgreSQL started in %s", data)
    try:
        yield server.get_uri()
    finally:
        server.cleanup()


def with_database(admin_dsn: str, name: str) -> str:
    """The DSN of database `name` on the same server as admin_dsn."""
    info = psycopg.conninfo.conninfo_to_dict(admin_dsn)
    info["dbname"] = name
    return psycopg.conninfo.make_conninfo(**info)


def sqlalchemy_url(dsn: str, driver: str = "psycopg2") -> str:
    """A SQLAlchemy URL for a libpq DSN (socket directories included), e.g. for Airflow's metadata database."""
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    host = info.get("host", "")
    auth = info.get("user", "postgres") + (f":{info['password']}" if info.get("password") else "")
    if host.startswith("/"):
        return f"postgresql+{driver}://{auth}@/{info['dbname']}?host={host}&port={info.get('port', 5432)}"
    return f"postgresql+{driver}://{auth}@{host}:{info.get('port', 5432)}/{info['dbname']}"


def airflow_conn_uri(dsn: str) -> str:
    """An AIRFLOW_CONN_* URI for a libpq DSN (a socket directory goes percent-encoded in the host part)."""
    from urllib.parse import quote

    info = psycopg.conninfo.conninfo_to_dict(dsn)
    host = quote(info.get("host", "127.0.0.1"), safe="")
    auth = info.get("user", "postgres") + (f":{quote(info['password'], safe='')}" if info.get("password") else "")
    return f"postgresql://{auth}@{host}:{info.get('port', 5432)}/{info['dbname']}"


def recreate_database(admin_dsn: str, name: str) -> str:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return with_database(admin_dsn, name)


def drop_database(admin_dsn: str, name: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def emulator_binary() -> Path:
    binary = Path(os.environ.get("BQEMULATOR_BIN") or ROOT / ".venv-bqemulator" / "bin" / "bqemulator")
    if not binary.exists():
        raise FileNotFoundError(f"bqemulator not found at {binary}: run `make install` or set BQEMULATOR_BIN")
    return binary


def gcp_connection(project: str, emulator: dict[str, str]) -> str:
    """An AIRFLOW_CONN_* value (JSON) for the google provider, pointed at the emulator by connection extras."""
    return json.dumps(
        {
            "conn_type": "google_cloud_platform",
            "extra": {
                "project": project,
                "is_anonymous": True,
                "bigquery_endpoint": emulator["rest"],
                "storage_read_endpoint": emulator["storage"],
            },
        }
    )


@contextmanager
def bigquery_emulator(project: str, log_path: Path) -> Iterator[dict[str, str]]:
    """Starts bqemulator on free loopback ports; yields {"rest": base URL, "storage": Storage Read host:port}."""
    binary = emulator_binary()
    rest, grpc = free_port(), free_port()
    with open(log_path, "w") as out:
        proc = subprocess.Popen(
            [str(binary), "start", "--rest-host", "127.0.0.1", "--rest-port", str(rest), "--grpc-host", "127.0.0.1",
             "--grpc-port", str(grpc), "--project", project, "--log-level", "warning"],
            stdout=out,
            stderr=subprocess.STDOUT,
            # DuckDB finds the registered spatial extension under $HOME/.duckdb (devtools/register_duckdb_spatial.py)
            env={**os.environ, "HOME": str(binary.parents[1] / "duckdb-home")},
            start_new_session=True,
        )  # fmt: skip
        try:
            _wait_http(f"http://127.0.0.1:{rest}/healthz", proc, f"bqemulator (log: {log_path})")
            yield {"rest": f"http://127.0.0.1:{rest}", "storage": f"127.0.0.1:{grpc}"}
        finally:
            _stop(proc)


@contextmanager
def redis_server(log_path: Path) -> Iterator[str]:
    """Starts Debian's redis-server on a free loopback port, keeping nothing on disk; yields its redis:// URL.
    Installs the package with apt-get first if the machine has none."""
    binary = shutil.which("redis-server") or apt_install("redis-server", "/usr/bin/redis-server")
    port = free_port()
    with open(log_path, "w") as out:
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {proc.returncode} (log: {log_path})")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server not answering on {port} (log: {log_path})") from None
            time.sleep(0.1)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def apt_install(package: str, binary: str) -> str:
    """Installs a Debian package (tests on a fresh machine bring their own services); returns `binary`."""
    if not shutil.which("apt-get"):
        raise RuntimeError(f"no {binary} and no apt-get to install Debian's {package}")
    env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", package], check=True, env=env, capture_output=True)
    return binary


def _wait_http(url: str, proc: subprocess.Popen, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{what} not ready after {timeout} s")

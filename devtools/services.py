"""Local services for tests, the demo and the benchmark: a PostgreSQL server, the BigQuery emulator, Redis (the
Celery broker) and PgBouncer (a connection pooler in transaction mode).

Postgres, in order: $BACKFILL_PG_DSN if set; else the server at 127.0.0.1:5432 if it answers; else an embedded
server (the `pgserver` wheel, PostgreSQL binaries inside) in a temporary directory, stopped on exit.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
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
    with embedded_postgres() as admin:
        yield admin


@contextmanager
def embedded_postgres() -> Iterator[str]:
    """An embedded server (the pgserver wheel: PostgreSQL 16) in a temporary directory, on a socket of its own;
    yields its admin DSN and stops it afterwards."""
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


@contextmanager
def pgbouncer(backend_dsn: str, work_dir: Path, pool_size: int = 2) -> Iterator[dict[str, str]]:
    """Starts Debian's PgBouncer in transaction mode, as a hosted Postgres' pooled port runs, in front of the server
    of `backend_dsn`, on a free loopback port, with `pool_size` server connections per database and user (fewer
    than a run's chunks: server connections are handed from one client to the next). Installs the package with
    apt-get first if the machine has none. Yields {"dsn": a DSN of backend_dsn's database through the pooler,
    "admin": a DSN of its admin console}."""
    binary = shutil.which("pgbouncer") or apt_install("pgbouncer", "/usr/sbin/pgbouncer")
    backend = psycopg.conninfo.conninfo_to_dict(backend_dsn)
    user = backend.get("user", "postgres")
    port = free_port()
    work_dir.mkdir(parents=True, exist_ok=True)
    work_dir.chmod(0o755)
    (work_dir / "users.txt").write_text(f'"{user}" ""\n')
    server = " ".join(f"{k}={backend[k]}" for k in ("host", "port") if backend.get(k))
    (work_dir / "pgbouncer.ini").write_text(
        f"""[databases]
* = {server} user={user}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {work_dir / "users.txt"}
admin_users = {user}
pool_mode = transaction
default_pool_size = {pool_size}
max_client_conn = 200
ignore_startup_parameters = extra_float_digits
server_reset_query =
stats_period = 1
"""
    )
    for name in ("users.txt", "pgbouncer.ini"):
        (work_dir / name).chmod(0o644)
    # PgBouncer refuses to run as root: it then runs as the owner of the server's socket directory (the embedded
    # server's own user), or as the postgres system user for a server on TCP
    host = backend.get("host", "")
    owner = pwd.getpwuid(os.stat(host).st_uid).pw_name if host.startswith("/") else "postgres"
    as_user = ["-u", owner] if os.geteuid() == 0 else []
    log_path = work_dir / "pgbouncer.log"
    with open(log_path, "w") as out:
        proc = subprocess.Popen(
            [binary, *as_user, str(work_dir / "pgbouncer.ini")],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    dsn = psycopg.conninfo.make_conninfo(
        host="127.0.0.1", port=str(port), user=user, dbname=backend.get("dbname", "postgres")
    )
    admin = psycopg.conninfo.make_conninfo(dsn, dbname="pgbouncer")
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"pgbouncer exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
            try:
                with psycopg.connect(admin, autocommit=True, connect_timeout=2, prepare_threshold=None) as conn:
                    conn.execute("SHOW VERSION")
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"pgbouncer not answering on {port} (log: {log_path})") from None
                time.sleep(0.1)
        yield {"dsn": dsn, "admin": admin}
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

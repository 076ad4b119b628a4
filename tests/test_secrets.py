"""A connection's password or key never shows: not in a task's log, not in the job's error_message, not in the text
of the exception a failing task raises."""

from __future__ import annotations

import json

import psycopg
from airflow_run import clear_with_downstream, drive
from helpers import conf, jobs
from test_resume import cure_poison, poison

from devtools import services
from devtools.seed import PROJECT, SEED_TENANT, create_source, inventory_rows

PG_PASSWORD = "pg-Secret-5f1c9e2a"


def _everything_said(pg, capfd, caplog) -> str:
    """Task logs as dag.test prints them (with each failing task's exception and traceback), the log records, and
    every job's error_message."""
    messages = [m or "" for (m,) in pg.execute("SELECT error_message FROM bigquery_backfill_jobs").fetchall()]
    return "\n".join(["".join(capfd.readouterr()), caplog.text, *messages])


def test_a_postgres_password_is_in_no_log_message_or_exception(
    pg, bq, backfill_dag, writer_role, monkeypatch, capfd, caplog
):
    """The password in a connection that logs in and works (the writer role, granted by setup), through a whole run
    that fails deep in a chunk's writes: every log line and error of the tasks, the hook's and the driver's."""
    create_source(bq, inventory_rows(SEED_TENANT, 1_000))
    poison(pg)  # in the last of the four chunks
    info = psycopg.conninfo.conninfo_to_dict(writer_role)
    dsn = psycopg.conninfo.make_conninfo(**{**info, "password": PG_PASSWORD})
    monkeypatch.setenv("AIRFLOW_CONN_SECRET_PG", services.airflow_conn_uri(dsn))

    dr = backfill_dag.test(run_conf=conf(postgres_conn_id="secret_pg"))

    assert dr.state == "failed"
    assert [j["processed_records"] for j in jobs(pg)] == [750]  # it connected and wrote: the password was used
    said = _everything_said(pg, capfd, caplog)
    assert 'violates check constraint "refuse_poison"' in said  # the failure is there, named
    assert PG_PASSWORD not in said
    # and a connection that cannot log in at all
    monkeypatch.setenv("AIRFLOW_CONN_SECRET_PG", f"postgresql://someone:{PG_PASSWORD}@127.0.0.1:1/target")
    dr = backfill_dag.test(run_conf=conf(postgres_conn_id="secret_pg"))
    said = _everything_said(pg, capfd, caplog)
    assert "cannot connect to Postgres connection 'secret_pg'" in said and PG_PASSWORD not in said


def _service_account_key() -> tuple[dict, list[str]]:
    """A service-account key as Google issues them (a real RSA key), whose token endpoint is a closed loopback port;
    and the parts of it that are secret."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    pem = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        .decode()
    )
    key = {
        "type": "service_account",
        "project_id": PROJECT,
        "private_key_id": "0123456789abcdef0123456789abcdef01234567",
        "private_key": pem,
        "client_email": "backfill@backfill-test.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": "http://127.0.0.1:1/token",
    }
    body = pem.splitlines()[1:-1]
    return key, [key["private_key_id"], *body[:3], *body[-3:]]


def test_a_google_key_is_in_no_log_message_or_exception(pg, bq, bq_emulator, backfill_dag, monkeypatch, capfd, caplog):
    create_source(bq, inventory_rows(SEED_TENANT, 1_200))
    poison(pg)
    # A run with the emulator's own (anonymous) connection stops at the poisoned chunk; then the connection gets a
    # key whose token cannot be fetched, and the whole run, cleared, fails in cleanup: its job's error_message says so.
    anonymous = json.loads(services.gcp_connection(PROJECT, bq_emulator))
    monkeypatch.setenv("AIRFLOW_CONN_SECRET_GCP", json.dumps(anonymous))
    dr = backfill_dag.test(run_conf=conf(gcp_conn_id="secret_gcp"))
    assert dr.state == "failed"
    key, secrets = _service_account_key()
    extra = {k: v for k, v in anonymous["extra"].items() if k != "is_anonymous"}
    keyed = {**anonymous, "extra": {**extra, "keyfile_dict": json.dumps(key)}}
    monkeypatch.setenv("AIRFLOW_CONN_SECRET_GCP", json.dumps(keyed))
    cure_poison(pg)
    capfd.readouterr()
    caplog.clear()

    clear_with_downstream(backfill_dag, dr.run_id, ["cleanup_stale_jobs"], only_failed=False)
    dr = drive(backfill_dag, dr.run_id)

    assert dr.state == "failed"
    [job] = jobs(pg)
    assert job["status"] == "failed" and "cleanup_stale_jobs failed" in job["error_message"]  # recorded, named
    assert "secret_gcp" in job["error_message"]
    said = _everything_said(pg, capfd, caplog)
    leaked = [s for s in secrets if s in said]
    assert leaked == []

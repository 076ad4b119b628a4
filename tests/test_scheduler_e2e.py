"""End to end under a real scheduler: trigger through the REST API, fail a chunk, clear it with downstream,
and two triggers at once. api-server + scheduler + dag-processor run on 127.0.0.1 and are stopped afterwards."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import psycopg
import pytest
from browser import logged_in_page
from helpers import ROOT, chunks, conf, jobs, stall_first_write, wait_for_stalled_chunk
from test_resume import POISON, REFUSED, cure_poison, poison

from bq_backfill import ledger
from bq_backfill.settings import POOL
from devtools import services
from devtools.airflow_stack import airflow_stack
from devtools.seed import SEED_TENANT, as_tuples, create_source, inventory_rows, legacy_jobs, target_rows

DAG = "bigquery_backfill"
ACTIVE = (
    "SELECT count(*) FROM bigquery_backfill_jobs "
    "WHERE tenant_id = %s AND model_type = 'inventory' AND status IN ('pending', 'running')"
)


DOWNSTREAM = "after_backfill"
# A DAG of another team, scheduled on the target table's Asset: it starts after each completed backfill.
DOWNSTREAM_DAG = """
from airflow.sdk import Asset, dag, task


@dag(dag_id="after_backfill", schedule=[Asset({uri!r})], catchup=False)
def after_backfill():
    @task
    def report():
        pass

    report()


after_backfill()
"""


def target_asset_uri(dsn: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    host = info.get("host", "localhost")
    host = "localhost" if host.startswith("/") else host
    return f"postgres://{host}:{info.get('port', 5432)}/{info['dbname']}/public/inventory_movements"


@pytest.fixture(scope="module")
def stack(tmp_path_factory, bq_emulator, pg_admin, pg_server, pooler):
    env = {k: v for k, v in os.environ.items() if k.startswith("AIRFLOW_CONN_")}
    env["BACKFILL_CHUNK_RETRIES"] = "0"  # a killed chunk fails for good here: the test clears it by hand
    # the simple auth manager with per-DAG refusals (tests/probes): a viewer, and a viewer refused the backfill DAG
    env["AIRFLOW__CORE__AUTH_MANAGER"] = "dag_scoped_auth_manager.DagScopedAuthManager"
    env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"] = "admin:admin,watcher:viewer,outsider:viewer"
    env["DAG_SCOPED_AUTH_DENY"] = f"outsider:{DAG}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "tests" / "probes"), os.environ.get("PYTHONPATH")]))
    home = tmp_path_factory.mktemp("airflow")
    dags = tmp_path_factory.mktemp("dags")
    for path in (ROOT / "dags").glob("*.py"):
        (dags / path.name).symlink_to(path)
    (dags / "after_backfill.py").write_text(DOWNSTREAM_DAG.format(uri=target_asset_uri(pg_server)))
    meta_db = f"bq_backfill_airflow_{os.getpid()}"
    with airflow_stack(home, services.free_port(), pg_admin, meta_db, env, dags_folder=dags) as running:
        running.wait_for_dag(DAG)
        running.wait_for_dag(DOWNSTREAM)
        yield running


def asset_events(stack) -> list[dict]:
    return stack.api("GET", "/assets/events", params={"source_dag_id": DAG, "limit": 100})["asset_events"]


def downstream_runs(stack) -> list[dict]:
    return stack.api("GET", f"/dags/{DOWNSTREAM}/dagRuns", params={"limit": 100})["dag_runs"]


def wait_for(condition, timeout: float = 90, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(1)
    raise AssertionError(f"{what}: not after {timeout} s")


def test_resume_and_one_run_at_a_time_under_the_scheduler(pg, pg_server, bq, stack):
    source = inventory_rows(SEED_TENANT, 3_000)
    create_source(bq, source)
    ledger.apply_schema(pg)
    legacy_jobs(pg, SEED_TENANT, "inventory", running=1, pending=206)
    poison(pg, product_code=POISON)  # chunk 1 of [0, 500), [500, 1000), ...
    run_conf = conf(chunk_size=500)
    watch = psycopg.connect(pg_server, autocommit=True)
    most_active = 0

    def probe() -> None:
        nonlocal most_active
        most_active = max(most_active, watch.execute(ACTIVE, (SEED_TENANT,)).fetchone()[0])

    # 1. a chunk fails: the run fails, the job says failed, the other chunks are done
    run_a = stack.trigger(DAG, run_conf)
    assert stack.wait_run(DAG, run_a) == "failed"
    probe()  # from here on (the 207 legacy jobs are gone) at most one job may be pending/running
    states = stack.task_states(DAG, run_a)
    assert states[("load_chunk", 1)] == "failed" and states[("finalize", -1)] == "failed"
    [job] = jobs(pg)
    assert job["status"] == "failed" and REFUSED in job["error_message"]
    assert asset_events(stack) == [] and downstream_runs(stack) == []  # a failed run tells nobody it landed
    done_before = {c["chunk_index"]: c["completed_at"] for c in chunks(pg, job["id"]) if c["status"] == "done"}
    assert sorted(done_before) == [0, 2, 3, 4, 5]

    # 2. fix the cause, clear the failed chunk with downstream through the REST API: the run finishes
    cure_poison(pg)
    cleared = stack.api(
        "POST",
        f"/dags/{DAG}/clearTaskInstances",
        json={
            "dry_run": False,
            "dag_run_id": run_a,
            "task_ids": [["load_chunk", 1]],
            "only_failed": True,
            "include_downstream": True,
        },
    )
    assert sorted((t["task_id"], t["map_index"]) for t in cleared["task_instances"]) == [
        ("finalize", -1),
        ("load_chunk", 1),
    ]
    assert stack.wait_run(DAG, run_a, probe=probe) == "success"
    [job] = jobs(pg)
    assert job["status"] == "completed" and job["processed_records"] == job["total_records"] == 3_000
    after = {c["chunk_index"]: c["completed_at"] for c in chunks(pg, job["id"])}
    assert all(after[i] == done_before[i] for i in done_before)  # finished chunks were not redone
    assert target_rows(pg, SEED_TENANT) == as_tuples(source)
    # the completed run emitted one event on the target table's Asset; the DAG scheduled on it started
    [event] = asset_events(stack)
    assert event["uri"] == target_asset_uri(pg_server) and event["source_run_id"] == run_a
    assert event["extra"] == {
        "tenant_id": SEED_TENANT,
        "model_type": "inventory",
        "job_id": job["id"],
        "inserted": 3_000,
        "updated": 0,
        "unchanged": 0,
        "rejected": 0,
    }
    [downstream] = wait_for(lambda: downstream_runs(stack), what="a run of the DAG scheduled on the target")
    assert downstream["run_type"] == "asset_triggered"

    # 3. two triggers at once: the second waits queued until the first ends; never two active jobs
    run_b, run_c = stack.trigger(DAG, run_conf), stack.trigger(DAG, run_conf)
    seen_c_queued_while_b_running = False

    def probe_both() -> None:
        nonlocal seen_c_queued_while_b_running
        probe()
        if stack.run_state(DAG, run_b) == "running" and stack.run_state(DAG, run_c) == "queued":
            seen_c_queued_while_b_running = True
        assert not (stack.run_state(DAG, run_b) == "running" and stack.run_state(DAG, run_c) == "running")

    assert stack.wait_run(DAG, run_b, probe=probe_both) == "success"
    assert stack.wait_run(DAG, run_c, probe=probe) == "success"
    assert seen_c_queued_while_b_running
    assert most_active == 1
    assert [j["status"] for j in jobs(pg)] == ["completed"] * 3  # one per run, none left pending or running
    assert target_rows(pg, SEED_TENANT) == as_tuples(source)
    watch.close()


def test_a_chunk_killed_mid_upsert_leaves_nothing_half_written_and_clearing_finishes(
    pg, pg_server, bq, stack, tmp_path
):
    source = inventory_rows(SEED_TENANT, 3_000)
    create_source(bq, source)
    ledger.apply_schema(pg)
    # inside the chunk's transaction; long enough for a browser to start and show it on a busy machine
    stall_first_write(pg, "P0000777", seconds=40)
    run_id = stack.trigger(DAG, conf(chunk_size=500))
    watch = psycopg.connect(pg_server, autocommit=True)
    stalled = wait_for_stalled_chunk(watch, timeout=120)
    assert stalled, "the stalled chunk never showed up"
    shots = Path(os.environ.get("BACKFILL_SCREENSHOTS_DIR") or tmp_path)
    with logged_in_page(stack, height=320) as page:  # the Backfills page while a chunk is being written
        page.goto(f"{stack.base}/backfills/")
        try:
            page.wait_for_selector("tr[data-job] .status.running", timeout=30_000)
        except Exception as exc:
            raise AssertionError(page.inner_text("body")[:3000]) from exc
        row = page.locator("tr[data-job]").first.inner_text()
        assert SEED_TENANT in row and "running" in row
        assert "refreshing every 3 s" in page.inner_text("#refresh")
        page.screenshot(path=str(shots / "backfills-running.png"), full_page=True)
    backend, app = stalled
    worker_pid = int(app.rsplit(" ", 1)[1])
    os.kill(worker_pid, signal.SIGKILL)  # the task process dies in the middle of its upsert

    assert stack.wait_run(DAG, run_id) == "failed"
    for _ in range(500):  # the orphaned backend rolls back once its sleep ends and it finds the client gone
        if not watch.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (backend,)).fetchone():
            break
        time.sleep(0.1)
    [job] = jobs(pg)
    by_chunk = {c["chunk_index"]: c for c in chunks(pg, job["id"])}
    assert by_chunk[1]["status"] != "done"
    in_chunk_1 = pg.execute(
        "SELECT count(*) FROM inventory_movements WHERE product_code BETWEEN 'P0000500' AND 'P0000999'"
    ).fetchone()[0]
    assert in_chunk_1 == 0  # nothing of the killed chunk landed
    assert job["processed_records"] == sum(c["rows_read"] or 0 for c in by_chunk.values()) == 2_500
    assert job["status"] == "failed", job  # marked by the failure callback the scheduler runs for a killed task

    stack.api(
        "POST",
        f"/dags/{DAG}/clearTaskInstances",
        json={"dry_run": False, "dag_run_id": run_id, "task_ids": [["load_chunk", 1]], "only_failed": True,
              "include_downstream": True},
    )  # fmt: skip
    assert stack.wait_run(DAG, run_id) == "success"
    [job] = jobs(pg)
    assert job["status"] == "completed" and job["processed_records"] == job["total_records"] == 3_000
    assert target_rows(pg, SEED_TENANT) == as_tuples(source)
    watch.close()
    with logged_in_page(stack, height=320) as page:  # and after: completed, every chunk done, a link to the grid
        page.goto(f"{stack.base}/backfills/?tenant_id={SEED_TENANT}")
        page.wait_for_selector(f"tr[data-job='{job['id']}'] .status.completed")
        row = page.locator(f"tr[data-job='{job['id']}']")
        assert "3,000 / 3,000" in row.inner_text() and "6 / 6" in row.inner_text()
        grid = f"dags/{DAG}/runs/{quote(run_id, safe='')}"
        link = row.locator("a")
        assert link.evaluate("a => a.href") == f"{stack.base}/{grid}"
        # relative, so it also works under a base-URL prefix ([api] base_url = http://host/airflow)
        prefixed = link.evaluate("a => new URL(a.getAttribute('href'), location.origin + '/airflow/backfills/').href")
        assert prefixed == f"{stack.base}/airflow/{grid}"
        page.screenshot(path=str(shots / "backfills-completed.png"), full_page=True)


def test_the_backfills_page_sums_up_a_fleet_of_ten_thousand_tenants_and_lists_its_failed_ones(pg, stack):
    """A fleet's run on the page: its tenants by status, rows and rate for the whole fleet, links to its jobs and its
    failed ones; read with bounded queries whatever the ledger holds (10,000 job rows of the run, 20,000 older)."""
    ledger.apply_schema(pg)
    pg.execute(
        "INSERT INTO bigquery_backfill_jobs (tenant_id, model_type, status, total_records, processed_records, dag_id, "
        "dag_run_id, started_at, created_at, updated_at, error_message) "
        "SELECT gen_random_uuid(), 'inventory', 'completed', 100, 100, %(dag)s, 'old-' || (i %% 4), "
        "now() - interval '3 days', now() - interval '3 days', now() - interval '3 days', NULL "
        "FROM generate_series(1, 20000) i",
        {"dag": DAG},
    )
    pg.execute(
        "INSERT INTO bigquery_backfill_jobs (tenant_id, model_type, status, total_records, processed_records, dag_id, "
        "dag_run_id, started_at, created_at, updated_at, error_message) "
        "SELECT gen_random_uuid(), 'inventory', CASE WHEN i <= 9000 THEN 'completed' WHEN i <= 9700 THEN 'running' "
        "ELSE 'failed' END, 100, CASE WHEN i <= 9000 THEN 100 ELSE 50 END, %(dag)s, 'fleet-run', "
        "now() - interval '100 seconds', now(), now(), CASE WHEN i > 9700 THEN 'chunk #3: tenant refused' END "
        "FROM generate_series(1, 10000) i",
        {"dag": DAG},
    )
    pg.execute("ANALYZE bigquery_backfill_jobs")
    with logged_in_page(stack, height=600) as page:
        page.goto(f"{stack.base}/backfills/")
        run = page.locator("tr[data-run='fleet-run']")
        run.wait_for()
        text = run.inner_text()
        assert "10,000 tenants · 9,000 done · 700 running · 300 failed" in text, text
        assert "950,000 / 1,000,000" in text and "running" in text
        run.get_by_role("link", name="300 failed").click()
        page.wait_for_selector("tr[data-job]")
        assert page.inner_text("#jobs-title") == "Jobs of run fleet-run (failed)"
        listed = page.locator("tr[data-job]")
        assert listed.count() == 50 and all("failed" in t for t in listed.all_inner_texts())
    reply = httpx.get(
        f"{stack.base}/backfills/api/jobs",
        params={"dag_run_id": "fleet-run", "status": "running", "limit": 100},
        headers={"Authorization": f"Bearer {stack.token}"},
        timeout=10,
    ).json()
    assert len(reply["jobs"]) == 100 and {j["status"] for j in reply["jobs"]} == {"running"}
    [fleet] = [r for r in reply["runs"] if r["dag_run_id"] == "fleet-run"]
    assert fleet["rows_per_second"] and fleet["eta_seconds"] is not None  # the fleet's rate, 50,000 rows to go


def test_the_backfills_page_is_only_served_to_logged_in_users(pg, stack):
    for path in ("/backfills/openapi.json", "/backfills/docs", "/backfills/redoc"):  # FastAPI's own, unauthenticated
        for headers in ({}, {"Authorization": f"Bearer {stack.token}"}):
            served = httpx.get(f"{stack.base}{path}", headers=headers, timeout=10)
            assert served.status_code in (401, 403, 404), (path, served.status_code)
            assert "openapi" not in served.text.lower()
    for path in ("/backfills/", "/backfills/api/jobs"):
        for cookies in ({}, {"_token": "not-a-token"}):  # anonymous, and a forged session
            refused = httpx.get(f"{stack.base}{path}", cookies=cookies, timeout=10)
            assert refused.status_code in (401, 403), (path, cookies, refused.status_code)
            assert "Backfills" not in refused.text and "jobs" not in refused.text
    ok = httpx.get(f"{stack.base}/backfills/api/jobs", headers={"Authorization": f"Bearer {stack.token}"}, timeout=10)
    assert ok.status_code == 200 and ok.json()["dag_id"] == DAG
    bad = httpx.get(
        f"{stack.base}/backfills/api/jobs",
        params={"conn_id": "postgres_admin"},
        headers={"Authorization": f"Bearer {stack.token}"},
        timeout=10,
    )
    assert bad.status_code == 400 and "not one of" in bad.text  # only connections the deployment allows


def test_the_backfills_page_is_served_only_to_users_the_auth_manager_lets_read_the_dags_runs(pg, stack):
    """A viewer may watch backfills; a logged-in user whom the auth manager refuses this DAG (allowed others) is
    refused the page and its JSON."""
    watcher, outsider = ({"Authorization": f"Bearer {stack.login(user)}"} for user in ("watcher", "outsider"))
    for path in ("/backfills/", "/backfills/api/jobs"):
        assert httpx.get(f"{stack.base}{path}", headers=watcher, timeout=10).status_code == 200, path
        refused = httpx.get(f"{stack.base}{path}", headers=outsider, timeout=10)
        assert refused.status_code == 403, (path, refused.status_code)
        assert "Backfills" not in refused.text and "jobs" not in refused.text
    assert httpx.get(f"{stack.base}/api/v2/dags/{DOWNSTREAM}", headers=outsider, timeout=10).status_code == 200
    assert httpx.get(f"{stack.base}/api/v2/dags/{DAG}", headers=outsider, timeout=10).status_code == 403


def test_the_backfills_page_says_when_the_pool_is_missing_and_how_to_create_it(pg, stack):
    """Without the pool the scheduler starts no chunk and says so only in its own log: the page says it too."""
    headers = {"Authorization": f"Bearer {stack.token}"}
    pool = stack.api("GET", f"/pools/{POOL}")
    assert httpx.get(f"{stack.base}/backfills/api/jobs", headers=headers, timeout=10).json()["problems"] == []
    stack.api("DELETE", f"/pools/{POOL}")
    try:
        problems = httpx.get(f"{stack.base}/backfills/api/jobs", headers=headers, timeout=10).json()["problems"]
        assert len(problems) == 1 and f"the pool '{POOL}' does not exist" in problems[0]
        assert f"airflow pools set {POOL} 4" in problems[0]
        with logged_in_page(stack) as page:
            page.goto(f"{stack.base}/backfills/")
            page.get_by_text(f"the pool '{POOL}' does not exist").wait_for(timeout=15_000)
    finally:
        stack.api("POST", "/pools", json={"name": POOL, "slots": pool["slots"], "description": pool["description"]})


def test_the_backfills_page_reads_through_a_transaction_pooler(stack, pooler):
    with psycopg.connect(pooler["direct"], autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        ledger.apply_schema(conn)
        legacy_jobs(conn, SEED_TENANT, "inventory", running=1, pending=2)
    for _ in range(8):  # each request one transaction, on one of the pooler's two server connections
        got = httpx.get(
            f"{stack.base}/backfills/api/jobs",
            params={"conn_id": "pooled_pg", "tenant_id": SEED_TENANT},
            headers={"Authorization": f"Bearer {stack.token}"},
            timeout=10,
        )
        assert got.status_code == 200, got.text
        assert [j["status"] for j in got.json()["jobs"]].count("pending") == 2


def test_the_trigger_form_keeps_a_tenant_to_a_uuids_length_and_refuses_a_bad_one_before_a_run(stack):
    """Airflow 3.3's trigger form checks lengths (not a pattern): the tenant field takes exactly 36 characters and
    says what it wants (or a fleet, in the fields after it); a 36-character non-uuid is refused by the API, and no
    run is created."""
    runs_before = stack.api("GET", f"/dags/{DAG}/dagRuns", params={"limit": 100})["total_entries"]
    with logged_in_page(stack) as page:
        page.goto(f"{stack.base}/dags/{DAG}")
        page.get_by_role("button", name="Trigger").first.click()
        field = page.locator("#element_tenant_id")
        field.wait_for()
        assert (field.get_attribute("minlength"), field.get_attribute("maxlength")) == ("36", "36")
        assert "its uuid, 36 characters" in page.get_by_role("dialog").inner_text()
        assert "tenant_ids" in page.get_by_role("dialog").inner_text()  # a fleet instead, one uuid per line
        field.press_sequentially(SEED_TENANT + "-and-more")
        assert field.input_value() == SEED_TENANT  # nothing past 36 characters goes in
        field.fill("not-a-tenant")
        assert field.evaluate("e => e.validity.tooShort")
        field.fill("zzzzzzzz-zzzz-zzzz-zzzz-zzzzzzzzzzzz")
        page.get_by_test_id("trigger-dag-submit").click()
        page.get_by_text("Failed to Trigger Dag").first.wait_for()
    assert stack.api("GET", f"/dags/{DAG}/dagRuns", params={"limit": 100})["total_entries"] == runs_before

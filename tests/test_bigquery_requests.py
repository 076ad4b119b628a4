"""What the DAG sends to BigQuery, captured at the request level by loopback proxies in front of the emulator (REST
and the Storage Read API's gRPC): an emulator that ignores an option proves nothing about whether it was sent.

Where the emulator answers differently from BigQuery (it estimates 0 bytes for every dry run and never refuses a
call), the proxy answers as BigQuery's documentation says BigQuery does: an estimate in the dry run's statistics, a
403 `accessDenied` / `rateLimitExceeded` in BigQuery's error form, a gRPC PERMISSION_DENIED."""

from __future__ import annotations

import json
import time

import grpc
import pytest
from google.cloud import bigquery
from google.cloud.bigquery_storage_v1 import types
from helpers import INVENTORY, chunks, conf, jobs, scratch_tables

from devtools import services
from devtools.grpc_recorder import GrpcRecordingProxy
from devtools.http_recorder import RecordingProxy, bigquery_error
from devtools.seed import PROJECT, SEED_TENANT, create_source, inventory_rows, inventory_table, target_rows

SOURCE = f"{PROJECT}.analytics.inventory_movements"
SOURCE_SQL = f"`{PROJECT}`.`analytics`.`inventory_movements`"
MODEL = INVENTORY
ESTIMATE = 123_456_789  # what the proxy has BigQuery estimate for the snapshot query


class Proxies:
    def __init__(self, emulator: dict[str, str], monkeypatch, **hooks) -> None:
        self.rest = RecordingProxy(
            emulator["rest"], intercept=hooks.get("intercept"), amend=hooks.get("amend", _estimate)
        )
        self.grpc = GrpcRecordingProxy(emulator["storage"], refuse=hooks.get("refuse"))
        connection = json.loads(services.gcp_connection(PROJECT, emulator))
        connection["extra"].update(bigquery_endpoint=self.rest.url, storage_read_endpoint=self.grpc.endpoint)
        monkeypatch.setenv("AIRFLOW_CONN_RECORDED_GCP", json.dumps(connection))

    def sessions(self) -> list[types.CreateReadSessionRequest]:
        return self.grpc.requests("/CreateReadSession", types.CreateReadSessionRequest)

    def close(self) -> None:
        self.rest.close()
        self.grpc.close()


def _estimate(request: dict, reply: dict) -> dict:
    """BigQuery answers a dry run with the bytes the query would process; the emulator says 0."""
    if (request["json"] or {}).get("configuration", {}).get("dryRun"):
        reply.setdefault("statistics", {}).setdefault("query", {})["totalBytesProcessed"] = str(ESTIMATE)
        reply["statistics"]["totalBytesProcessed"] = str(ESTIMATE)
    return reply


@pytest.fixture
def proxies(bq_emulator, monkeypatch):
    made: list[Proxies] = []

    def make(**hooks) -> Proxies:
        made.append(Proxies(bq_emulator, monkeypatch, **hooks))
        return made[-1]

    yield make
    for p in made:
        p.close()


def _query(job: dict) -> str:
    return job["configuration"]["query"]["query"]


def test_a_run_reads_the_source_once_and_each_chunk_with_one_read_session_of_its_own_partition(
    pg, bq, backfill_dag, proxies, monkeypatch
):
    rows = inventory_table(SEED_TENANT, 2_500)
    create_source(bq, rows)
    monkeypatch.setenv("BACKFILL_SLICE_ROWS", "300")  # several slices per chunk, cut from one read
    p = proxies()

    dr = backfill_dag.test(run_conf=conf(gcp_conn_id="recorded_gcp", chunk_size=1_000, maximum_bytes_billed=10**12))

    assert dr.state == "success"
    assert len(target_rows(pg, SEED_TENANT)) == 2_500
    [job] = jobs(pg)
    assert pg.execute("SELECT estimated_bytes FROM bigquery_backfill_jobs").fetchone() == (ESTIMATE,)
    sent = p.rest.jobs()
    # every query job carries the cap, as maximumBytesBilled (an int64 sent as a string)
    assert {j["configuration"]["query"].get("maximumBytesBilled") for j in sent} == {str(10**12)}
    # the source is read by the snapshot query, once estimated (a dry run, free) and once run, and before that by
    # a count of the tenant's rows (billed on the tenant column alone), which decides whether the plan can run
    on_source = [j for j in sent if SOURCE_SQL in _query(j)]
    assert [bool(j["configuration"].get("dryRun")) for j in on_source] == [True, False, False]
    assert _query(on_source[1]).startswith("SELECT LOWER(`tenant_id`) AS t, COUNT(*) AS n FROM")
    assert "FOR SYSTEM_TIME AS OF" in _query(on_source[1]) and "WHERE `tenant_id` IN UNNEST(@tenant_ids)" in _query(
        on_source[1]
    )
    ctas = _query(on_source[2])
    assert ctas.startswith("CREATE OR REPLACE TABLE")
    # one partition per chunk: offsets 0..N-1 bucketed by chunk_size, within BigQuery's 4,000 partitions per job
    assert "PARTITION BY RANGE_BUCKET(`_row_offset`, GENERATE_ARRAY(0, 4000000, 1000))" in ctas
    # one read session per chunk on the snapshot, restricted to the chunk's offsets (its own partition); finalize
    # reads nothing: each chunk proved its key range (every slice one COPY into an empty range), which finalize
    # checks in Postgres
    [snapshot] = {s.read_session.table for s in p.sessions()}
    assert snapshot.startswith(f"projects/{PROJECT}/datasets/backfill_scratch/tables/backfill_inventory_")
    per_chunk = [
        f"`_row_offset` >= {lo} AND `_row_offset` < {hi}" for lo, hi in ((0, 1_000), (1_000, 2_000), (2_000, 2_500))
    ]
    by_columns: dict[tuple, list[str]] = {}
    for s in p.sessions():
        by_columns.setdefault(tuple(s.read_session.read_options.selected_fields), []).append(
            s.read_session.read_options.row_restriction
        )
    all_columns = (*MODEL.column_names, "_row_offset")
    assert {k: sorted(v) for k, v in by_columns.items()} == {all_columns: per_chunk}
    assert len(p.grpc.requests("/ReadRows", types.ReadRowsRequest)) == 3  # one stream each here
    assert [c["rows_read"] for c in chunks(pg, job["id"])] == [1_000, 1_000, 500]
    assert all(c["key_proof"]["versions"] for c in chunks(pg, job["id"]))


def test_a_snapshot_over_the_bytes_cap_is_refused_before_anything_is_billed(pg, bq, backfill_dag, proxies):
    create_source(bq, inventory_rows(SEED_TENANT, 300))
    p = proxies()

    dr = backfill_dag.test(run_conf=conf(gcp_conn_id="recorded_gcp", maximum_bytes_billed=100_000_000))

    assert dr.state == "failed"
    [job] = jobs(pg)
    assert job["status"] == "failed"
    assert "would process 123,456,789 bytes (117.7 MiB" in job["error_message"]
    assert "over maximum_bytes_billed 100,000,000 (95.4 MiB): nothing was billed" in job["error_message"]
    # the dry run went out; no query that bills the source did, and no snapshot exists
    on_source = [j for j in p.rest.jobs() if SOURCE_SQL in _query(j)]
    assert [j["configuration"].get("dryRun") for j in on_source] == [True]
    assert scratch_tables(bq) == []
    assert p.sessions() == []


def test_a_fleet_is_read_from_the_source_by_one_snapshot_query_and_each_chunk_reads_its_own_offsets(
    pg, bq, backfill_dag, proxies
):
    fleet = [f"{i:08x}-0000-4000-8000-000000000000" for i in range(1, 6)]
    create_source(bq, [r for i, t in enumerate(fleet, start=1) for r in inventory_rows(t, 120 * i)])
    p = proxies()

    dr = backfill_dag.test(run_conf=conf(gcp_conn_id="recorded_gcp", tenant_id=None, tenant_ids=fleet, chunk_size=500))

    assert dr.state == "success"
    billed = [j for j in p.rest.jobs() if SOURCE_SQL in _query(j) and not j["configuration"].get("dryRun")]
    assert [_query(j).split(" ", 1)[0] for j in billed] == ["SELECT", "CREATE"]  # the count, then one snapshot
    tenants = next(
        q["parameterValue"]["arrayValues"]
        for q in billed[1]["configuration"]["query"]["queryParameters"]
        if q["name"] == "fleet_tenants"
    )
    assert [v["value"] for v in tenants] == fleet  # every tenant in the one query, each numbered from its base
    restrictions = sorted(s.read_session.read_options.row_restriction for s in p.sessions())
    assert restrictions == sorted(
        f"`_row_offset` >= {lo} AND `_row_offset` < {hi}"
        for lo, hi in ((0, 500), (500, 1000), (1000, 1500), (1500, 1800))
    )  # 1,800 rows of five tenants, four chunks: each read is one partition
    assert all(j["status"] == "completed" for t in fleet for j in jobs(pg, t))


def test_a_plan_too_long_to_map_gets_larger_chunks_decided_before_the_snapshot_query(
    pg, bq, backfill_dag, proxies, monkeypatch, caplog
):
    monkeypatch.setenv("AIRFLOW__CORE__MAX_MAP_LENGTH", "4")
    create_source(bq, inventory_rows(SEED_TENANT, 1_001))
    p = proxies()

    dr = backfill_dag.test(run_conf=conf(gcp_conn_id="recorded_gcp", chunk_size=250))

    assert dr.state == "success"
    assert "would make 5 chunks, over [core] max_map_length (4): chunks of 251 instead" in caplog.text
    billed = [_query(j) for j in p.rest.jobs() if SOURCE_SQL in _query(j) and not j["configuration"].get("dryRun")]
    assert billed[0].startswith("SELECT LOWER(`tenant_id`) AS t, COUNT(*) AS n FROM")  # the count decides
    # the snapshot is partitioned by the chunks as they run: 4 of 251 offsets
    assert "GENERATE_ARRAY(0, 1004000, 251)" in billed[1]
    assert sorted(c["rows_read"] for c in chunks(pg, jobs(pg)[0]["id"])) == [248, 251, 251, 251]


def test_a_plan_that_cannot_fit_even_the_largest_chunks_is_refused_naming_the_limit():
    from bq_backfill.tasks.plan import fit_chunk_size

    assert fit_chunk_size(1_001, 250, 4) == 251
    assert fit_chunk_size(4_000_001, 1_000, 5_000) == 1_001  # BigQuery's 4,000 partitions bind before Airflow
    with pytest.raises(ValueError, match=r"more than 1024 chunks \(\[core\] max_map_length\) even of 1000000 rows"):
        fit_chunk_size(1_024_000_001, 500_000, 1_024)


def test_a_dry_run_reports_the_estimate_and_runs_no_billed_query(pg, bq, backfill_dag, proxies, caplog):
    create_source(bq, inventory_rows(SEED_TENANT, 300))
    p = proxies()

    dr = backfill_dag.test(run_conf=conf(gcp_conn_id="recorded_gcp", dry_run=True, maximum_bytes_billed=1_000))

    assert dr.state == "success"
    assert "estimates the snapshot query at 123,456,789 bytes" in caplog.text
    assert "cap maximum_bytes_billed 1,000: the run would be refused" in caplog.text
    on_source = [j for j in p.rest.jobs() if SOURCE_SQL in _query(j)]
    assert [j["configuration"].get("dryRun") for j in on_source] == [True]


def test_a_missing_permission_fails_at_once_naming_it(pg, bq, backfill_dag, proxies):
    create_source(bq, inventory_rows(SEED_TENANT, 300))
    message = f"Access Denied: Table {PROJECT}:analytics.inventory_movements: User does not have permission to query"

    def deny_snapshot(request: dict):
        body = request["json"] or {}
        if "CREATE OR REPLACE TABLE" in body.get("configuration", {}).get("query", {}).get("query", ""):
            return bigquery_error(403, "accessDenied", message)
        return None

    p = proxies(intercept=deny_snapshot)

    dr = backfill_dag.test(run_conf=conf(gcp_conn_id="recorded_gcp"))

    assert dr.state == "failed"
    [job] = jobs(pg)
    assert "BigQuery refused to make the snapshot" in job["error_message"]
    assert message in job["error_message"]
    assert f"bigquery.tables.getData on {SOURCE}" in job["error_message"]
    assert len([j for j in p.rest.jobs() if "CREATE OR REPLACE TABLE" in _query(j)]) == 1  # not retried


def test_a_rate_limit_is_retried_with_backoff(pg, bq, backfill_dag, proxies):
    create_source(bq, inventory_rows(SEED_TENANT, 300))
    refused, sent_at = [], []

    def limit_twice(request: dict):
        body = request["json"] or {}
        if "CREATE OR REPLACE TABLE" in body.get("configuration", {}).get("query", {}).get("query", ""):
            sent_at.append(time.monotonic())
            if len(refused) < 2:
                refused.append(request)
                return bigquery_error(403, "rateLimitExceeded", "Exceeded rate limits: too many table operations")
        return None

    p = proxies(intercept=limit_twice)

    dr = backfill_dag.test(run_conf=conf(gcp_conn_id="recorded_gcp"))

    assert dr.state == "success"
    assert len([j for j in p.rest.jobs() if "CREATE OR REPLACE TABLE" in _query(j)]) == 3
    # waited before each retry (the client's jittered exponential backoff: up to 1 s, then 2 s), not a tight loop
    # of a few milliseconds per attempt
    assert sent_at[-1] - sent_at[0] > 0.05
    assert len(target_rows(pg, SEED_TENANT)) == 300


def test_a_refused_read_session_fails_the_chunk_at_once_naming_the_permission(pg, bq, backfill_dag, proxies):
    create_source(bq, inventory_rows(SEED_TENANT, 300))

    def deny(method: str, request: bytes):
        if method.endswith("/CreateReadSession"):
            return grpc.StatusCode.PERMISSION_DENIED, "Permission bigquery.readsessions.create denied on project"
        return None

    p = proxies(refuse=deny)

    dr = backfill_dag.test(run_conf=conf(gcp_conn_id="recorded_gcp", chunk_size=1_000))

    assert dr.state == "failed"
    [job] = jobs(pg)
    assert "Permission bigquery.readsessions.create denied" in job["error_message"]
    assert f"bigquery.readsessions.create on project {PROJECT}" in job["error_message"]
    assert len(p.sessions()) == 1  # one chunk, one attempt: a retry cannot grant a permission
    assert target_rows(pg, SEED_TENANT) == []


def test_a_view_as_source_is_refused_naming_time_travel(pg, bq, backfill_dag, caplog):
    create_source(bq, inventory_rows(SEED_TENANT, 300))
    view = bigquery.Table(f"{PROJECT}.analytics.inventory_view")
    view.view_query = f"SELECT * FROM `{SOURCE}`"  # noqa: S608
    bq.create_table(view)

    dr = backfill_dag.test(run_conf=conf(source_table="analytics.inventory_view"))

    assert dr.state == "failed"
    assert f"BigQuery source {PROJECT}.analytics.inventory_view is a VIEW, not a table" in caplog.text
    assert "time travel (FOR SYSTEM_TIME AS OF), which only tables have" in caplog.text
    assert jobs(pg) == []  # refused by cleanup, before a job is claimed

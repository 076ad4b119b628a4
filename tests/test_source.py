"""BigQuery side against the emulator: the numbered snapshot and chunk reads through the Storage Read API."""

from __future__ import annotations

from datetime import timedelta

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from google.cloud import bigquery
from helpers import INVENTORY

from bq_backfill.source import BigQuerySource, LocationMismatchError, TableRef, job_labels
from devtools.seed import OTHER_TENANT, PROJECT, SEED_TENANT, append_source, create_source, inventory_table

MODEL = INVENTORY


def _source() -> BigQuerySource:
    """The run's client, located as plan_chunks locates it (the scratch dataset made in the source's location)."""
    src = BigQuerySource.from_connection("google_cloud_default")
    src.locate(src.table(MODEL.source_table), "backfill_scratch")
    return src


def test_snapshot_numbers_rows_by_the_full_key_and_large_chunks_read_whole(bq):
    rows = inventory_table(SEED_TENANT, 120_000)
    create_source(bq, rows)
    append_source(bq, inventory_table(OTHER_TENANT, 5_000))
    src = _source()
    snap = TableRef(src.project, "backfill_scratch", "snap_test")

    total = src.new_snapshot(MODEL, src.table(MODEL.source_table), {SEED_TENANT: 0}, snap, src.now(), 1000)
    assert total == {SEED_TENANT: 120_000}

    cols = [*MODEL.column_names, "_row_offset"]
    chunk = pa.Table.from_batches(
        list(src.read_chunk(snap, 10_000, 110_000, cols))
    )  # one 100k-row chunk: well over gRPC's default 4 MiB
    assert chunk.num_rows == 100_000
    assert pc.min(chunk["_row_offset"]).as_py() == 10_000 and pc.max(chunk["_row_offset"]).as_py() == 109_999
    expected = rows.sort_by([(c, "ascending") for c in MODEL.order_key]).slice(10_000, 100_000)
    got = chunk.sort_by("_row_offset").select(MODEL.column_names)
    assert got.to_pylist() == expected.to_pylist()


def test_snapshot_is_frozen_and_recreated_identically_from_its_timestamp(bq):
    create_source(bq, inventory_table(SEED_TENANT, 2_000))
    src = _source()
    as_of = src.now()
    first = TableRef(src.project, "backfill_scratch", "snap_a")
    src.new_snapshot(MODEL, src.table(MODEL.source_table), {SEED_TENANT: 0}, first, as_of, 1000)
    append_source(bq, inventory_table(SEED_TENANT, 2_500).slice(2_000))  # the source moves on after plan

    again = TableRef(src.project, "backfill_scratch", "snap_b")
    total = src.keep_snapshot(MODEL, src.table(MODEL.source_table), {SEED_TENANT: 0}, again, as_of, 1000)
    assert total == {SEED_TENANT: 2_000}
    cols = [*MODEL.column_names, "_row_offset"]
    a = pa.Table.from_batches(list(src.read_chunk(first, 0, 2_000, cols))).sort_by("_row_offset")
    b = pa.Table.from_batches(list(src.read_chunk(again, 0, 2_000, cols))).sort_by("_row_offset")
    assert a.to_pylist() == b.to_pylist()
    # keeping an existing snapshot (a retried plan) leaves it as it is; a new one replaces it, as of its own time
    assert (
        src.keep_snapshot(MODEL, src.table(MODEL.source_table), {SEED_TENANT: 0}, first, as_of + timedelta(0), 1000)[
            SEED_TENANT
        ]
        == 2_000
    )
    assert (
        src.new_snapshot(MODEL, src.table(MODEL.source_table), {SEED_TENANT: 0}, first, src.now(), 1000)[SEED_TENANT]
        == 2_500
    )


def test_the_tenant_matches_in_either_letter_case(bq):
    create_source(bq, inventory_table(SEED_TENANT.upper(), 300))
    append_source(bq, inventory_table(SEED_TENANT, 1_000).slice(300))
    src = _source()
    snap = TableRef(src.project, "backfill_scratch", "snap_case")

    assert (
        src.new_snapshot(MODEL, src.table(MODEL.source_table), {SEED_TENANT: 0}, snap, src.now(), 1000)[SEED_TENANT]
        == 1_000
    )
    batches = list(src.read_tenant_keys(MODEL, src.table(MODEL.source_table), [SEED_TENANT.upper()]))
    assert sum(b.num_rows for b in batches) == 1_000
    assert {t for b in batches for t in b.column("tenant_id").to_pylist()} == {SEED_TENANT}  # lower-cased


def test_the_scratch_dataset_is_made_in_the_sources_location_and_a_mismatch_is_refused(bq):
    bq.delete_dataset("analytics", delete_contents=True)
    eu = bigquery.Dataset(f"{PROJECT}.analytics")
    eu.location = "EU"
    bq.create_dataset(eu)
    create_source(bq, inventory_table(SEED_TENANT, 10))
    src = BigQuerySource.from_connection("google_cloud_default")

    assert src.locate(src.table(MODEL.source_table), "backfill_scratch") == "EU"
    assert bq.get_dataset("backfill_scratch").location == "EU"

    bq.create_dataset(f"{PROJECT}.scratch_us")  # the client's default location: US
    with pytest.raises(LocationMismatchError, match=r"scratch dataset backfill-test.scratch_us is in US, the source "
                       r"backfill-test.analytics.inventory_movements in EU.*Param scratch_dataset"):  # fmt: skip
        src.locate(src.table(MODEL.source_table), "scratch_us")


def test_a_run_on_an_eu_source_sends_every_query_job_and_the_scratch_dataset_to_eu(
    pg, bq, bq_emulator, backfill_dag, monkeypatch
):
    import json

    from helpers import conf

    from devtools import services
    from devtools.http_recorder import RecordingProxy

    bq.delete_dataset("analytics", delete_contents=True)
    eu = bigquery.Dataset(f"{PROJECT}.analytics")
    eu.location = "EU"
    bq.create_dataset(eu)
    create_source(bq, inventory_table(SEED_TENANT, 600))
    proxy = RecordingProxy(bq_emulator["rest"])  # what the DAG sends, whatever the emulator does with it
    connection = json.loads(services.gcp_connection(PROJECT, bq_emulator))
    connection["extra"]["bigquery_endpoint"] = proxy.url
    monkeypatch.setenv("AIRFLOW_CONN_RECORDED_GCP", json.dumps(connection))
    try:
        dr = backfill_dag.test(run_conf=conf(gcp_conn_id="recorded_gcp"))
    finally:
        proxy.close()

    assert dr.state == "success"
    posts = [(r["path"].split("?")[0], r["json"]) for r in proxy.requests if r["method"] == "POST"]
    jobs = [body for path, body in posts if path.endswith("/jobs")]
    assert len(jobs) >= 3  # now, the snapshot, its count
    assert {j["jobReference"].get("location") for j in jobs} == {"EU"}
    # every job, and the snapshot table it makes, labelled for billing: dag, model, tenant and run hashes
    labels = job_labels("bigquery_backfill", "inventory", [SEED_TENANT], dr.run_id)
    assert all(j["configuration"]["labels"] == labels for j in jobs)
    [ctas] = [
        j["configuration"]["query"]["query"]
        for j in jobs
        if "CREATE OR REPLACE TABLE" in j["configuration"]["query"]["query"]
    ]
    assert "labels=[" + ", ".join(f'("{k}", "{v}")' for k, v in sorted(labels.items())) + "]" in ctas
    datasets = [body for path, body in posts if path.endswith("/datasets")]
    assert [d["location"] for d in datasets] == ["EU"]  # the scratch dataset, made where the source is


def test_a_chunk_read_as_bigquery_may_send_it_gives_every_row_once(bq):
    """Reads come through the tests' shuffling proxy (conftest): rows out of order, split across the session's
    streams, in messages of uneven sizes. A read of three streams merges them and loses or repeats no row."""
    create_source(bq, inventory_table(SEED_TENANT, 3_000))
    src = _source()
    snap = TableRef(src.project, "backfill_scratch", "snap_streams")
    src.new_snapshot(MODEL, src.table(MODEL.source_table), {SEED_TENANT: 0}, snap, src.now(), 1_000)
    _, names = src._session(snap, "`_row_offset` >= 500 AND `_row_offset` < 2500", [], 3)
    assert len(names) == 3

    batches = list(src.read_chunk(snap, 500, 2_500, ["_row_offset"], streams=3))

    offsets = [o for batch in batches for o in batch.column("_row_offset").to_pylist()]
    assert offsets != sorted(offsets) and len({b.num_rows for b in batches}) > 1
    assert sorted(offsets) == list(range(500, 2_500))

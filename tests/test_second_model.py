"""A second model needs only a registry entry (and its target table): the same DAG backfills it."""

from __future__ import annotations

import io
from datetime import date
from decimal import Decimal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from google.cloud import bigquery
from helpers import ROOT, jobs

from bq_backfill import models
from devtools.seed import PROJECT, SEED_TENANT


@pytest.fixture
def sales_model():
    model = models.register(
        models.Model(
            model_type="sales_test",
            source_table="analytics.sales_lines",
            target_table="sales_lines",
            columns=(
                models.Column("tenant_id", "uuid"),
                models.Column("sale_date", "date"),
                models.Column("line_id", "text"),
                models.Column("amount", "numeric(18,4)"),
            ),
            conflict_key=("tenant_id", "sale_date", "line_id"),
            order_key=("sale_date", "line_id"),
        )
    )
    yield model
    del models.MODELS["sales_test"]


def test_second_model_backfills_through_the_same_dag(pg, bq, sales_model, airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    pg.execute(
        "CREATE TABLE sales_lines (tenant_id uuid NOT NULL, sale_date date NOT NULL, line_id text NOT NULL, "
        "amount numeric(18,4), UNIQUE (tenant_id, sale_date, line_id))"
    )
    schema = [
        bigquery.SchemaField("tenant_id", "STRING"),
        bigquery.SchemaField("sale_date", "DATE"),
        bigquery.SchemaField("line_id", "STRING"),
        bigquery.SchemaField("amount", "NUMERIC"),
    ]
    bq.create_table(bigquery.Table(f"{PROJECT}.analytics.sales_lines", schema=schema))
    rows = [
        {"tenant_id": SEED_TENANT, "sale_date": date(2025, 3, 1 + i % 28), "line_id": f"L{i}", "amount": Decimal(i)}
        for i in range(345)
    ]
    buf = io.BytesIO()
    arrow_schema = pa.schema(
        [
            ("tenant_id", pa.string()),
            ("sale_date", pa.date32()),
            ("line_id", pa.string()),
            ("amount", pa.decimal128(38, 9)),
        ]
    )
    pq.write_table(pa.Table.from_pylist(rows, schema=arrow_schema), buf)
    buf.seek(0)
    bq.load_table_from_file(
        buf, f"{PROJECT}.analytics.sales_lines", job_config=bigquery.LoadJobConfig(source_format="PARQUET")
    ).result()
    dag = DagBag(dag_folder=str(ROOT / "dags")).get_dag("bigquery_backfill")  # parsed after the registration
    assert "sales_test" in dag.params.get_param("model_type").schema["enum"]

    dr = dag.test(run_conf={"tenant_id": SEED_TENANT, "model_type": "sales_test", "chunk_size": 100})

    assert dr.state == "success"
    [job] = jobs(pg, model_type="sales_test")
    assert job["status"] == "completed" and job["processed_records"] == 345
    landed = pg.execute("SELECT line_id, sale_date, amount FROM sales_lines ORDER BY line_id").fetchall()
    assert landed == sorted((r["line_id"], r["sale_date"], r["amount"]) for r in rows)

"""OpenLineage for a backfill (apache-airflow-providers-openlineage): the finalize task of a completed run reports
the BigQuery source table as its input and the Postgres target table as its output, each with its schema: one output
per completed tenant, its rows as OpenLineage's subset facet (tenant column EQUAL the tenant) and the rows the run
wrote of it as its row count. Dataset names follow OpenLineage's naming spec: BigQuery
`bigquery` / `project.dataset.table`, Postgres `postgres://host:port` / `database.schema.table`.

Imported by the DAG file, so nothing heavy at import time."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from airflow.providers.standard.operators.python import PythonOperator


class FinalizeOperator(PythonOperator):
    """finalize: a PythonOperator (the standard provider's public operator) whose return value (finalize's result)
    also gives the run's lineage, through the OpenLineage provider's operator interface."""

    _result: dict[str, Any] | None = None

    def execute(self, context: Any) -> Any:
        self._result = super().execute(context)
        return self._result

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        result = self._result or task_instance.xcom_pull(task_ids=self.task_id)
        if not result or not result.get("asset_uri"):
            return None  # a dry run, or no completed job: nothing landed
        return run_lineage(result)


def run_lineage(result: dict[str, Any]) -> Any:
    from airflow.providers.common.compat.openlineage.facet import (
        InputDataset,
        OutputDataset,
        OutputStatisticsOutputDatasetFacet,
        SchemaDatasetFacet,
        SchemaDatasetFacetFields,
    )
    from airflow.providers.openlineage.extractors import OperatorLineage
    from openlineage.client.generated.base_subset_dataset import (  # the provider's own client library
        CompareSubsetCondition,
        FieldBaseCompareExpression,
        LiteralCompareExpression,
        OutputSubsetOutputDatasetFacet,
    )

    columns = result.get("columns") or []

    def schema(types: dict[str, str]) -> SchemaDatasetFacet:
        return SchemaDatasetFacet(fields=[SchemaDatasetFacetFields(name=n, type=t) for n, t in types.items()])

    source = InputDataset(
        namespace="bigquery",
        name=result["source_table"],
        facets={"schema": schema({source: bq_type for _, _, source, bq_type in columns})},
    )
    target = urlsplit(result["asset_uri"])
    _, database, pg_schema, table = target.path.split("/")
    tenant_column = result.get("tenant_column") or "tenant_id"
    jobs = result.get("jobs") or [{"tenant_id": result.get("tenant_id"), **result}]
    outputs = []
    for i, job in enumerate(jobs):
        # one dataset: its schema once; each tenant's rows a subset of it, with their own row count
        subset = OutputSubsetOutputDatasetFacet(
            outputCondition=CompareSubsetCondition(
                left=FieldBaseCompareExpression(field=tenant_column),
                right=LiteralCompareExpression(value=str(job["tenant_id"])),
                comparison="EQUAL",
            )
        )
        written = int(job.get("inserted", 0)) + int(job.get("updated", 0))
        outputs.append(
            OutputDataset(
                namespace=f"postgres://{target.netloc}",
                name=f"{database}.{pg_schema}.{table}",
                facets={"schema": schema({name: pg_type for name, pg_type, _, _ in columns})} if i == 0 else {},
                outputFacets={
                    "subset": subset,
                    "outputStatistics": OutputStatisticsOutputDatasetFacet(rowCount=written),
                },
            )
        )
    return OperatorLineage(inputs=[source], outputs=outputs)

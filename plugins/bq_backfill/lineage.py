"""OpenLineage for a backfill (apache-airflow-providers-openlineage): the finalize task of a completed run reports
the BigQuery source table as its input and the Postgres target table as its output, each with its schema, and the
rows the run wrote as the output's row count. Dataset names follow OpenLineage's naming spec: BigQuery
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
    written = int(result.get("inserted", 0)) + int(result.get("updated", 0))
    output = OutputDataset(
        namespace=f"postgres://{target.netloc}",
        name=f"{database}.{pg_schema}.{table}",
        facets={"schema": schema({name: pg_type for name, pg_type, _, _ in columns})},
        outputFacets={"outputStatistics": OutputStatisticsOutputDatasetFacet(rowCount=written)},
    )
    return OperatorLineage(inputs=[source], outputs=[output])

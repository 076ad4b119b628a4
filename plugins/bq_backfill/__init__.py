"""BigQuery -> Postgres backfill: the logic behind the `bigquery_backfill` DAG.

Importable without a running Airflow scheduler; the DAG file only wires these pieces together.
"""

-- Creates the dag run's single job row, or takes it back (a retried or cleared plan): never a second row.
-- The snapshot fields are kept from the first claim so that offsets keep meaning the same rows.
INSERT INTO bigquery_backfill_jobs AS j (
    tenant_id, model_type, status, total_records, processed_records, dag_id, dag_run_id, chunk_size,
    source_table, snapshot_table, snapshot_at, started_at, updated_at
)
VALUES (
    %(tenant_id)s, %(model_type)s, 'running', %(total_records)s, 0, %(dag_id)s, %(dag_run_id)s, %(chunk_size)s,
    %(source_table)s, %(snapshot_table)s, %(snapshot_at)s, now(), now()
)
ON CONFLICT (dag_id, dag_run_id) DO UPDATE
SET status = 'running',
    error_message = NULL,
    completed_at = NULL,
    updated_at = now()
RETURNING id, total_records, chunk_size, source_table, snapshot_table, snapshot_at, (xmax = 0) AS created;

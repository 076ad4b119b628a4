-- Creates the dag run's single job row, or takes it back (a retried or cleared run): never a second row.
-- Claimed by cleanup, in the transaction that deleted the stale jobs, so that from then on the one-active-job index
-- refuses any other job for the tenant+model. The snapshot fields stay empty until plan_chunks records them, and are
-- kept from then on so that offsets keep meaning the same rows.
INSERT INTO bigquery_backfill_jobs AS j (
    tenant_id, model_type, status, processed_records, dag_id, dag_run_id, started_at, updated_at
)
VALUES (%(tenant_id)s, %(model_type)s, 'running', 0, %(dag_id)s, %(dag_run_id)s, now(), now())
ON CONFLICT (dag_id, dag_run_id, tenant_id) DO UPDATE
SET status = 'running',
    error_message = NULL,
    completed_at = NULL,
    updated_at = now()
RETURNING id, tenant_id, status, total_records, chunk_size, source_table, snapshot_table, snapshot_at, model_columns,
          snapshot_offset,
          (xmax = 0) AS created;

-- At most one pending/running job per tenant and model, enforced by the database so that no writer
-- (this DAG, a retry, or the legacy code path) can create a second one.
CREATE UNIQUE INDEX IF NOT EXISTS bigquery_backfill_jobs_one_active
    ON bigquery_backfill_jobs (tenant_id, model_type)
    WHERE status IN ('pending', 'running');

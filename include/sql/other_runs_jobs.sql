-- The tenant+model's unfinished jobs that belong to other dag runs: cleanup deletes them unless their run is alive.
-- Legacy jobs (no dag run) are not listed: the old loop is being replaced, its jobs are always stale.
SELECT id, dag_id, dag_run_id, status, updated_at
FROM bigquery_backfill_jobs
WHERE tenant_id = %(tenant_id)s
  AND model_type = %(model_type)s
  AND status IN ('pending', 'running', 'failed')
  AND dag_run_id IS NOT NULL
  AND (dag_id IS DISTINCT FROM %(dag_id)s OR dag_run_id IS DISTINCT FROM %(dag_run_id)s)
ORDER BY updated_at DESC;

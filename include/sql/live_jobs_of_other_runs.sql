-- Jobs of this DAG for the same tenant+model that belong to another dag run and made progress recently:
-- that run is alive (a concurrent dag.test, or max_active_runs raised), so cleanup must not delete its job.
-- Legacy jobs (no dag run) are always stale: the old loop is being replaced.
SELECT id, dag_run_id, status, updated_at
FROM bigquery_backfill_jobs
WHERE tenant_id = %(tenant_id)s
  AND model_type = %(model_type)s
  AND status IN ('pending', 'running')
  AND dag_run_id IS NOT NULL
  AND (dag_id IS DISTINCT FROM %(dag_id)s OR dag_run_id IS DISTINCT FROM %(dag_run_id)s)
  AND updated_at > now() - make_interval(secs => %(live_seconds)s)
ORDER BY updated_at DESC;

-- A completed job of another run of the same tenant+model whose snapshot is newer than this job's: what it wrote is
-- newer than anything this job could write.
SELECT id, dag_run_id, snapshot_at, completed_at
FROM bigquery_backfill_jobs
WHERE tenant_id = %(tenant_id)s
  AND model_type = %(model_type)s
  AND status = 'completed'
  AND id <> %(job_id)s
  AND snapshot_at > %(snapshot_at)s
ORDER BY snapshot_at DESC
LIMIT 1;

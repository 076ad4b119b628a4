-- For each job: the newest completed job of another run of the same tenant+model whose snapshot is newer than the
-- job's: what it wrote is newer than anything the job could write.
SELECT DISTINCT ON (j.id) j.id AS job_id, n.id, n.dag_run_id, n.snapshot_at, n.completed_at
FROM unnest(%(job_ids)s::uuid[], %(tenant_ids)s::uuid[], %(snapshot_ats)s::timestamptz[])
     AS j (id, tenant_id, snapshot_at)
JOIN bigquery_backfill_jobs n
  ON n.tenant_id = j.tenant_id
 AND n.model_type = %(model_type)s
 AND n.status = 'completed'
 AND n.id <> j.id
 AND n.snapshot_at > j.snapshot_at
ORDER BY j.id, n.snapshot_at DESC;

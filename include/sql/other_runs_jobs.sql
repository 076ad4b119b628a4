-- The tenants' (for one model) unfinished jobs that belong to other dag runs, or to no dag run (the old loop's): cleanup
-- deletes them unless they are alive. `recent`: the job or its progress changed within %(live_seconds)s seconds
-- (by the database's clock, whatever the workers' clocks say).
SELECT j.id, j.tenant_id, j.dag_id, j.dag_run_id, j.status, a.last_activity,
       a.last_activity > now() - make_interval(secs => %(live_seconds)s) AS recent
FROM bigquery_backfill_jobs j
CROSS JOIN LATERAL (
    -- the old loop inserts a new job row on each continue: its rows count from their creation too
    SELECT greatest(j.updated_at, CASE WHEN j.dag_run_id IS NULL THEN j.created_at END,
                    (SELECT max(p.updated_at) FROM backfill_source_progress p WHERE p.job_id = j.id)) AS last_activity
) a
WHERE j.tenant_id = ANY(%(tenant_ids)s::uuid[])
  AND j.model_type = %(model_type)s
  AND j.status IN ('pending', 'running', 'failed')
  AND (j.dag_id IS DISTINCT FROM %(dag_id)s OR j.dag_run_id IS DISTINCT FROM %(dag_run_id)s)
ORDER BY j.tenant_id, a.last_activity DESC;

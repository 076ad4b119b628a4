-- For each job: jobs of the old loop (no dag run) of its tenant+model that were created or changed, or whose
-- progress changed, since the job started: the old loop ran meanwhile and may have written rows over the run's.
SELECT j.id AS job_id, l.id, l.status, a.last_activity
FROM bigquery_backfill_jobs j
JOIN bigquery_backfill_jobs l
  ON l.tenant_id = j.tenant_id AND l.model_type = j.model_type AND l.dag_run_id IS NULL
CROSS JOIN LATERAL (
    SELECT greatest(l.created_at, l.updated_at,
                    (SELECT max(p.updated_at) FROM backfill_source_progress p WHERE p.job_id = l.id)) AS last_activity
) a
WHERE j.id = ANY(%(job_ids)s::uuid[])
  AND a.last_activity >= j.started_at
ORDER BY j.id, a.last_activity DESC;

-- Deletes the tenants' (for one model) stale backfill jobs and their progress rows: every pending, running or failed job
-- that does not belong to the current dag run. Completed jobs stay as history; the target table is never touched.
-- Chunk and quarantine rows of a deleted job go with it (ON DELETE CASCADE).
WITH stale AS (
    SELECT id, status
    FROM bigquery_backfill_jobs
    WHERE tenant_id = ANY(%(tenant_ids)s::uuid[])
      AND model_type = %(model_type)s
      AND status IN ('pending', 'running', 'failed')
      AND (dag_id IS DISTINCT FROM %(dag_id)s OR dag_run_id IS DISTINCT FROM %(dag_run_id)s)
      -- an old-loop job that changed since it was judged stale stays (re-checked on the locked row): the run's
      -- finalize then finds it (legacy_jobs_during_run.sql)
      AND NOT (dag_run_id IS NULL AND status <> 'failed'
               AND greatest(updated_at, created_at) > now() - make_interval(secs => %(live_seconds)s))
    FOR UPDATE
),
deleted_progress AS (
    DELETE FROM backfill_source_progress p
    USING stale
    WHERE p.job_id = stale.id
    RETURNING p.job_id
),
deleted_jobs AS (
    DELETE FROM bigquery_backfill_jobs j
    USING stale
    WHERE j.id = stale.id
    RETURNING j.id, j.tenant_id, j.status
)
-- by tenant: those with nothing deleted have no row
SELECT d.tenant_id,
       count(*)                                      AS jobs_deleted,
       count(*) FILTER (WHERE d.status = 'pending')  AS pending_deleted,
       count(*) FILTER (WHERE d.status = 'running')  AS running_deleted,
       count(*) FILTER (WHERE d.status = 'failed')   AS failed_deleted,
       coalesce(sum(p.rows), 0)                      AS progress_deleted
FROM deleted_jobs d
LEFT JOIN (SELECT job_id, count(*) AS rows FROM deleted_progress GROUP BY job_id) p ON p.job_id = d.id
GROUP BY d.tenant_id;

WITH job AS (
    UPDATE bigquery_backfill_jobs
    SET status = 'completed', completed_at = now(), updated_at = now(), error_message = NULL
    WHERE id = %(job_id)s
    RETURNING id
)
UPDATE backfill_source_progress p
SET status = 'completed', updated_at = now()
FROM job
WHERE p.job_id = job.id;

WITH job AS (
    UPDATE bigquery_backfill_jobs
    SET status = 'completed', completed_at = now(), updated_at = now(), error_message = NULL,
        missing_from_source = %(missing_from_source)s, deleted_records = %(deleted_records)s
    WHERE id = %(job_id)s
    RETURNING id
)
UPDATE backfill_source_progress p
SET status = 'completed', updated_at = now()
FROM job
WHERE p.job_id = job.id;

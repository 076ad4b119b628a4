-- Marks the run's job failed (and, for a chunk task, that chunk), keeping what went wrong for the Admin UI.
-- A completed job stays completed. With no chunk index (-1) only the job is marked.
WITH job AS (
    UPDATE bigquery_backfill_jobs
    SET status = 'failed', error_message = %(error_message)s, updated_at = now()
    WHERE dag_id = %(dag_id)s AND dag_run_id = %(dag_run_id)s AND status <> 'completed'
    RETURNING id
),
chunk AS (
    UPDATE backfill_chunks c
    SET status = 'failed', error_message = %(error_message)s
    FROM job
    WHERE c.job_id = job.id AND c.chunk_index = %(chunk_index)s AND c.status <> 'done'
)
UPDATE backfill_source_progress p
SET status = 'failed', updated_at = now()
FROM job
WHERE p.job_id = job.id;

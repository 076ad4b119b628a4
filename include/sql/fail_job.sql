-- Marks the run's jobs failed (and, for a chunk task, that chunk of each), keeping what went wrong for the Admin UI:
-- every job of the run, or the one job_id, or (a chunk index >= 0) those whose part of that chunk is not done.
-- A completed job stays completed. With no chunk index (-1) only the jobs are marked.
WITH job AS (
    UPDATE bigquery_backfill_jobs
    SET status = 'failed', error_message = %(error_message)s, updated_at = now()
    WHERE dag_id = %(dag_id)s AND dag_run_id = %(dag_run_id)s AND status <> 'completed'
      AND (%(job_id)s::uuid IS NULL OR id = %(job_id)s::uuid)
      AND (%(chunk_index)s::integer < 0 OR EXISTS (
          SELECT 1 FROM backfill_chunks c
          WHERE c.job_id = bigquery_backfill_jobs.id AND c.chunk_index = %(chunk_index)s AND c.status <> 'done'))
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

-- The source columns the run ignores (no model column reads them), on the run's job.
UPDATE bigquery_backfill_jobs
SET ignored_source_columns = %(columns)s, updated_at = now()
WHERE id = %(job_id)s;

-- The model's columns as cleanup resolved them, and the source columns the run ignores (no model column reads them),
-- on the run's job.
UPDATE bigquery_backfill_jobs
SET model_columns = %(model_columns)s, ignored_source_columns = %(ignored)s, updated_at = now()
WHERE id = %(job_id)s;

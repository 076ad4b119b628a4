INSERT INTO backfill_source_progress (job_id, source_table, status)
VALUES (%(job_id)s, %(source_table)s, 'running')
ON CONFLICT (job_id, source_table) DO UPDATE SET status = 'running', updated_at = now();

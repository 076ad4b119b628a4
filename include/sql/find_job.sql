SELECT id, tenant_id, model_type, status, total_records, processed_records, chunk_size, source_table,
       snapshot_table, snapshot_at, target_snapshot, error_message, model_columns, snapshot_offset
FROM bigquery_backfill_jobs
WHERE id = ANY(%(job_ids)s::uuid[]);

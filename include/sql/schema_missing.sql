-- What a run needs of the ledger tables, checked in the catalog before each run, which runs no DDL: anything missing
-- fails the run, naming it and the setup DAG (bigquery_backfill_setup) that creates it. Kept equal to what
-- schema.sql creates by tests/test_schema_and_cleanup.py. (The target table is checked against its model:
-- target_shape.sql.)
WITH needed (kind, table_name, name) AS (
    VALUES
    ('column', 'bigquery_backfill_jobs', 'id'),
    ('column', 'bigquery_backfill_jobs', 'tenant_id'),
    ('column', 'bigquery_backfill_jobs', 'model_type'),
    ('column', 'bigquery_backfill_jobs', 'status'),
    ('column', 'bigquery_backfill_jobs', 'total_records'),
    ('column', 'bigquery_backfill_jobs', 'processed_records'),
    ('column', 'bigquery_backfill_jobs', 'created_at'),
    ('column', 'bigquery_backfill_jobs', 'updated_at'),
    ('column', 'bigquery_backfill_jobs', 'dag_id'),
    ('column', 'bigquery_backfill_jobs', 'dag_run_id'),
    ('column', 'bigquery_backfill_jobs', 'chunk_size'),
    ('column', 'bigquery_backfill_jobs', 'source_table'),
    ('column', 'bigquery_backfill_jobs', 'snapshot_table'),
    ('column', 'bigquery_backfill_jobs', 'snapshot_at'),
    ('column', 'bigquery_backfill_jobs', 'rejected_records'),
    ('column', 'bigquery_backfill_jobs', 'started_at'),
    ('column', 'bigquery_backfill_jobs', 'completed_at'),
    ('column', 'bigquery_backfill_jobs', 'error_message'),
    ('column', 'bigquery_backfill_jobs', 'rounded_records'),
    ('column', 'bigquery_backfill_jobs', 'target_snapshot'),
    ('column', 'bigquery_backfill_jobs', 'missing_from_source'),
    ('column', 'bigquery_backfill_jobs', 'deleted_records'),
    ('column', 'backfill_source_progress', 'id'),
    ('column', 'backfill_source_progress', 'job_id'),
    ('column', 'backfill_source_progress', 'source_table'),
    ('column', 'backfill_source_progress', 'last_offset'),
    ('column', 'backfill_source_progress', 'records_synced'),
    ('column', 'backfill_source_progress', 'status'),
    ('column', 'backfill_source_progress', 'updated_at'),
    ('column', 'backfill_chunks', 'job_id'),
    ('column', 'backfill_chunks', 'chunk_index'),
    ('column', 'backfill_chunks', 'start_offset'),
    ('column', 'backfill_chunks', 'end_offset'),
    ('column', 'backfill_chunks', 'status'),
    ('column', 'backfill_chunks', 'error_message'),
    ('column', 'backfill_chunks', 'rows_read'),
    ('column', 'backfill_chunks', 'rows_inserted'),
    ('column', 'backfill_chunks', 'rows_updated'),
    ('column', 'backfill_chunks', 'rows_unchanged'),
    ('column', 'backfill_chunks', 'rows_duplicate'),
    ('column', 'backfill_chunks', 'rows_rejected'),
    ('column', 'backfill_chunks', 'completed_at'),
    ('column', 'backfill_chunks', 'read_seconds'),
    ('column', 'backfill_chunks', 'write_seconds'),
    ('column', 'backfill_chunks', 'write_path'),
    ('column', 'backfill_chunks', 'rows_rounded'),
    ('column', 'backfill_quarantine', 'id'),
    ('column', 'backfill_quarantine', 'job_id'),
    ('column', 'backfill_quarantine', 'chunk_index'),
    ('column', 'backfill_quarantine', 'source_offset'),
    ('column', 'backfill_quarantine', 'reason'),
    ('column', 'backfill_quarantine', 'row_data'),
    ('column', 'backfill_quarantine', 'created_at'),
    ('column', 'backfill_range_proofs', 'tenant_id'),
    ('column', 'backfill_range_proofs', 'model_type'),
    ('column', 'backfill_range_proofs', 'digest'),
    ('column', 'backfill_range_proofs', 'row_count'),
    ('column', 'backfill_range_proofs', 'row_versions'),
    ('column', 'backfill_range_proofs', 'job_id'),
    ('column', 'backfill_range_proofs', 'recorded_at'),
    ('index', 'bigquery_backfill_jobs', 'bigquery_backfill_jobs_dag_run'),
    ('index', 'bigquery_backfill_jobs', 'bigquery_backfill_jobs_one_active_run'),
    ('index', 'bigquery_backfill_jobs', 'bigquery_backfill_jobs_pkey'),
    ('index', 'backfill_source_progress', 'backfill_source_progress_job_source'),
    ('index', 'backfill_source_progress', 'backfill_source_progress_pkey'),
    ('index', 'backfill_chunks', 'backfill_chunks_pkey'),
    ('index', 'backfill_quarantine', 'backfill_quarantine_job'),
    ('index', 'backfill_quarantine', 'backfill_quarantine_pkey'),
    ('index', 'backfill_range_proofs', 'backfill_range_proofs_pkey')
)
SELECT kind, table_name, name
FROM needed n
WHERE CASE n.kind
    WHEN 'column' THEN NOT EXISTS (
        SELECT 1 FROM pg_attribute a
        WHERE a.attrelid = to_regclass(n.table_name) AND a.attname = n.name AND a.attnum > 0 AND NOT a.attisdropped)
    ELSE to_regclass(n.name) IS NULL
END;

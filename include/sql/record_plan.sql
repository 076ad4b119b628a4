-- Records the snapshot a job reads, once: a job's snapshot and chunking never change after this.
UPDATE bigquery_backfill_jobs
SET total_records = %(total_records)s,
    chunk_size = %(chunk_size)s,
    source_table = %(source_table)s,
    snapshot_table = %(snapshot_table)s,
    snapshot_at = %(snapshot_at)s,
    target_snapshot = %(target_snapshot)s,
    estimated_bytes = %(estimated_bytes)s,
    duplicate_source_rows = %(duplicate_source_rows)s,
    snapshot_offset = %(snapshot_offset)s,
    updated_at = now()
WHERE id = %(job_id)s AND snapshot_table IS NULL
RETURNING id, tenant_id, status, total_records, chunk_size, source_table, snapshot_table, snapshot_at,
          target_snapshot, model_columns, snapshot_offset;

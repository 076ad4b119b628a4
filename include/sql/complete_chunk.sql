-- Records one chunk as done, in the same transaction as its rows: progress can never run ahead of the data.
WITH chunk AS (
    UPDATE backfill_chunks
    SET status = 'done', rows_read = %(read)s, rows_inserted = %(inserted)s, rows_updated = %(updated)s,
        rows_unchanged = %(unchanged)s, rows_duplicate = %(duplicate)s, rows_rejected = %(rejected)s,
        rows_rounded = %(rounded)s,
        read_seconds = %(read_seconds)s, write_seconds = %(write_seconds)s, write_path = %(write_path)s,
        key_proof = %(key_proof)s,
        completed_at = now(), error_message = NULL
    WHERE job_id = %(job_id)s AND chunk_index = %(chunk_index)s AND status <> 'done'
    RETURNING job_id
),
others AS (
    SELECT EXISTS (
        SELECT 1 FROM backfill_chunks c
        WHERE c.job_id = %(job_id)s AND c.status = 'failed' AND c.chunk_index <> %(chunk_index)s
    ) AS failed
),
job AS (
    UPDATE bigquery_backfill_jobs j
    SET processed_records = j.processed_records + %(read)s,
        rejected_records = j.rejected_records + %(rejected)s,
        rounded_records = j.rounded_records + %(rounded)s,
        updated_at = now(),
        -- A cleared chunk that now succeeds puts its failed job back to running, unless another chunk is still
        -- failed; a sibling finishing after a failure leaves the job failed.
        status = CASE WHEN j.status = 'failed' AND others.failed THEN 'failed' ELSE 'running' END,
        error_message = CASE WHEN j.status = 'failed' AND others.failed THEN j.error_message END
    FROM chunk, others
    WHERE j.id = chunk.job_id
    RETURNING j.processed_records, j.total_records
)
SELECT processed_records, total_records FROM job;

SELECT chunk_index, start_offset, end_offset, status, error_message
FROM backfill_chunks
WHERE job_id = %(job_id)s AND status <> 'done'
ORDER BY chunk_index;

SELECT job_id, chunk_index, start_offset, end_offset
FROM backfill_chunks
WHERE job_id = ANY(%(job_ids)s::uuid[]) AND status <> 'done'
ORDER BY job_id, chunk_index;

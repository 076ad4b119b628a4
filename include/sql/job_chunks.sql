-- The jobs' chunk rows, in chunk order; the key proof (bq_backfill.chunk_proofs) of those done that recorded one.
SELECT job_id, chunk_index, start_offset, end_offset, status, error_message, rows_read,
       CASE WHEN status = 'done' THEN key_proof END AS key_proof
FROM backfill_chunks
WHERE job_id = ANY(%(job_ids)s::uuid[])
ORDER BY job_id, chunk_index;

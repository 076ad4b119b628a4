-- The job's done chunks that recorded a key proof (bq_backfill.chunk_proofs), by first offset.
SELECT start_offset, rows_read, key_proof
FROM backfill_chunks
WHERE job_id = %(job_id)s AND status = 'done' AND key_proof IS NOT NULL;

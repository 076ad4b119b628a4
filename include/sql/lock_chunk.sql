-- Held until the chunk's transaction ends: a second attempt at the same chunk waits, then sees it done.
SELECT status FROM backfill_chunks
WHERE job_id = %(job_id)s AND chunk_index = %(chunk_index)s
FOR UPDATE;

-- Held until the chunk's transaction ends: a second attempt at the same chunk waits, then sees it done. In job order,
-- so two attempts at one chunk lock its rows in the same order.
SELECT job_id, status FROM backfill_chunks
WHERE job_id = ANY(%(job_ids)s::uuid[]) AND chunk_index = %(chunk_index)s
ORDER BY job_id
FOR UPDATE;

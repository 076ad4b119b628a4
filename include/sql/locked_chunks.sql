-- How many of each job's chunks are locked right now: each chunk's transaction holds its row from start to commit,
-- so a locked chunk is one being written at this moment (its lock goes when its session ends, however it ends).
WITH free AS (
    SELECT job_id, chunk_index FROM backfill_chunks
    WHERE job_id = ANY(%(job_ids)s::uuid[])
    FOR UPDATE SKIP LOCKED
)
SELECT c.job_id, count(*) - count(f.chunk_index) AS locked
FROM backfill_chunks c
LEFT JOIN free f ON f.job_id = c.job_id AND f.chunk_index = c.chunk_index
WHERE c.job_id = ANY(%(job_ids)s::uuid[])
GROUP BY c.job_id;

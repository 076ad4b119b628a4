-- How many of a job's chunks are locked right now: each chunk's transaction holds its row from start to commit, so a
-- locked chunk is one being written at this moment (its lock goes when its session ends, however it ends).
SELECT (SELECT count(*) FROM backfill_chunks WHERE job_id = %(job_id)s)
     - (SELECT count(*) FROM (
            SELECT 1 FROM backfill_chunks WHERE job_id = %(job_id)s FOR UPDATE SKIP LOCKED
        ) AS free) AS locked;

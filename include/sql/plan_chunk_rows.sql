-- One row per chunk of the job's snapshot; existing rows (done or not) are kept as they are.
INSERT INTO backfill_chunks (job_id, chunk_index, start_offset, end_offset)
SELECT %(job_id)s, i, i::bigint * %(chunk_size)s, least((i::bigint + 1) * %(chunk_size)s, %(total)s)
FROM generate_series(0, %(chunk_count)s - 1) AS i
ON CONFLICT (job_id, chunk_index) DO NOTHING;

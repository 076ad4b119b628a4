-- One row per chunk of the job's snapshot; existing rows (done or not) are kept as they are.
INSERT INTO backfill_chunks (job_id, chunk_index, start_offset, end_offset)
SELECT %(job_id)s, i, greatest(i::bigint * %(chunk_size)s::bigint, %(first_offset)s::bigint),
       least((i::bigint + 1) * %(chunk_size)s::bigint, %(first_offset)s::bigint + %(total)s::bigint)
FROM generate_series(%(first_chunk)s::integer, %(last_chunk)s::integer) AS i
ON CONFLICT (job_id, chunk_index) DO NOTHING;

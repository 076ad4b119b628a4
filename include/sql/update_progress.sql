-- last_offset: every source row before it has landed (chunks may finish out of order).
UPDATE backfill_source_progress p
SET records_synced = p.records_synced + %(read)s,
    last_offset = coalesce(
        (SELECT min(start_offset) FROM backfill_chunks c WHERE c.job_id = p.job_id AND c.status <> 'done'),
        (SELECT max(end_offset) FROM backfill_chunks c WHERE c.job_id = p.job_id),
        0),
    status = 'running',
    updated_at = now()
WHERE p.job_id = %(job_id)s;

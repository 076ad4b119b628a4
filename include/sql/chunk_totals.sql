-- Each job's chunk counts, summed, and its rows in backfill_quarantine.
SELECT j.id                                            AS job_id,
       count(c.chunk_index)                            AS chunks,
       coalesce(sum(c.rows_read), 0)                   AS read,
       coalesce(sum(c.rows_inserted), 0)               AS inserted,
       coalesce(sum(c.rows_updated), 0)                AS updated,
       coalesce(sum(c.rows_unchanged), 0)              AS unchanged,
       coalesce(sum(c.rows_duplicate), 0)              AS duplicate,
       coalesce(sum(c.rows_rejected), 0)               AS rejected,
       coalesce(sum(c.rows_rounded), 0)                AS rounded,
       coalesce(min(q.quarantined), 0)                 AS quarantined
FROM unnest(%(job_ids)s::uuid[]) AS j (id)
LEFT JOIN backfill_chunks c ON c.job_id = j.id
LEFT JOIN (
    SELECT job_id, count(*) AS quarantined FROM backfill_quarantine
    WHERE job_id = ANY(%(job_ids)s::uuid[]) GROUP BY job_id
) q ON q.job_id = j.id
GROUP BY j.id;

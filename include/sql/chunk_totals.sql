SELECT count(*)                                        AS chunks,
       coalesce(sum(rows_read), 0)                     AS read,
       coalesce(sum(rows_inserted), 0)                 AS inserted,
       coalesce(sum(rows_updated), 0)                  AS updated,
       coalesce(sum(rows_unchanged), 0)                AS unchanged,
       coalesce(sum(rows_duplicate), 0)                AS duplicate,
       coalesce(sum(rows_rejected), 0)                 AS rejected,
       coalesce(sum(rows_rounded), 0)                  AS rounded,
       (SELECT count(*) FROM backfill_quarantine q WHERE q.job_id = %(job_id)s) AS quarantined
FROM backfill_chunks
WHERE job_id = %(job_id)s;

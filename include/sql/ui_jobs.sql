-- The Backfills page: the latest jobs (at most %(limit)s, optionally of one tenant, of one dag run, in one status),
-- each with its chunks' progress and write paths and its quarantine reasons. Reads the ledger tables only, each by an
-- index: never a target.
SELECT j.id::text AS id, j.tenant_id::text AS tenant_id, j.model_type, j.status, j.total_records, j.processed_records,
       j.rejected_records, j.error_message, j.snapshot_at, j.started_at, j.completed_at, j.created_at, j.updated_at,
       j.dag_id, j.dag_run_id, j.chunk_size, j.estimated_bytes,
       c.chunks_total, c.chunks_done, c.chunks_failed, c.paths, q.reasons
FROM (
    SELECT * FROM bigquery_backfill_jobs
    WHERE (%(tenant_id)s::uuid IS NULL OR tenant_id = %(tenant_id)s::uuid)
      AND (%(dag_run_id)s::text IS NULL OR (dag_id = %(dag_id)s AND dag_run_id = %(dag_run_id)s::text))
      AND (%(status)s::text IS NULL OR status = %(status)s::text)
    ORDER BY created_at DESC
    LIMIT %(limit)s
) j
LEFT JOIN LATERAL (
    SELECT count(*) AS chunks_total,
           count(*) FILTER (WHERE status = 'done') AS chunks_done,
           count(*) FILTER (WHERE status = 'failed') AS chunks_failed,
           array_remove(array_agg(DISTINCT write_path), NULL) AS paths
    FROM backfill_chunks WHERE job_id = j.id
) c ON true
LEFT JOIN LATERAL (
    SELECT jsonb_agg(jsonb_build_object('reason', reason, 'rows', n) ORDER BY n DESC) AS reasons
    FROM (
        SELECT reason, count(*) AS n FROM backfill_quarantine WHERE job_id = j.id
        GROUP BY reason ORDER BY count(*) DESC LIMIT 10
    ) r
) q ON true
ORDER BY j.created_at DESC;

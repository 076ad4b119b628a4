-- The Backfills page: the latest dag runs (at most %(limit)s), each with its fleet's jobs counted by status, its rows
-- and its timing. Bounded whatever the ledger holds: the latest jobs by creation time (an index), at most 50,000 (five
-- runs of the largest fleet), then each run's jobs by the run's own index.
WITH runs AS (
    SELECT dag_id, dag_run_id, max(created_at) AS created_at
    FROM (
        SELECT dag_id, dag_run_id, created_at FROM bigquery_backfill_jobs
        WHERE dag_id = %(dag_id)s AND dag_run_id IS NOT NULL
        ORDER BY created_at DESC
        LIMIT 50000
    ) recent
    GROUP BY dag_id, dag_run_id
    ORDER BY max(created_at) DESC
    LIMIT %(limit)s
)
SELECT r.dag_id, r.dag_run_id, min(j.model_type) AS model_type, count(*) AS tenants,
       count(*) FILTER (WHERE j.status = 'completed') AS completed,
       count(*) FILTER (WHERE j.status = 'running') AS running,
       count(*) FILTER (WHERE j.status = 'failed') AS failed,
       count(*) FILTER (WHERE j.status = 'pending') AS pending,
       sum(j.total_records)::bigint AS total_records, coalesce(sum(j.processed_records), 0)::bigint AS processed_records,
       min(j.started_at) AS started_at, max(j.completed_at) AS completed_at, max(j.updated_at) AS updated_at,
       min(j.snapshot_at) AS snapshot_at
FROM runs r
JOIN bigquery_backfill_jobs j ON j.dag_id = r.dag_id AND j.dag_run_id = r.dag_run_id
GROUP BY r.dag_id, r.dag_run_id, r.created_at
ORDER BY r.created_at DESC;

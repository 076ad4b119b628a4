-- Tenant+model pairs that still hold more than one pending/running job (they block the one-active-job index).
SELECT tenant_id, model_type, count(*) AS active_jobs
FROM bigquery_backfill_jobs
WHERE status IN ('pending', 'running')
GROUP BY tenant_id, model_type
HAVING count(*) > 1
ORDER BY active_jobs DESC, tenant_id, model_type;

-- Serialises cleanups of each tenant+model until the transaction ends: a second run's cleanup waits, then sees the
-- first run's job claimed. Taken in tenant order, so two cleanups of overlapping fleets cannot deadlock.
SELECT count(pg_advisory_xact_lock(hashtextextended(t.tenant_id || '/' || %(model_type)s, 0)))
FROM (SELECT tenant_id FROM unnest(%(tenant_ids)s::text[]) AS u (tenant_id) ORDER BY tenant_id) AS t;

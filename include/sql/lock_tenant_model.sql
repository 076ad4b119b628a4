-- Serialises cleanups of one tenant+model until the transaction ends: a second run's cleanup waits, then sees the
-- first run's job claimed.
SELECT pg_advisory_xact_lock(hashtextextended(%(tenant_id)s || '/' || %(model_type)s, 0));

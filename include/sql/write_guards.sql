-- The user triggers that fire on this session's writes of the target for the events in %(events)s (a mask of
-- pg_trigger.tgtype's bits: 4 INSERT, 8 DELETE, 16 UPDATE), as session_replication_role decides which fire.
SELECT array_agg(g.tgname::text ORDER BY g.tgname) AS triggers
FROM pg_trigger g
WHERE g.tgrelid = to_regclass(%(target_table)s)
  AND NOT g.tgisinternal
  AND g.tgtype & %(events)s <> 0
  AND (g.tgenabled = 'A'
       OR (g.tgenabled = 'O' AND current_setting('session_replication_role') <> 'replica')
       OR (g.tgenabled = 'R' AND current_setting('session_replication_role') = 'replica'));

-- The user triggers that fire on this session's INSERT or UPDATE of the target (as session_replication_role
-- decides which fire), and its enabled rules.
SELECT
    (SELECT array_agg(g.tgname::text ORDER BY g.tgname)
     FROM pg_trigger g
     WHERE g.tgrelid = to_regclass(%(target_table)s)
       AND NOT g.tgisinternal
       AND g.tgtype & (4 | 16) <> 0  -- TRIGGER_TYPE_INSERT | TRIGGER_TYPE_UPDATE
       AND (g.tgenabled = 'A'
            OR (g.tgenabled = 'O' AND current_setting('session_replication_role') <> 'replica')
            OR (g.tgenabled = 'R' AND current_setting('session_replication_role') = 'replica'))) AS triggers,
    (SELECT array_agg(r.rulename::text ORDER BY r.rulename)
     FROM pg_rewrite r
     WHERE r.ev_class = to_regclass(%(target_table)s) AND r.rulename <> '_RETURN' AND r.ev_enabled <> 'D') AS rules;

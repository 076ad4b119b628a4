-- For each of the run's tables: whether row-level security applies to the current role, and the table's enabled
-- rules (a view's own _RETURN rule aside).
SELECT c.oid::regclass::text AS table_name,
       current_user::text AS role_name,
       row_security_active(c.oid) AS rls_active,
       (SELECT array_agg(r.rulename::text ORDER BY r.rulename)
        FROM pg_rewrite r
        WHERE r.ev_class = c.oid AND r.rulename <> '_RETURN' AND r.ev_enabled <> 'D') AS rules
FROM pg_class c
WHERE c.oid = ANY (SELECT to_regclass(t) FROM unnest(%(tables)s::text[]) AS t)
ORDER BY 1;

-- The target table's columns as the catalog has them: a model's columns and types come from here (models.resolve).
-- An identity column BY DEFAULT has a default; one ALWAYS, or a generated column, cannot be written.
SELECT a.attname::text AS name,
       format_type(a.atttypid, a.atttypmod) AS pg_type,
       a.atthasdef OR a.attidentity = 'd' AS has_default,
       a.attgenerated <> '' OR a.attidentity = 'a' AS generated
FROM pg_attribute a
WHERE a.attrelid = to_regclass(%(target_table)s) AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum;

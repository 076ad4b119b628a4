-- Model columns whose type (with its modifier, e.g. numeric(18,4)) differs from the target column's, both spelled
-- by format_type. %(model_table)s is a temp table declared with the model's types.
SELECT m.attname::text AS column_name,
       format_type(m.atttypid, m.atttypmod) AS model_type,
       format_type(t.atttypid, t.atttypmod) AS target_type
FROM pg_attribute m
JOIN pg_attribute t
  ON t.attrelid = to_regclass(%(target_table)s) AND t.attname = m.attname AND t.attnum > 0 AND NOT t.attisdropped
WHERE m.attrelid = to_regclass(%(model_table)s) AND m.attnum > 0 AND NOT m.attisdropped
  AND (m.atttypid, m.atttypmod) IS DISTINCT FROM (t.atttypid, t.atttypmod)
ORDER BY m.attnum;

-- The target table's columns, and the column sets of its unique, non-partial indexes (what ON CONFLICT needs).
SELECT 'column' AS kind, a.attname::text AS name, NULL::text[] AS key_columns
FROM pg_attribute a
WHERE a.attrelid = to_regclass(%(target_table)s) AND a.attnum > 0 AND NOT a.attisdropped
UNION ALL
SELECT 'unique', i.indexrelid::regclass::text,
       (SELECT array_agg(a.attname::text ORDER BY a.attname)
        FROM pg_attribute a WHERE a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey))
FROM pg_index i
WHERE i.indrelid = to_regclass(%(target_table)s) AND i.indisunique AND i.indpred IS NULL AND i.indisvalid;

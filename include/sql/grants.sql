-- The privileges of the role backfill runs connect as, and nothing more (applied by the setup step, as the tables'
-- owner). {role}, {database}, {schema}, {tables} and {ledger} are identifiers filled in by bq_backfill.setup; the
-- targets' own grants are grant_targets.sql.
-- Whatever the role held on these tables before is revoked first, so the result is exactly this.
REVOKE ALL ON {tables} FROM {role};
GRANT CONNECT, TEMPORARY ON DATABASE {database} TO {role};      -- TEMP: each slice is staged in a temp table
GRANT USAGE ON SCHEMA {schema} TO {role};
GRANT SELECT, INSERT, UPDATE, DELETE ON {ledger} TO {role};    -- jobs, progress, chunks, quarantine, range proofs

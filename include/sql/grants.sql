-- The privileges of the role backfill runs connect as, and nothing more (applied by the setup step, as the tables'
-- owner). {role}, {database}, {schema}, {ledger} and {targets} are identifiers filled in by bq_backfill.setup.
-- Whatever the role held on these tables before is revoked first, so the result is exactly this.
REVOKE ALL ON {ledger}, {targets} FROM {role};
GRANT CONNECT, TEMPORARY ON DATABASE {database} TO {role};      -- TEMP: each slice is staged in a temp table
GRANT USAGE ON SCHEMA {schema} TO {role};
GRANT SELECT, INSERT, UPDATE, DELETE ON {ledger} TO {role};    -- jobs, progress, chunks, quarantine, range proofs
GRANT SELECT, INSERT, UPDATE ON {targets} TO {role};           -- upserts; DELETE only with delete_missing (below)

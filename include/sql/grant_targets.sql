-- What a run needs on the declared models' target tables ({targets}, {role}: identifiers filled in by
-- bq_backfill.setup): upserts; DELETE only with delete_missing (setup's grant_delete).
GRANT SELECT, INSERT, UPDATE ON {targets} TO {role};

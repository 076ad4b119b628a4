-- The target database of the backfill, next to Airflow's own metadata database (POSTGRES_DB=airflow).
CREATE DATABASE backfill;
-- The role every backfill run connects as: the setup step (airflow-init) grants it exactly what a run needs.
CREATE ROLE backfill_writer LOGIN PASSWORD 'backfill_writer';

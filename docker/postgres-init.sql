-- The target database of the backfill, next to Airflow's own metadata database (POSTGRES_DB=airflow).
CREATE DATABASE backfill;

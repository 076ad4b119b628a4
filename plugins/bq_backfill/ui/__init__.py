"""The Backfills page: a FastAPI app the Airflow api-server mounts (the plugin: bq_backfill.ui.plugin)."""

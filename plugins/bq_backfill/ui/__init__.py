"""The Backfills page: a FastAPI app the Airflow api-server mounts (see plugins/backfills_plugin.py)."""

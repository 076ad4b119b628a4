"""The Backfills page, for deployments that copy the plugins folder (Cloud Composer's bucket, MWAA's plugins.zip).
An installed package registers the same plugin through its `airflow.plugins` entry point; Airflow loads it once."""

from bq_backfill.ui.plugin import BackfillsPlugin

__all__ = ["BackfillsPlugin"]

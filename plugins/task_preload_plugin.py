"""Task modules preloaded before the scheduler forks (bq_backfill.preload), for deployments that copy the plugins
folder. An installed package registers the same plugin through its `airflow.plugins` entry point."""

from bq_backfill.preload import TaskPreloadPlugin

__all__ = ["TaskPreloadPlugin"]

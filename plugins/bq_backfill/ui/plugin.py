"""Airflow plugin: the "Backfills" page of the bigquery_backfill DAG, in the UI's navigation.

Registered by the installed package's `airflow.plugins` entry point, or found by Airflow in a deployed plugins
folder (plugins/backfills_plugin.py imports it from here). Off with `[bigquery_backfill] backfills_page = False`:
the plugin then adds nothing to the api-server or the navigation; the DAG never needs it."""

from __future__ import annotations

from typing import ClassVar

from airflow.configuration import conf
from airflow.plugins_manager import AirflowPlugin

ENABLED = conf.getboolean("bigquery_backfill", "backfills_page", fallback=True)


class _LazyApp:
    """The FastAPI app, built when the api-server first asks for it (workers load plugins too and never serve it)."""

    def __init__(self) -> None:
        self._app = None

    async def __call__(self, scope, receive, send) -> None:
        if self._app is None:
            from bq_backfill.ui.app import create_app

            self._app = create_app()
        await self._app(scope, receive, send)


class BackfillsPlugin(AirflowPlugin):
    name = "bigquery_backfill"
    fastapi_apps: ClassVar[list[dict]] = (
        [{"app": _LazyApp(), "url_prefix": "/backfills", "name": "Backfills"}] if ENABLED else []
    )
    external_views: ClassVar[list[dict]] = (
        [
            {
                "name": "Backfills",
                "href": "/backfills/",
                "destination": "nav",
                "url_route": "backfills",
                "category": "browse",
            }
        ]
        if ENABLED
        else []
    )

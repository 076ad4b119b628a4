"""An auth manager for the end-to-end stack: Airflow's simple auth manager, plus users who may not read chosen DAGs
(as FAB's or Keycloak's per-DAG permissions allow). `DAG_SCOPED_AUTH_DENY` lists `user:dag_id` pairs refused; every
other decision is the simple auth manager's."""

from __future__ import annotations

import os
from typing import Any

from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager


def _denied() -> set[tuple[str, str]]:
    pairs = (p.split(":", 1) for p in os.environ.get("DAG_SCOPED_AUTH_DENY", "").split(",") if ":" in p)
    return {(user, dag_id) for user, dag_id in pairs}


class DagScopedAuthManager(SimpleAuthManager):
    def is_authorized_dag(self, *, method: Any, user: Any, access_entity: Any = None, details: Any = None) -> bool:
        dag_id = getattr(details, "id", None)
        if dag_id and (user.get_name(), dag_id) in _denied():
            return False
        return super().is_authorized_dag(method=method, user=user, access_entity=access_entity, details=details)

"""The run's settings: the DAG's Params, validated, as the tasks use them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bq_backfill.models import Model, get_model


@dataclass(frozen=True)
class Settings:
    """The run's conf, already validated by the DAG's Params."""

    tenant_id: str
    model_type: str
    chunk_size: int
    dry_run: bool
    max_rejected_rows: int
    source_table: str | None
    scratch_dataset: str
    gcp_conn_id: str
    postgres_conn_id: str

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Settings:
        return cls(
            tenant_id=str(params["tenant_id"]).lower(),
            model_type=params["model_type"],
            chunk_size=int(params["chunk_size"]),
            dry_run=bool(params["dry_run"]),
            max_rejected_rows=int(params["max_rejected_rows"]),
            source_table=params.get("source_table") or None,
            scratch_dataset=params["scratch_dataset"],
            gcp_conn_id=params["gcp_conn_id"],
            postgres_conn_id=params["postgres_conn_id"],
        )

    @property
    def model(self) -> Model:
        return get_model(self.model_type)

"""Registry of backfillable models: where each one is read from, where it lands, and how it is keyed.

Adding a model is one `register(Model(...))` entry here plus its target table DDL in include/sql/schema.sql.
Identifiers used in SQL come only from this registry, never from DAG conf.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_IDENT = re.compile(r"^[a-z_][a-z0-9_]*$")
# A snapshot row's position in its tenant's order key: numbered by BigQuery, carried by every slice into Postgres.
OFFSET_COLUMN = "_row_offset"


@dataclass(frozen=True)
class Column:
    name: str
    pg_type: str  # the staging column type; must accept what the target column accepts


@dataclass(frozen=True)
class Model:
    model_type: str
    source_table: str  # "dataset.table" (project of the BigQuery connection) or "project.dataset.table"
    target_table: str
    columns: tuple[Column, ...]
    conflict_key: tuple[str, ...]  # the target's unique key, tenant column first
    order_key: tuple[str, ...]  # total order of one tenant's source rows: offsets are positions in it
    tenant_column: str = "tenant_id"
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        names = [c.name for c in self.columns]
        for ident in (self.model_type, self.target_table, *names):
            if not _IDENT.match(ident):
                raise ValueError(f"model {self.model_type!r}: {ident!r} is not a plain lower-case identifier")
        for part, cols in (("conflict_key", self.conflict_key), ("order_key", self.order_key)):
            missing = [c for c in cols if c not in names]
            if missing:
                raise ValueError(f"model {self.model_type!r}: {part} names unknown columns {missing}")
        if self.conflict_key[0] != self.tenant_column:
            raise ValueError(f"model {self.model_type!r}: conflict_key must start with {self.tenant_column!r}")
        # Offsets are only stable if the order key pins every row: it must cover the key within the tenant.
        if not set(self.conflict_key[1:]) <= set(self.order_key):
            raise ValueError(f"model {self.model_type!r}: order_key must include every conflict_key column")

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    @property
    def value_columns(self) -> tuple[str, ...]:
        """Columns that an upsert may change: everything outside the conflict key."""
        return tuple(n for n in self.column_names if n not in self.conflict_key)


MODELS: dict[str, Model] = {}


def register(model: Model) -> Model:
    MODELS[model.model_type] = model
    return model


def get_model(model_type: str) -> Model:
    try:
        return MODELS[model_type]
    except KeyError:
        known = ", ".join(sorted(MODELS)) or "none"
        raise ValueError(f"unknown model_type {model_type!r}; registered models: {known}") from None


register(
    Model(
        model_type="inventory",
        source_table="analytics.inventory_movements",
        target_table="inventory_movements",
        columns=(
            Column("tenant_id", "uuid"),
            Column("movement_date", "date"),
            Column("branch_id", "text"),
            Column("product_code", "text"),
            Column("quantity", "numeric(18,4)"),
            Column("unit_cost", "numeric(18,4)"),
            Column("movement_type", "text"),
            Column("updated_at", "timestamptz"),
        ),
        conflict_key=("tenant_id", "movement_date", "branch_id", "product_code"),
        order_key=("movement_date", "branch_id", "product_code", "updated_at"),
        description="Stock movements per tenant, branch, product and day.",
    )
)

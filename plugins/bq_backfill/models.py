"""What a model is: a Declaration (what the deployment's models file says, model_file.py) and a Model (that
declaration resolved for a run: its columns, each with the target's Postgres type and the source column it is read
from).

Column names and types are not declared: they come from the target's catalog and the source's schema (`resolve`).
Identifiers used in SQL come only from declarations, validated here, never from DAG conf. Neither system's client
is imported here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from bq_backfill import type_map

# Postgres identifiers as written unquoted (what psql and most DDL produce), and BigQuery column names
_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_SOURCE_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,299}$")
_SOURCE_TABLE = re.compile(r"^([A-Za-z0-9-]{1,63}\.)?[A-Za-z0-9_]{1,1024}\.[A-Za-z0-9_]{1,1024}$")
# a Postgres type as a declaration may name it for a table setup creates: letters, one modifier, array brackets
_PG_TYPE = re.compile(r"^[a-z][a-z0-9 ]{0,40}(\(\d{1,4}(,\s?\d{1,4})?\))?(\[\])?$")
# A snapshot row's position in its tenant's order key: numbered by BigQuery, carried by every slice into Postgres.
OFFSET_COLUMN = "_row_offset"
# A source row's rank among the rows of its conflict key, latest first: the snapshot query keeps rank 1.
LATEST_COLUMN = "_row_latest"
# every name the snapshot query gives its own columns: no model column may have one
SNAPSHOT_NAMES = (OFFSET_COLUMN, LATEST_COLUMN, "_row_tenant", "_row_base", "_row_i", "_row_j")
# the package's own tables are named so: no model may write into one
RESERVED_TABLE_PREFIXES = ("backfill_", "bigquery_backfill_")


class DeclarationError(ValueError):
    """A model's declaration is unusable: names the model and the field."""

    def __init__(self, model: str, field_name: str, problem: str) -> None:
        super().__init__(f"model {model!r}, field {field_name}: {problem}")
        self.model, self.field = model, field_name


class ModelMismatchError(LookupError):
    """A model does not fit its source or target as they are now (a column gone, a type changed): refused before
    anything is written."""


@dataclass(frozen=True)
class Column:
    name: str  # the target column
    pg_type: str  # its type as format_type spells it (the staging column's type too)
    source: str = ""  # the source column it is read from: its own name unless renamed
    source_type: str = ""  # its BigQuery type (type_map's names), as the source had it when the run started

    def __post_init__(self) -> None:
        if not self.source:
            object.__setattr__(self, "source", self.name)


@dataclass(frozen=True)
class TargetColumn:
    """A target table column as the Postgres catalog has it."""

    name: str
    pg_type: str
    has_default: bool = False
    generated: bool = False  # GENERATED ALWAYS (AS IDENTITY or a stored expression): never written


@dataclass(frozen=True)
class Declaration:
    model_type: str
    source_table: str  # "dataset.table" (project of the BigQuery connection) or "project.dataset.table"
    target_table: str
    conflict_key: tuple[str, ...]  # the target's unique key, tenant column first
    order_key: tuple[str, ...]  # total order of one tenant's source rows: offsets are positions in it
    tenant_column: str = "tenant_id"
    selected: tuple[str, ...] | None = None  # the target columns written (`columns:`); None: every one
    renames: Mapping[str, str] = field(default_factory=dict)  # source column -> target column
    create_types: Mapping[str, str] = field(default_factory=dict)  # target column -> type, when setup creates it
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        bad = DeclarationError
        name = self.model_type
        if not _IDENT.match(name):
            raise bad(name, "model name", "not a plain lower-case identifier (letters, digits, _; at most 63)")
        if not isinstance(self.source_table, str) or not _SOURCE_TABLE.match(self.source_table):
            raise bad(name, "source_table", f"{self.source_table!r} is not 'dataset.table' or 'project.dataset.table'")
        if not isinstance(self.target_table, str) or not _IDENT.match(self.target_table):
            raise bad(name, "target_table", f"{self.target_table!r} is not a plain lower-case identifier")
        if self.target_table.startswith(RESERVED_TABLE_PREFIXES):
            raise bad(name, "target_table", f"{self.target_table!r} is reserved for the backfill's own tables")
        for part in ("conflict_key", "order_key", "selected"):
            cols = getattr(self, part)
            label = "columns" if part == "selected" else part
            if cols is None:
                continue
            if not cols:
                raise bad(name, label, "must name at least one column")
            self._plain(label, cols)
            if len(set(cols)) != len(cols):
                raise bad(name, label, f"names a column twice: {list(cols)}")
        self._plain("tenant_column", [self.tenant_column])
        if self.conflict_key[0] != self.tenant_column:
            raise bad(name, "conflict_key", f"must start with the tenant column {self.tenant_column!r}")
        # Offsets are only stable if the order key pins every row: it must cover the key within the tenant.
        uncovered = [c for c in self.conflict_key[1:] if c not in self.order_key]
        if uncovered:
            raise bad(name, "order_key", f"must include every conflict_key column but the tenant's; lacks {uncovered}")
        if self.selected is not None:
            absent = [c for c in dict.fromkeys([*self.conflict_key, *self.order_key]) if c not in self.selected]
            if absent:
                raise bad(name, "columns", f"must include the conflict_key and order_key columns; lacks {absent}")
        for source, target in self.renames.items():
            if not isinstance(source, str) or not _SOURCE_IDENT.match(source):
                raise bad(name, "renames", f"source column {source!r} is not a plain BigQuery column name")
            self._plain("renames", [target])
        targets = list(self.renames.values())
        if len(set(targets)) != len(targets):
            raise bad(name, "renames", "two source columns are renamed to the same target column")
        for column, pg_type in self.create_types.items():
            self._plain("create_types", [column])
            if not isinstance(pg_type, str) or not _PG_TYPE.match(pg_type):
                raise bad(name, "create_types", f"{column}: {pg_type!r} is not a plain Postgres type name")
            if type_map.postgres_base(pg_type) not in type_map.POSTGRES_TYPES:
                raise bad(name, "create_types", f"{column}: {pg_type!r} is not a type any BigQuery type lands in "
                                                "(README: Column types)")  # fmt: skip

    def _plain(self, label: str, names) -> None:
        for ident in names:
            if not isinstance(ident, str) or not _IDENT.match(ident):
                raise DeclarationError(self.model_type, label, f"{ident!r} is not a plain lower-case identifier")
            if ident in SNAPSHOT_NAMES:
                raise DeclarationError(self.model_type, label, f"{ident!r} is reserved (the snapshot query's own)")

    def source_name(self, column: str) -> str:
        """The source column a target column is read from (renames), before the source's schema is known."""
        return next((s for s, t in self.renames.items() if t == column), column)

    def resolved(self, columns: tuple[Column, ...]) -> Model:
        fields = {f: getattr(self, f) for f in Declaration.__dataclass_fields__}
        return Model(**fields, columns=columns)


@dataclass(frozen=True)
class Model(Declaration):
    """A declaration with its columns, as one run reads and writes them."""

    columns: tuple[Column, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        names = [c.name for c in self.columns]
        for ident in names:
            if not _IDENT.match(ident):
                raise DeclarationError(self.model_type, "columns", f"{ident!r} is not a plain lower-case identifier")
        missing = [c for c in dict.fromkeys([*self.conflict_key, *self.order_key]) if c not in names]
        if missing:
            raise DeclarationError(self.model_type, "conflict_key/order_key", f"names unknown columns {missing}")

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    @property
    def value_columns(self) -> tuple[str, ...]:
        """Columns that an upsert may change: everything outside the conflict key."""
        return tuple(n for n in self.column_names if n not in self.conflict_key)

    def source_name(self, column: str) -> str:
        return next((c.source for c in self.columns if c.name == column), column)

    def as_record(self) -> list[list[str]]:
        """The columns as [name, type, source, source type] lists: how a run passes them from task to task (XCom,
        the job row)."""
        return [[c.name, c.pg_type, c.source, c.source_type] for c in self.columns]

    @classmethod
    def from_record(cls, declaration: Declaration, record: list[list[str]]) -> Model:
        return declaration.resolved(tuple(Column(*column) for column in record))


@dataclass(frozen=True)
class Resolution:
    model: Model
    ignored: list[str]  # source columns the model does not read
    defaulted: list[str]  # target columns the source does not have, left to their default


def resolve(declaration: Declaration, target: list[TargetColumn], source: Mapping[str, str]) -> Resolution:
    """The declaration's columns as the target's catalog (`target`) and the source's schema (`source`: column name
    -> BigQuery type, ARRAY<...> for a repeated one) have them now. Refuses (ModelMismatchError), naming each column,
    a target column the source lacks (unless left to its default), a missing key or a type pair outside the table."""
    d = declaration
    by_name = {c.name: c for c in target}
    if not by_name:
        raise ModelMismatchError(
            f"model {d.model_type!r}: target table {d.target_table} does not exist; the setup DAG "
            "(bigquery_backfill_setup) creates it from the source's schema"
        )
    wanted = list(d.selected) if d.selected is not None else [c.name for c in target if not c.generated]
    # BigQuery column names are case-insensitive; the source's own spelling goes into the queries
    source_names = {name.lower(): name for name in source}
    renamed = {t: s for s, t in d.renames.items()}
    problems: list[str] = []
    unknown = [c for c in wanted if c not in by_name]
    if unknown:
        problems.append(f"columns {unknown} are not columns of target table {d.target_table}")
    generated = [c for c in wanted if c in by_name and by_name[c].generated]
    if generated:
        problems.append(f"target columns {generated} are generated (GENERATED ALWAYS): they cannot be written")
    columns, lost, defaulted = [], [], []
    for name in wanted:
        if name not in by_name or by_name[name].generated:
            continue
        wanted_source = renamed.get(name, name)
        spelled = source_names.get(wanted_source.lower())
        if spelled is None:
            if d.selected is None and by_name[name].has_default and name not in (*d.conflict_key, *d.order_key):
                defaulted.append(name)
            else:
                lost.append(name if wanted_source == name else f"{wanted_source} (into {name})")
            continue
        columns.append(Column(name, by_name[name].pg_type, spelled, source[spelled]))
    if lost:
        problems.append(
            f"source columns {lost} are not in the source table {d.source_table}: restore them in the source, or "
            "leave their target columns out of the model (its `columns:` list; README: Schema drift)"
        )
    reserved = [c.source for c in columns if c.source.lower() in SNAPSHOT_NAMES]
    if reserved:
        problems.append(f"source columns {reserved} have names the snapshot query uses itself: rename them in BigQuery")
    unmatched = [s for s in d.renames if s.lower() not in source_names]
    if unmatched:
        problems.append(f"renames names source columns {unmatched} that are not in {d.source_table}")
    refused = [why for c in columns if (why := type_map.mismatch(c.name, c.source_type, c.pg_type))]
    if refused:
        problems.append("; ".join(refused) + ". Change the target column's type (or the source's)")
    keys = set(d.conflict_key) | set(d.order_key)
    unordered = [
        why for c in columns
        if c.name in keys and (why := type_map.key_refusal(c.name, c.source_type, c.name in d.conflict_key))
    ]  # fmt: skip
    if unordered:
        problems.append("; ".join(unordered))
    tenant = next((c for c in columns if c.name == d.tenant_column), None)
    if tenant and (tenant.source_type != "STRING" or type_map.postgres_base(tenant.pg_type) != "uuid"):
        problems.append(
            f"the tenant column {d.tenant_column!r} must be a STRING in BigQuery and a uuid in Postgres (tenants are "
            f"uuids, matched in either letter case); here {tenant.source_type} into {tenant.pg_type}"
        )
    if problems:
        raise ModelMismatchError(f"model {d.model_type!r}: " + "; ".join(problems))
    model = d.resolved(tuple(columns))
    read = {c.source for c in columns}
    return Resolution(model, sorted(n for n in source if n not in read), defaulted)

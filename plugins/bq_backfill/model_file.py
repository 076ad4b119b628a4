"""The deployment's models file: which models it backfills, declared in YAML next to its DAGs.

Its path is `[bigquery_backfill] models_file` (AIRFLOW__BIGQUERY_BACKFILL__MODELS_FILE), relative to the DAGs folder
unless absolute; unset, the package's own `models.yaml` (the `inventory` model) is used. Reading it touches the local
file only: the DAG files read it when they are parsed. A model whose declaration is wrong is left out and its
problem kept (shown in the trigger form, the Backfills page and by the setup DAG); the others stay usable. A file
that cannot be read or is not YAML fails the parse, naming the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import yaml

from bq_backfill.models import Declaration, DeclarationError

CONFIG_SECTION = "bigquery_backfill"
OPTION = "models_file"
FIELDS = {
    "source_table", "target_table", "conflict_key", "order_key", "tenant_column", "columns", "renames",
    "create_types", "description",
}  # fmt: skip
REQUIRED = ("source_table", "target_table", "conflict_key", "order_key")


class ModelFileError(ValueError):
    """The models file as a whole cannot be used (missing, not YAML, not a mapping of models)."""


@dataclass(frozen=True)
class DeclaredModels:
    path: str
    models: dict[str, Declaration]
    problems: dict[str, str]  # model name -> why its declaration is refused


def models_path() -> Path | Traversable:
    """The configured file, or the package's own (inside a zip on MWAA: read through importlib.resources)."""
    from airflow.configuration import conf

    configured = (conf.get(CONFIG_SECTION, OPTION, fallback="") or "").strip()
    if not configured:
        return resources.files("bq_backfill").joinpath("models.yaml")
    path = Path(os.path.expanduser(configured))
    return path if path.is_absolute() else Path(conf.get("core", "dags_folder")) / path


_cache: dict[tuple[str, int], DeclaredModels] = {}


def declared_models() -> DeclaredModels:
    """The file's models, read again only when the file changed."""
    path = models_path()
    try:
        key = (str(path), path.stat().st_mtime_ns if isinstance(path, Path) else 0)
    except OSError as exc:
        raise ModelFileError(f"models file {path} cannot be read ({exc.strerror}): {_WHERE}") from exc
    if key not in _cache:
        _cache.clear()
        _cache[key] = load(path)
    return _cache[key]


_WHERE = f"set [{CONFIG_SECTION}] {OPTION} (AIRFLOW__{CONFIG_SECTION.upper()}__{OPTION.upper()}) to a file that exists"


def get_declaration(model_type: str) -> Declaration:
    declared = declared_models()
    if model_type in declared.models:
        return declared.models[model_type]
    if model_type in declared.problems:
        raise DeclarationError(model_type, "declaration", f"refused: {declared.problems[model_type]}")
    known = ", ".join(sorted(declared.models)) or "none"
    raise ValueError(f"unknown model_type {model_type!r}; models declared in {declared.path}: {known}")


class _UniqueKeys(yaml.SafeLoader):
    """SafeLoader refusing a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} is given twice", key_node.start_mark
                )  # fmt: skip
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load(path: Path | Traversable) -> DeclaredModels:
    try:
        document = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeys)
    except OSError as exc:
        raise ModelFileError(f"models file {path} cannot be read ({exc.strerror}): {_WHERE}") from exc
    except yaml.YAMLError as exc:
        raise ModelFileError(f"models file {path} is not valid YAML: {exc}") from exc
    if not isinstance(document, dict) or not isinstance(document.get("models"), dict):
        raise ModelFileError(f"models file {path} must hold a mapping `models:` of model name -> declaration")
    models: dict[str, Declaration] = {}
    problems: dict[str, str] = {}
    for name, body in document["models"].items():
        try:
            declaration = parse(str(name), body)
            owner = next((m for m in models.values() if m.target_table == declaration.target_table), None)
            if owner is not None:
                raise DeclarationError(
                    declaration.model_type, "target_table", f"{declaration.target_table} is model {owner.model_type}'s"
                )
        except DeclarationError as exc:
            problems[str(name)] = str(exc)
            continue
        models[declaration.model_type] = declaration
    return DeclaredModels(str(path), models, problems)


def parse(name: str, body: Any) -> Declaration:
    """One model's declaration from its YAML mapping; DeclarationError names the model and the field."""
    if not isinstance(body, dict):
        raise DeclarationError(name, "declaration", "must be a mapping of fields")
    unknown = sorted(set(map(str, body)) - FIELDS)
    if unknown:
        raise DeclarationError(name, unknown[0], f"unknown field; the fields are {', '.join(sorted(FIELDS))}")
    absent = [f for f in REQUIRED if f not in body]
    if absent:
        raise DeclarationError(name, absent[0], "is required")

    def names(field: str) -> tuple[str, ...] | None:
        value = body.get(field)
        if value is None:
            return None
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise DeclarationError(name, field, "must be a list of column names")
        return tuple(value)

    def mapping(field: str) -> dict[str, str]:
        value = body.get(field) or {}
        if not isinstance(value, dict):
            raise DeclarationError(name, field, "must be a mapping")
        return {str(k): v for k, v in value.items()}

    return Declaration(
        model_type=name,
        source_table=body["source_table"],
        target_table=body["target_table"],
        conflict_key=names("conflict_key") or (),
        order_key=names("order_key") or (),
        tenant_column=body.get("tenant_column", "tenant_id"),
        selected=names("columns"),
        renames=mapping("renames"),
        create_types=mapping("create_types"),
        description=str(body.get("description") or ""),
    )

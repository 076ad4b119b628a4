"""Which Postgres column types a BigQuery column may land in (README "Column types"): the pairs whose values land
value for value on every write path, and are tested so. A model column of any other pair is refused when the run
starts, before anything is billed or written.

Postgres types are named as `format_type` names them, without their modifiers (`numeric(38,9)` is `numeric`; a
model's `timestamptz` is `timestamp with time zone`); an ARRAY column is its element's pair with `[]` on the
Postgres side. Neither system's client is imported here.
"""

from __future__ import annotations

import re

# BigQuery's legacy and standard SQL names of one type
_BIGQUERY_NAMES = {
    "BOOLEAN": "BOOL",
    "INTEGER": "INT64",
    "FLOAT": "FLOAT64",
    "BIGDECIMAL": "BIGNUMERIC",
    "DECIMAL": "NUMERIC",
    "RECORD": "STRUCT",
}

SUPPORTED: dict[str, tuple[str, ...]] = {
    "BOOL": ("boolean",),
    "INT64": ("bigint", "numeric"),
    "FLOAT64": ("double precision",),
    "NUMERIC": ("numeric",),
    "BIGNUMERIC": ("numeric",),
    "STRING": ("text", "character varying", "uuid"),
    "BYTES": ("bytea",),
    "DATE": ("date",),
    "DATETIME": ("timestamp without time zone",),
    "TIME": ("time without time zone",),
    "TIMESTAMP": ("timestamp with time zone",),
    "JSON": ("jsonb",),
}
# element types an ARRAY may hold here (Postgres arrays of the element's types)
ARRAY_ELEMENTS = ("BOOL", "INT64", "FLOAT64", "NUMERIC", "BIGNUMERIC", "STRING", "BYTES", "DATE", "DATETIME", "TIME",
                  "TIMESTAMP")  # fmt: skip
# not landed by this version, and what a source table needs instead
UNSUPPORTED = {
    "STRUCT": "give each field a column of its own in the source table",
    "GEOGRAPHY": "store it as STRING (ST_ASTEXT) in the source table, into text",
    "INTERVAL": "store it as STRING (CAST AS STRING) in the source table, into text",
    "RANGE": "store RANGE_START and RANGE_END as columns of their own",
    "JSON ARRAY": "store it as one JSON value (TO_JSON) in the source table, into jsonb",
}
# the column type the setup DAG gives a target table it creates (the first pair of each, with BigQuery's own
# precision and scale for NUMERIC); an ARRAY gets its element's type with [], the tenant column uuid
CREATED = {
    "BOOL": "boolean",
    "INT64": "bigint",
    "FLOAT64": "double precision",
    "NUMERIC": "numeric(38,9)",
    "BIGNUMERIC": "numeric",
    "STRING": "text",
    "BYTES": "bytea",
    "DATE": "date",
    "DATETIME": "timestamp without time zone",
    "TIME": "time without time zone",
    "TIMESTAMP": "timestamp with time zone",
    "JSON": "jsonb",
}
# the spellings a model may use for a type, as format_type spells it
_POSTGRES_NAMES = {
    "int8": "bigint",
    "bool": "boolean",
    "float8": "double precision",
    "decimal": "numeric",
    "timestamptz": "timestamp with time zone",
    "timestamp": "timestamp without time zone",
    "time": "time without time zone",
    "varchar": "character varying",
}


def bigquery_type(field_type: str, mode: str | None) -> str:
    """`INT64`, or `ARRAY<INT64>` for a REPEATED field, in standard SQL names."""
    name = _BIGQUERY_NAMES.get(field_type.upper(), field_type.upper())
    return f"ARRAY<{name}>" if (mode or "").upper() == "REPEATED" else name


def postgres_base(pg_type: str) -> str:
    """`numeric(38,9)` → `numeric`, `timestamptz[]` → `timestamp with time zone[]`: format_type's name, no modifier."""
    base = re.sub(r"\s+", " ", re.sub(r"\([^)]*\)", "", pg_type)).strip().lower()
    element, brackets = (base[:-2].strip(), "[]") if base.endswith("[]") else (base, "")
    return _POSTGRES_NAMES.get(element, element) + brackets


def allowed(bq_type: str) -> tuple[str, ...]:
    """The Postgres types (format_type names, no modifiers) a column of this BigQuery type may land in."""
    element = bq_type.removeprefix("ARRAY<").removesuffix(">")
    if element != bq_type:
        return tuple(f"{pg}[]" for pg in SUPPORTED.get(element, ())) if element in ARRAY_ELEMENTS else ()
    return SUPPORTED.get(bq_type, ())


def created_type(bq_type: str) -> str | None:
    """The type setup gives a new target column of this BigQuery type (None: not landed)."""
    element = bq_type.removeprefix("ARRAY<").removesuffix(">")
    if element != bq_type:
        return f"{CREATED[element]}[]" if element in ARRAY_ELEMENTS else None
    return CREATED.get(bq_type)


def source_type(pg_format_type: str) -> str:
    """The BigQuery type a column of this Postgres type is read from (the first in the table; lineage's schema)."""
    base = postgres_base(pg_format_type)
    element = base.removesuffix("[]")
    name = next((bq for bq, pg in CREATED.items() if postgres_base(pg) == element), "STRING")
    return f"ARRAY<{name}>" if element != base else name


def mismatch(column: str, bq_type: str, pg_format_type: str) -> str | None:
    """Why this pair is refused, naming the column, both types and what is supported; None if it is supported."""
    accepted = allowed(bq_type)
    if postgres_base(pg_format_type) in accepted:
        return None
    if accepted:
        return (
            f"column {column!r}: BigQuery {bq_type} does not land in Postgres {pg_format_type}; "
            f"it lands in {' or '.join(accepted)}"
        )
    element = bq_type.removeprefix("ARRAY<").removesuffix(">")
    hint = UNSUPPORTED.get("JSON ARRAY" if bq_type == "ARRAY<JSON>" else element.split("<")[0])
    return (
        f"column {column!r}: BigQuery {bq_type} is not a supported source type"
        + (f"; {hint}" if hint else "")
        + f". Supported: {', '.join(SUPPORTED)} and ARRAY of {', '.join(ARRAY_ELEMENTS)}"
    )

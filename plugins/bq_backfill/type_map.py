"""Which Postgres column types a BigQuery column may land in (README "Column types"): the pairs whose values land
value for value on every write path, and are tested so. A model column of any other pair is refused when the run
starts, before anything is billed or written.

Postgres types are named as `format_type` names them, without their modifiers (`numeric(38,9)` is `numeric`; a
model's `timestamptz` is `timestamp with time zone`); an ARRAY column is its element's pair with `[]` on the
Postgres side. Neither system's client is imported here.

STRUCT, GEOGRAPHY, INTERVAL, RANGE and ARRAYs of STRUCT or JSON have no Arrow form Postgres reads: the snapshot
query turns them into the text Postgres parses (`read_expression`: BigQuery's own TO_JSON_STRING, ST_ASTEXT,
ST_ASGEOJSON, CAST AS STRING), so the snapshot, every read and every write see a STRING column.
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
    "STRUCT": ("jsonb",),
    "GEOGRAPHY": ("text", "jsonb"),
    "INTERVAL": ("interval",),
    "RANGE<DATE>": ("daterange",),
    "RANGE<DATETIME>": ("tsrange",),
    "RANGE<TIMESTAMP>": ("tstzrange",),
    "ARRAY<STRUCT>": ("jsonb",),
    "ARRAY<JSON>": ("jsonb",),
    "ARRAY<GEOGRAPHY>": ("jsonb",),
    "ARRAY<INTERVAL>": ("jsonb",),
    "ARRAY<RANGE<DATE>>": ("jsonb",),
    "ARRAY<RANGE<DATETIME>>": ("jsonb",),
    "ARRAY<RANGE<TIMESTAMP>>": ("jsonb",),
}
# element types an ARRAY may hold here (Postgres arrays of the element's types)
ARRAY_ELEMENTS = ("BOOL", "INT64", "FLOAT64", "NUMERIC", "BIGNUMERIC", "STRING", "BYTES", "DATE", "DATETIME", "TIME",
                  "TIMESTAMP")  # fmt: skip
# types a tie-break orders by directly, values untouched (a float's -0 can come back as 0 from a sort)
ORDERED = ("BOOL", "INT64", "NUMERIC", "BIGNUMERIC", "STRING", "BYTES", "DATE", "DATETIME", "TIME", "TIMESTAMP")
# every Postgres type some pair lands in (format_type's names), and as arrays
POSTGRES_TYPES = frozenset(pg for pgs in SUPPORTED.values() for pg in pgs) | {f"{pg}[]" for e in ARRAY_ELEMENTS
                                                                             for pg in SUPPORTED[e]}  # fmt: skip
# types that cannot be part of a conflict or order key (BigQuery cannot order by them; their text is not their order)
NOT_KEYS = ("STRUCT", "GEOGRAPHY", "INTERVAL", "RANGE", "ARRAY", "JSON")
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
    "STRUCT": "jsonb",
    "GEOGRAPHY": "text",
    "INTERVAL": "interval",
    "RANGE<DATE>": "daterange",
    "RANGE<DATETIME>": "tsrange",
    "RANGE<TIMESTAMP>": "tstzrange",
    "ARRAY<STRUCT>": "jsonb",
    "ARRAY<JSON>": "jsonb",
    "ARRAY<GEOGRAPHY>": "jsonb",
    "ARRAY<INTERVAL>": "jsonb",
    "ARRAY<RANGE<DATE>>": "jsonb",
    "ARRAY<RANGE<DATETIME>>": "jsonb",
    "ARRAY<RANGE<TIMESTAMP>>": "jsonb",
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


def bigquery_type(field_type: str, mode: str | None, range_element: str | None = None) -> str:
    """`INT64`, `ARRAY<INT64>` for a REPEATED field, `RANGE<DATE>`, in standard SQL names."""
    name = _BIGQUERY_NAMES.get(field_type.upper(), field_type.upper())
    if name == "RANGE" and range_element:
        name = f"RANGE<{_BIGQUERY_NAMES.get(range_element.upper(), range_element.upper())}>"
    return f"ARRAY<{name}>" if (mode or "").upper() == "REPEATED" else name


def postgres_base(pg_type: str) -> str:
    """`numeric(38,9)` → `numeric`, `timestamptz[]` → `timestamp with time zone[]`: format_type's name, no modifier."""
    base = re.sub(r"\s+", " ", re.sub(r"\([^)]*\)", "", pg_type)).strip().lower()
    element, brackets = (base[:-2].strip(), "[]") if base.endswith("[]") else (base, "")
    return _POSTGRES_NAMES.get(element, element) + brackets


def allowed(bq_type: str) -> tuple[str, ...]:
    """The Postgres types (format_type names, no modifiers) a column of this BigQuery type may land in."""
    element = bq_type.removeprefix("ARRAY<").removesuffix(">")
    if element != bq_type and element in ARRAY_ELEMENTS:
        return tuple(f"{pg}[]" for pg in SUPPORTED.get(element, ()))
    return SUPPORTED.get(bq_type, ())


def read_expression(bq_type: str, pg_format_type: str, column: str) -> str:
    """The snapshot query's expression for a source column (`column`: its quoted name): the value itself, or, for
    a type with no Arrow form Postgres reads, the text Postgres parses into `pg_format_type`."""
    base = postgres_base(pg_format_type)
    if bq_type == "STRUCT" or (bq_type.startswith("ARRAY<") and base == "jsonb"):
        return f"IF({column} IS NULL, NULL, TO_JSON_STRING({column}))"  # an ARRAY is never NULL: [] stays []
    if bq_type == "GEOGRAPHY":
        return f"ST_ASGEOJSON({column})" if base == "jsonb" else f"ST_ASTEXT({column})"
    if bq_type == "INTERVAL":
        return f"CAST({column} AS STRING)"  # [sign]Y-M [sign]D [sign]H:M:S[.F], which Postgres reads as it is
    if bq_type.startswith("RANGE<"):
        # Postgres's range literal, an unbounded end left empty: [start,end)
        bound = "IFNULL(CAST(RANGE_{}({}) AS STRING), '')"
        return (
            f"IF({column} IS NULL, NULL, CONCAT('[', {bound.format('START', column)}, ',', "
            f"{bound.format('END', column)}, ')'))"
        )
    return column


def created_type(bq_type: str) -> str | None:
    """The type setup gives a new target column of this BigQuery type (None: not landed)."""
    element = bq_type.removeprefix("ARRAY<").removesuffix(">")
    if element != bq_type and element in ARRAY_ELEMENTS:
        return f"{CREATED[element]}[]"
    return CREATED.get(bq_type)


# a time type with fewer fractional digits than BigQuery's microseconds, e.g. timestamp(3): Postgres would round
_COARSE_TIME = re.compile(r"^(timestamp|time)\((\d)\)")


def _holds_numeric(bq_type: str, pg_format_type: str) -> bool:
    """Whether an array of numeric(p,s) holds every element of this BigQuery array exactly (NUMERIC into p-s >= 29
    integer digits and s >= 9 decimals, e.g. numeric(38,9)[]): nothing to check per element."""
    modifier = re.match(r"^numeric\((\d+),\s*(\d+)\)\[\]$", pg_format_type.strip())
    if bq_type not in ("ARRAY<NUMERIC>", "ARRAY<INT64>") or not modifier:
        return False
    precision, scale = int(modifier.group(1)), int(modifier.group(2))
    return precision - scale >= 29 and scale >= (9 if bq_type == "ARRAY<NUMERIC>" else 0)


def mismatch(column: str, bq_type: str, pg_format_type: str) -> str | None:
    """Why this pair is refused, naming the column, both types and what is supported; None if it is supported."""
    accepted = allowed(bq_type)
    coarse = _COARSE_TIME.match(pg_format_type.strip().lower())
    if coarse and int(coarse.group(2)) < 6:
        return (
            f"column {column!r}: Postgres {pg_format_type} keeps {coarse.group(2)} fractional digits, BigQuery "
            f"{bq_type} 6: the values would be rounded; use the type without a precision"
        )
    if pg_format_type.strip().endswith("[]") and "(" in pg_format_type and not _holds_numeric(bq_type, pg_format_type):
        return (
            f"column {column!r}: Postgres {pg_format_type} limits each element, which cannot be checked row by row: "
            f"use {postgres_base(pg_format_type)} (unconstrained elements)"
        )
    if postgres_base(pg_format_type) in accepted:
        return None
    if accepted:
        return (
            f"column {column!r}: BigQuery {bq_type} does not land in Postgres {pg_format_type}; "
            f"it lands in {' or '.join(accepted)}"
        )
    return (
        f"column {column!r}: BigQuery {bq_type} is not a supported source type. Supported: {', '.join(SUPPORTED)} "
        f"and ARRAY of {', '.join(ARRAY_ELEMENTS)}"
    )


def key_refusal(column: str, bq_type: str, conflict_key: bool = False) -> str | None:
    """Why a column of this type cannot be in a conflict or order key; None if it can."""
    if conflict_key and bq_type == "FLOAT64":  # BigQuery cannot partition by a float (the snapshot query does)
        return f"column {column!r} of BigQuery type FLOAT64 cannot be in a conflict_key"
    if bq_type.split("<")[0] in NOT_KEYS:
        return f"column {column!r} of BigQuery type {bq_type} cannot be in a conflict_key or order_key"
    return None

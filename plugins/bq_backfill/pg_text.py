"""Arrow columns in Postgres's text forms, for the types Arrow's CSV writer and reader cannot carry as they are:
bytes (bytea), lists (one-dimensional arrays) and 256-bit decimals (BIGNUMERIC, which Arrow's CSV reader cannot
parse). What COPY FROM takes, and back from what COPY TO gives.

- bytes → `\\x` and lower-case hex (bytea's input and, with `bytea_output = hex`, its output);
- a list → an array literal `{"a",NULL,"b\\"c"}`: every element quoted (valid input for any element type) with `\\`
  and `"` escaped, NULL unquoted, `{}` for an empty list, and a NULL list stays NULL. Postgres writes elements back
  quoted only when they need it; both are parsed here.

Element values are rendered the way the scalar columns are (Arrow's casts to text; timestamps with a time zone as
UTC with an explicit offset), and parsed back by Arrow's CSV reader in the source's element type, so an element
round-trips exactly when the same value in a column of its own does.
"""

from __future__ import annotations

import io
import json
from decimal import Decimal
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv


def needs_text(data_type: pa.DataType) -> bool:
    """Whether a column of this type goes through this module (and is read back as text first)."""
    return (
        is_bytes(data_type)
        or pa.types.is_list(data_type)
        or pa.types.is_large_list(data_type)
        or pa.types.is_decimal256(data_type)
    )


def is_bytes(data_type: pa.DataType) -> bool:
    return pa.types.is_binary(data_type) or pa.types.is_large_binary(data_type)


def scalar_text(values: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Values of a scalar column as the text COPY's CSV takes (NULL stays NULL)."""
    if is_bytes(values.type):
        return pa.array([None if v is None else "\\x" + v.hex() for v in values.to_pylist()], pa.string())
    if pa.types.is_timestamp(values.type) and values.type.tz is not None:
        naive_utc = pc.cast(values, pa.timestamp(values.type.unit))
        return pc.binary_join_element_wise(pc.cast(naive_utc, pa.string()), "+00", "")
    return pc.cast(values, pa.string())


def to_copy_text(values: pa.Array | pa.ChunkedArray) -> pa.ChunkedArray:
    """A column of a needs_text() type as the text COPY FROM reads for its Postgres type."""
    chunks = values.chunks if isinstance(values, pa.ChunkedArray) else [values]
    texts = [_array_literal(c) if pa.types.is_list(c.type) else scalar_text(c) for c in chunks]
    return pa.chunked_array(texts, pa.string())


def _array_literal(lists: pa.Array) -> pa.Array:
    # the elements of the non-NULL lists, with offsets of their own: right for a slice of a larger array too
    lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]), pa.int32())
    elements = scalar_text(pc.list_flatten(lists))
    escaped = pc.replace_substring(pc.replace_substring(elements, "\\", "\\\\"), '"', '\\"')
    quoted = pc.fill_null(pc.binary_join_element_wise('"', escaped, '"', ""), "NULL")
    rebuilt = pa.ListArray.from_arrays(offsets, quoted, mask=lists.is_null())
    return pc.binary_join_element_wise("{", pc.binary_join(rebuilt, ","), "}", "")


def from_copy_text(text: pa.ChunkedArray, data_type: pa.DataType) -> pa.ChunkedArray | None:
    """Postgres's output text of a bytea or array column back into `data_type`; None if a value does not parse."""
    values = text.to_pylist()
    try:
        if is_bytes(data_type):
            return pa.chunked_array([pa.array([_bytes(v) for v in values], data_type)], data_type)
        if pa.types.is_decimal256(data_type):
            return pa.chunked_array([pc.cast(text.combine_chunks(), data_type)], data_type)
        return pa.chunked_array([_lists([_array_items(v) for v in values], data_type)], data_type)
    except (ValueError, IndexError, pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None


def _bytes(text: str | None) -> bytes | None:
    if text is None:
        return None
    if not text.startswith("\\x"):
        raise ValueError(f"not bytea hex output: {text[:20]!r}")
    return bytes.fromhex(text[2:])


def _array_items(text: str | None) -> list[str | None] | None:
    """The elements of a one-dimensional array's output text, unquoted and unescaped; NULL as None."""
    if text is None:
        return None
    if not (text.startswith("{") and text.endswith("}")):
        raise ValueError(f"not a one-dimensional array: {text[:20]!r}")
    items: list[str | None] = []
    i, end = 1, len(text) - 1
    while i < end:
        if text[i] == '"':
            i += 1
            buf = []
            while text[i] != '"':
                if text[i] == "\\":
                    i += 1
                buf.append(text[i])
                i += 1
            i += 1
            items.append("".join(buf))
        else:
            j = text.find(",", i)
            j = end if j < 0 else j
            token = text[i:j]
            if token.startswith("{"):
                raise ValueError("a nested array")
            items.append(None if token == "NULL" else token)
            i = j
        if i < end:
            if text[i] != ",":
                raise ValueError(f"unexpected {text[i]!r} in an array")
            i += 1
    return items


def _lists(rows: list[list[str | None] | None], data_type: pa.DataType) -> pa.Array:
    offsets, flat = [0], []
    for items in rows:
        flat.extend(items or ())
        offsets.append(len(flat))
    element_type = data_type.value_type
    values = _parse_elements(flat, element_type)
    mask = pa.array([items is None for items in rows], pa.bool_())
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values, type=data_type, mask=mask)


def _parse_elements(flat: list[str | None], element_type: pa.DataType) -> pa.Array:
    if is_bytes(element_type):
        return pa.array([_bytes(v) for v in flat], element_type)
    if pa.types.is_string(element_type) or pa.types.is_large_string(element_type):
        return pa.array(flat, element_type)
    if pa.types.is_decimal256(element_type):
        return pc.cast(pa.array(flat, pa.string()), element_type)
    if not flat:
        return pa.array([], element_type)
    # each element a CSV field: quoted text, or an unquoted empty field for NULL; Arrow parses it as a scalar column
    csv = "\n".join("" if v is None else '"' + v.replace('"', '""') + '"' for v in flat) + "\n"
    table = pa_csv.read_csv(
        io.BytesIO(csv.encode()),
        read_options=pa_csv.ReadOptions(column_names=["v"]),
        parse_options=pa_csv.ParseOptions(ignore_empty_lines=False),  # an empty line: a NULL element
        convert_options=pa_csv.ConvertOptions(
            column_types={"v": element_type},
            null_values=[""],
            quoted_strings_can_be_null=False,
            true_values=["t"],
            false_values=["f"],
        ),
    )
    return table.column("v").combine_chunks()


def same_json(a: pa.ChunkedArray, b: pa.ChunkedArray) -> bool:
    """Whether two columns of JSON text hold equal jsonb values as Postgres compares them: objects whatever their
    key order (the last of a duplicated key), numbers by value (1.0 equals 1), each kind apart (1 is not true)."""
    if a.equals(b):
        return True
    try:
        return [_jsonb(v) for v in a.to_pylist()] == [_jsonb(v) for v in b.to_pylist()]
    except ValueError:  # not JSON: let the upsert (and Postgres) decide
        return False


def _jsonb(text: str | None) -> Any:
    return None if text is None else _tagged(json.loads(text, parse_float=Decimal, parse_int=Decimal))


def _tagged(value: Any) -> Any:
    if isinstance(value, dict):
        return ("object", {k: _tagged(v) for k, v in value.items()})
    if isinstance(value, list):
        return ("array", [_tagged(v) for v in value])
    if isinstance(value, bool) or value is None:
        return ("literal", value)
    return ("number" if isinstance(value, Decimal) else "string", value)

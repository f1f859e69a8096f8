"""Primitives over tables already parsed into text cells, shared by every file reader (CSV,
XLSX, HTML, notebook outputs): column names, the pandas row index, text to numbers. They depend
on nothing else of the checks, so every reader can use them without importing another reader.
"""

from __future__ import annotations

from typing import Any

import polars as pl

MAX_TABLE_COLUMNS = 1000  # a resource guard, not a disclosure threshold
# Characters a reader does not see (zero-width spaces and joiners, bidi controls, soft hyphen,
# BOM): a "3" followed by one must still be read as the number 3.
INVISIBLE = "[\u00ad\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff]"


def unique_names(header: list[Any]) -> list[str]:
    names: list[str] = []
    seen: set[str] = set()
    for i, h in enumerate(header):
        name = ("" if h is None else str(h)).strip() or f"column_{i + 1}"
        while name in seen:
            name += "_"
        names.append(name)
        seen.add(name)
    return names


def drop_range_index(header: list[str], body: list[list[str]]) -> tuple[list[str], list[list[str]]]:
    """Drop a pandas default index (an unnamed first column holding 0, 1, 2...): row numbers
    are not counts."""
    if header and body and header[0] in {"", "index"}:
        if [r[0] for r in body] == [str(i) for i in range(len(body))]:
            return header[1:], [r[1:] for r in body]
    return header, body


def coerce_numbers(df: pl.DataFrame) -> pl.DataFrame:
    """String columns whose every non-empty value is a number become numeric (1,234 and 5%
    stay text: a percent sign says it is not a count). Vectorised over all columns at once."""
    schema = df.schema  # built on each access: fetch once
    text_cols = [c for c, dtype in schema.items() if dtype == pl.String]
    if not text_cols or df.height == 0 or df.width > MAX_TABLE_COLUMNS:
        return df  # too wide to be an aggregate: check_dataframe refuses it as it is
    stripped = df.select(
        pl.col(c)
        .str.replace_all(INVISIBLE, "")
        .str.strip_chars()
        .str.replace_all(",", "")
        .replace("", None)
        for c in text_cols
    )
    as_int = stripped.select(pl.all().cast(pl.Int64, strict=False))
    as_float = stripped.select(pl.all().cast(pl.Float64, strict=False))
    nulls = stripped.null_count().row(0)
    int_nulls = as_int.null_count().row(0)
    float_nulls = as_float.null_count().row(0)
    replace = {}
    for i, name in enumerate(text_cols):
        if nulls[i] == df.height:
            continue  # all empty: leave as text
        if int_nulls[i] == nulls[i]:
            replace[name] = as_int.get_column(name)
        elif float_nulls[i] == nulls[i]:
            replace[name] = as_float.get_column(name)
    return df.with_columns(**replace) if replace else df

"""JSON documents for the disclosure checks: the tables nested in them go to the table rules,
their leaves to the text rules. Used by the file dispatcher (``engine``) for .json files and by
the notebook checks for JSON outputs (application/json and vendors' +json types)."""

from __future__ import annotations

from typing import Any

import polars as pl

from airlock.checks.context import CheckContext, check_dataframe
from airlock.checks.findings import Finding
from airlock.checks.text import check_text

MAX_JSON_DEPTH = 64  # deeper documents are refused (a parser bomb, not an output)


def json_records(value: Any) -> pl.DataFrame | None:
    """A JSON document that is a table: a list of flat records, or a dict of equal columns."""
    try:
        if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
            if all(not isinstance(v, dict | list) for r in value for v in r.values()):
                return pl.DataFrame(value, infer_schema_length=None, strict=False)
        if isinstance(value, dict) and value and all(isinstance(v, list) for v in value.values()):
            lengths = {len(v) for v in value.values()}
            if len(lengths) == 1 and all(
                not isinstance(x, dict | list) for v in value.values() for x in v
            ):
                return pl.DataFrame(value, strict=False)
    except (pl.exceptions.PolarsError, TypeError, ValueError):
        return None
    return None


_MAX_JSON_TABLES = 100


def json_tables(value: Any) -> list[tuple[str, pl.DataFrame]]:
    """Every table nested in a JSON document (a list of flat records, a dict of equal
    columns), with its path: ``{"results": df.to_dict("records")}`` is a table too."""
    found: list[tuple[str, pl.DataFrame]] = []
    stack: list[tuple[str, Any, int]] = [("", value, 0)]
    while stack and len(found) < _MAX_JSON_TABLES:
        path, node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
        df = json_records(node)
        if df is not None:
            found.append((path.lstrip(".") or "$", df))
        elif isinstance(node, dict):
            stack.extend((f"{path}.{k}", v, depth + 1) for k, v in reversed(list(node.items())))
        elif isinstance(node, list):
            stack.extend((f"{path}[{i}]", v, depth + 1) for i, v in reversed(list(enumerate(node))))
    return found


def check_json_value(
    value: Any, ctx: CheckContext, location: dict[str, Any] | None = None
) -> list[Finding]:
    """The tables nested in a JSON value go to the table rules (``{"json": path}``), its
    leaves to the text rules."""
    location = location or {}
    findings: list[Finding] = []
    for path, df in json_tables(value):
        raw = df.select(pl.all().cast(pl.String, strict=False))
        findings += check_dataframe(df, ctx, {**location, "json": path}, raw=raw)[1]
    return findings + check_text(json_text(value), ctx.policy, location)


def json_text(value: Any) -> str:
    """Every leaf of a JSON document as 'path: value' lines (iterative, depth-limited)."""
    lines: list[str] = []
    stack: list[tuple[str, Any, int]] = [("", value, 0)]
    while stack:
        path, node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(node, dict):
            stack.extend((f"{path}.{k}", v, depth + 1) for k, v in reversed(list(node.items())))
        elif isinstance(node, list):
            stack.extend((f"{path}[{i}]", v, depth + 1) for i, v in reversed(list(enumerate(node))))
        else:
            lines.append(f"{path.lstrip('.')}: {node}")
    return "\n".join(lines)

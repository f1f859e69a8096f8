"""What every file check shares: the policy, the evidence, the extract, and the table layer.

Any table found in any file (a CSV, a sheet, an HTML ``<table>``, a pandas repr printed in a
notebook) goes through ``check_dataframe``: the disclosure rules of ``airlock.checks.tables``,
then the rules that belong to files (row count, formula injection) and the row-level leak rules
of ``airlock.checks.leaks``. Row numbers in findings are 0-based indexes of data rows (header
excluded), as in the table rules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from airlock.checks.findings import Finding, Status
from airlock.policy import Policy

if TYPE_CHECKING:
    from airlock.checks.leaks import ExtractIndex

MAX_TABLE_COLUMNS = 1000  # a resource guard, not a disclosure threshold
MAX_CELLS_LISTED = 20  # findings list at most this many cells; counts are always complete
_FORMULA_START = re.compile(r"^[\t\r\n ]*[=+\-@\t\r]")
_NUMBER = re.compile(r"^[+-]?(\d[\d,]*\.?\d*|\.\d+)([eE][+-]?\d+)?%?$")


@dataclass
class CheckContext:
    policy: Policy
    evidence: Any = None  # airlock.evidence.TableEvidence for the file being checked, or None
    evidence_path: Path | None = None
    extract: ExtractIndex | None = None  # the project's extract, for the leak rules
    companions: list[str] = field(default_factory=list)


def _check_table_rules(
    df: pl.DataFrame, ctx: CheckContext, location: dict[str, Any]
) -> tuple[str, list[Finding]]:
    from airlock.checks.tables import check_table

    return check_table(df, ctx.policy, evidence=ctx.evidence, location=location or None)


def with_location(findings: list[Finding], location: dict[str, Any]) -> list[Finding]:
    """Add ``location`` (e.g. {'cell': 3, 'output': 0}) to every cell that lacks those keys."""
    if not location:
        return findings
    out = []
    for f in findings:
        cells = [{**location, **c} for c in f.cells] or [dict(location)]
        out.append(f.model_copy(update={"cells": cells}))
    return out


def formula_injection(df: pl.DataFrame) -> list[dict[str, Any]]:
    """Text cells a spreadsheet would run as a formula (=, +, -, @ first; numbers excepted)."""
    hits: list[dict[str, Any]] = []
    for name in df.columns:
        col = df.get_column(name)
        if col.dtype != pl.String:
            continue
        for i, value in enumerate(col.to_list()):
            if not value or not _FORMULA_START.match(value):
                continue
            bare = value.strip()
            if _NUMBER.match(bare.replace(" ", "")) or set(bare) <= {"-", "+"}:
                continue  # a negative number, or a dash standing for "none"
            hits.append({"row": i, "column": name, "value": value[:80]})
    return hits


def coerce_numbers(df: pl.DataFrame) -> pl.DataFrame:
    """String columns whose every non-empty value is a number become numeric (1,234 and 5%
    stay text: a percent sign says it is not a count). Vectorised over all columns at once."""
    schema = df.schema  # built on each access: fetch once
    text_cols = [c for c, dtype in schema.items() if dtype == pl.String]
    if not text_cols or df.height == 0 or df.width > MAX_TABLE_COLUMNS:
        return df  # too wide to be an aggregate: check_dataframe refuses it as it is
    stripped = df.select(
        pl.col(c).str.strip_chars().str.replace_all(",", "").replace("", None) for c in text_cols
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


def check_dataframe(
    df: pl.DataFrame,
    ctx: CheckContext,
    location: dict[str, Any] | None = None,
    raw: pl.DataFrame | None = None,
) -> tuple[str, list[Finding]]:
    """Every table rule on one table; ``raw`` is the all-text version (for formula injection)."""
    location = location or {}
    policy = ctx.policy
    if df.width > MAX_TABLE_COLUMNS:
        return "unknown_table", with_location(
            [
                Finding(
                    rule="table.too_wide",
                    status=Status.FAIL,
                    message=f"{df.width} columns: a table wider than {MAX_TABLE_COLUMNS} columns "
                    "is not an aggregate output and is not checked further",
                    evidence={"columns": df.width, "max_columns": MAX_TABLE_COLUMNS},
                )
            ],
            location,
        )
    findings: list[Finding] = []
    injected = formula_injection(raw if raw is not None else df)
    if injected:
        findings.append(
            Finding(
                rule="table.formula_injection",
                status=Status.FAIL,
                message=f"{len(injected)} cell(s) start with =, +, - or @ and would run as a "
                "formula in a spreadsheet; remove or quote them",
                cells=injected[:MAX_CELLS_LISTED],
                evidence={"cells": len(injected)},
            )
        )
    if df.height > policy.max_rows:
        findings.append(
            Finding(
                rule="table.max_rows",
                status=Status.FAIL,
                message=f"{df.height} rows, more than the {policy.max_rows} allowed: a table this "
                "long is row-level data; aggregate it",
                evidence={"rows": df.height, "max_rows": policy.max_rows},
            )
        )
    from airlock.checks import leaks

    findings += leaks.check_rows(df, ctx)
    output_class = "table"
    if df.width and df.height:
        output_class, table_findings = _check_table_rules(df, ctx, location)
        findings += table_findings
    return output_class, with_location(findings, location)

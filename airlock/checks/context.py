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

from airlock.checks.cells import MAX_TABLE_COLUMNS
from airlock.checks.findings import Finding, Status
from airlock.policy import Policy

if TYPE_CHECKING:
    from airlock.checks.leaks import ExtractIndex

MAX_CELLS_LISTED = 20  # findings list at most this many cells; counts are always complete
_FORMULA_START = re.compile(r"^[\t\r\n ]*[=+\-@\t\r]")
# what makes a cell starting with + or - executable: a function call, a DDE pipe, a sheet
# reference, another formula sign
_ACTIVE = re.compile(r"[A-Za-z_][\w.]*\s*\(|[|!=@]|^[+-]+\s*[A-Za-z]")


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
            if bare[:1] in "+-" and not _ACTIVE.search(bare):
                continue  # "-5", "-0.5 (-0.9 to -0.1)", "-": numbers and dashes, nothing to run
            hits.append({"row": i, "column": name, "value": value[:80]})
    return hits


def _blobs_in_cells(df: pl.DataFrame) -> list[Finding]:
    """Base64/hex blobs hidden in text cells (polars finds the candidate cells, vectorised)."""
    from airlock.checks.blobs import encoded_blobs

    findings: list[Finding] = []
    for name, dtype in df.schema.items():
        if dtype != pl.String:
            continue
        col = df.get_column(name)
        suspects = col.str.contains(r"[A-Za-z0-9+/_-]{100,}|[0-9a-fA-F]{128,}").fill_null(False)
        for i in suspects.arg_true().to_list()[:MAX_CELLS_LISTED]:
            findings += encoded_blobs(col[i], {"row": i, "column": name})
    return findings


def _transposed(df: pl.DataFrame, policy: Policy) -> pl.DataFrame | None:
    """A table whose rows are named by quasi-identifiers (sex, birth_year...) and whose columns
    are subjects (one child per column), turned the right way round for the leak rules; None
    for any other table."""
    from airlock.checks.cells import coerce_numbers, unique_names

    if df.width < 3 or df.height < 2 or df.schema[df.columns[0]] != pl.String:
        return None
    names = ["" if v is None else str(v).strip() for v in df.get_column(df.columns[0])]
    qis = {q.lower() for q in policy.quasi_identifiers}
    qi_rows = [i for i, n in enumerate(names) if n.lower() in qis]
    if len(qi_rows) < 2:
        return None
    body = df.drop(df.columns[0]).select(pl.all().cast(pl.String))
    # records hold values (a sex, a country) where an aggregate's rows hold numbers ("Table 1":
    # a 'sex' row of counts per group): one quasi-identifier row of words, no digit, is needed
    if not any(all(v and not re.search(r"\d", v) for v in body.row(i)) for i in qi_rows):
        return None
    columns = {"column": body.columns}
    columns.update(zip(unique_names(names), (list(r) for r in body.rows()), strict=True))
    return coerce_numbers(pl.DataFrame(columns, schema={c: pl.String for c in columns}))


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
    findings += _blobs_in_cells(raw if raw is not None else df)
    from airlock.checks import leaks

    findings += leaks.check_rows(df, ctx)
    transposed = _transposed(df, policy)
    if transposed is not None:
        findings += with_location(leaks.check_rows(transposed, ctx), {"transposed": True})
    output_class = "table"
    if df.width and df.height:
        output_class, table_findings = _check_table_rules(df, ctx, location)
        findings += table_findings
    return output_class, with_location(findings, location)

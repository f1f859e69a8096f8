"""The entry point for every table the airlock meets: classify it, then apply its rules.

``check_table(df, policy, evidence, location)`` is called by the file layer for CSV, TSV, XLSX,
HTML and notebook tables (already parsed into polars DataFrames) and returns the output class
and the findings. A table that cannot be recognised is ``review``, never a silent pass.
"""

from __future__ import annotations

import polars as pl

from airlock.checks import rules
from airlock.checks.derived import check_derived
from airlock.checks.findings import Finding, Status
from airlock.checks.frequency import check_frequency
from airlock.checks.layout import COUNT_WORDS, Layout, Role, read_layout, words
from airlock.checks.magnitude import check_magnitude
from airlock.checks.models import (
    check_correlation,
    check_model,
    looks_like_correlation,
    looks_like_model,
)
from airlock.checks.survival import check_survival, looks_like_survival
from airlock.evidence import TableEvidence
from airlock.policy import Policy

OUTPUT_CLASSES = (
    "frequency_table",
    "magnitude_table",
    "model_summary",
    "correlation_matrix",
    "survival_table",
    "unknown_table",
)
MAX_TABLE_CELLS = 2_000_000


def classify(frame: pl.DataFrame, layout: Layout, evidence: TableEvidence | None = None) -> str:
    """The output class, from the table's own layout (evidence only breaks ties, so a claim in
    an evidence file cannot move a table to a laxer class)."""
    if frame.height == 0 or frame.width == 0:
        return "unknown_table"
    if looks_like_survival(frame):
        return "survival_table"
    if looks_like_model(frame) or (
        # a claim of the evidence counts only for a table without count columns, so that it
        # cannot switch the count rules off
        evidence is not None
        and evidence.output_class == "model_summary"
        and evidence.model
        and not layout.columns(Role.COUNT)
    ):
        return "model_summary"
    if looks_like_correlation(frame, layout):
        return "correlation_matrix"
    if layout.columns(Role.STATISTIC):
        return "magnitude_table"
    if layout.columns(Role.COUNT) or layout.columns(Role.CUMULATIVE):
        if evidence is not None and evidence.output_class == "magnitude_table":
            return "magnitude_table"
        return "frequency_table"
    return "unknown_table"


def _as_statistics(layout: Layout, evidence: TableEvidence) -> None:
    """Columns the evidence describes as statistics are statistics even if integer-valued
    (a sum of whole days). A column whose name says it is a count (n, count, cases...) stays a
    count whatever the evidence claims: evidence must not switch the count rules off."""
    described = {
        c.column: (c.statistic or "unknown")
        for c in evidence.cells
        if c.statistic not in (None, "count")
    }
    for column, statistic in described.items():
        if set(words(column)) & COUNT_WORDS:
            continue
        if column in layout.roles and layout.roles[column] == Role.COUNT:
            layout.roles[column] = Role.STATISTIC
            layout.statistic[column] = statistic


def _with_location(findings: list[Finding], location: dict | None) -> list[Finding]:
    if not location:
        return findings
    out = []
    for f in findings:
        cells = [{**c, **location} for c in f.cells] if f.cells else [dict(location)]
        out.append(f.model_copy(update={"cells": cells}))
    return out


def check_table(
    df: pl.DataFrame,
    policy: Policy,
    evidence: TableEvidence | None = None,
    location: dict | None = None,
) -> tuple[str, list[Finding]]:
    """Classify a table and check it; returns (output_class, findings).

    ``location`` (e.g. ``{"cell": 3, "output": 0}``) is merged into every finding's cells.
    Every finding records ``policy.label``.
    """
    if not isinstance(df, pl.DataFrame):
        raise TypeError(f"check_table needs a polars DataFrame, not {type(df).__name__}")
    if df.height * max(df.width, 1) > MAX_TABLE_CELLS:
        return "unknown_table", _with_location(
            [
                Finding(
                    rule=rules.UNKNOWN_TABLE,
                    status=Status.FAIL,
                    message=f"table of {df.height} x {df.width} cells is too large to be an "
                    "aggregate output",
                    policy_version=policy.label,
                )
            ],
            location,
        )
    layout = read_layout(df, policy)
    if evidence is not None and evidence.output_class == "magnitude_table":
        _as_statistics(layout, evidence)
    output_class = classify(df, layout, evidence)
    findings: list[Finding]
    if output_class == "frequency_table":
        findings = check_frequency(
            df,
            layout,
            policy,
            suppression_declared=bool(evidence and evidence.suppression_applied),
            margins_visible_only=bool(evidence and evidence.margins == "visible_only"),
        )
    elif output_class == "magnitude_table":
        findings = check_magnitude(df, layout, policy, evidence)
    elif output_class == "model_summary":
        findings = check_model(df, layout, policy, evidence)
    elif output_class == "correlation_matrix":
        findings = check_correlation(df, layout, policy, evidence)
    elif output_class == "survival_table":
        findings = check_survival(df, layout, policy)
    else:
        what = (
            "an empty table"
            if df.height == 0 or df.width == 0
            else ("no count, statistic, model or survival columns recognised")
        )
        findings = [
            Finding(
                rule=rules.UNKNOWN_TABLE,
                status=Status.REVIEW,
                message=f"cannot analyse this table ({what}): a checker must look",
                evidence={"columns": df.columns[:50]},
                policy_version=policy.label,
            )
        ]
    if output_class in ("frequency_table", "magnitude_table"):
        # counts given away by differences and denominators inside the table
        findings += check_derived(df, layout, policy)
    if evidence is not None:
        findings += _mitigation_notes(evidence, policy)
    return output_class, _with_location(findings, location)


def _mitigation_notes(evidence: TableEvidence, policy: Policy) -> list[Finding]:
    """Suppression or rounding applied by the producer: review with an automatic note (ACRO)."""
    applied = []
    if evidence.suppression_applied:
        applied.append("suppression")
    if evidence.rounding_base and evidence.rounding_base > 1:
        applied.append(f"rounding to base {evidence.rounding_base}")
    if not applied:
        return []
    return [
        Finding(
            rule=rules.MITIGATION_APPLIED,
            status=Status.REVIEW,
            message=f"the producer applied {' and '.join(applied)}; mitigated outputs "
            "are reviewed by a checker",
            evidence={"notes": evidence.notes},
            policy_version=policy.label,
        )
    ]

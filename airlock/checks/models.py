"""Model outputs: regression summaries and correlation matrices.

Residual degrees of freedom and N come from the evidence file or from the table itself (a
statsmodels summary lists "Df Residuals" and "No. Observations"); without either, ``review``.
"""

from __future__ import annotations

import math
import re
from typing import Any

import polars as pl

from airlock.checks import rules
from airlock.checks.findings import Finding, Status
from airlock.checks.layout import Layout, Role, _normalised, _text, parse_number, words
from airlock.evidence import TableEvidence
from airlock.policy import Policy

COEF_WORDS = {
    "coef",
    "coefficient",
    "estimate",
    "beta",
    "b",
    "or",
    "hr",
    "irr",
    "rr",
    "odds",
    "hazard",
    "exp",
    "params",
    "log",
}
SE_WORDS = {
    "se",
    "std",
    "err",
    "stderr",
    "error",
    "bse",
    "t",
    "z",
    "p",
    "pvalue",
    "pvalues",
    "0",
    "025",
    "975",
    "ci",
    "conf",
    "lower",
    "upper",
    "tvalues",
}
DOF_KEYS = {
    "df residuals",
    "df resid",
    "df_resid",
    "residual df",
    "df model residual",
    "degrees of freedom residual",
    "residual degrees of freedom",
}
NOBS_KEYS = {"no observations", "nobs", "n obs", "observations", "number of obs", "n"}


def looks_like_model(frame: pl.DataFrame) -> bool:
    if any(k in DOF_KEYS for k in _key_values(frame)):
        return True  # a model information table ("Df Residuals: 190")
    heads = [set(words(c)) for c in frame.columns]
    has_coef = any(h & COEF_WORDS for h in heads)
    has_se = sum(1 for h in heads if h & SE_WORDS) >= 1
    first = frame.columns[0] if frame.columns else ""
    rows = {_text(v).lower() for v in frame[first].to_list()} if frame.height else set()
    has_const = bool(rows & {"intercept", "const", "(intercept)", "constant"})
    return (has_coef and has_se) or (has_const and (has_coef or has_se))


def looks_like_correlation(frame: pl.DataFrame, layout: Layout) -> bool:
    numeric = [c for c in frame.columns if layout.roles[c] != Role.LABEL]
    labels = layout.columns(Role.LABEL)
    if len(numeric) < 2 or frame.height < 2:
        return False
    if len(labels) == 1:
        names = [_text(v) for v in frame[labels[0]].to_list()]
        if names != numeric[: len(names)] or len(names) != len(numeric):
            return False
    elif labels or frame.height != len(numeric):
        return False
    for i, column in enumerate(numeric):
        values = layout.parsed[column].values
        if values[i] is None or not math.isclose(values[i], 1.0, abs_tol=1e-9):
            return False
        if any(v is not None and abs(v) > 1 + 1e-9 for v in values):
            return False
    return True


def _key_values(frame: pl.DataFrame) -> dict[str, float]:
    """Key/value pairs written side by side (statsmodels summary tables): 'Df Residuals:', 190."""
    found: dict[str, float] = {}
    columns = frame.columns
    for row in frame.iter_rows():
        for i, cell in enumerate(row[:-1]):
            key = _normalised(_text(cell))
            if key in DOF_KEYS | NOBS_KEYS:
                value = parse_number(_text(row[i + 1]))
                if value is not None:
                    found.setdefault(key, value)
    # or as columns: a column named df_resid / nobs with one value
    for column in columns:
        key = " ".join(words(column))
        if key in DOF_KEYS | NOBS_KEYS and frame.height >= 1:
            value = parse_number(_text(frame[column][0]))
            if value is not None:
                found.setdefault(key, value)
    return found


# a level of a categorical predictor as formula front ends name it: patsy/statsmodels
# `sex[T.M]`, `C(site)[T.Malta]`, `C(site, Treatment('UK'))[T.FR]`
_LEVEL = re.compile(r"^\s*(?:C\(\s*)?([A-Za-z_][\w.]*)[^\[]*\[T\.(.+)\]\s*$")


def _categorical_levels(frame: pl.DataFrame) -> dict[str, list[str]]:
    """Categorical predictors and their levels named in the table's cells."""
    found: dict[str, list[str]] = {}
    for column in frame.columns:
        if frame.schema[column] != pl.String:
            continue
        for cell in frame[column].drop_nulls().unique(maintain_order=True):
            if m := _LEVEL.match(cell):
                found.setdefault(m.group(1), []).append(m.group(2))
    return found


def check_model(
    frame: pl.DataFrame,
    layout: Layout,
    policy: Policy,
    evidence: TableEvidence | None = None,
    location: dict | None = None,
) -> list[Finding]:
    model = evidence.model if evidence and evidence.model else None
    table = _key_values(frame)
    dof = model.df_resid if model and model.df_resid is not None else None
    nobs = model.nobs if model and model.nobs is not None else None
    n_params = model.n_params if model and model.n_params is not None else None
    if dof is None:
        dof = next((v for k, v in table.items() if k in DOF_KEYS), None)
    if nobs is None:
        hit = next((v for k, v in table.items() if k in NOBS_KEYS), None)
        nobs = int(hit) if hit is not None else None
    if n_params is None and not table:
        n_params = frame.height  # one row per parameter
    if dof is None and nobs is not None and n_params is not None:
        dof = nobs - n_params
    loc = dict(location or {})
    findings: list[Finding] = []

    def emit(breach: rules.Breach | None, cells: list[dict[str, Any]] | None = None) -> None:
        if breach:
            findings.append(
                Finding(
                    rule=breach.rule,
                    status=breach.status,
                    message=breach.message,
                    cells=cells or ([loc] if loc else []),
                    evidence=breach.evidence,
                    policy_version=policy.label,
                )
            )

    if dof is None:
        emit(
            rules.Breach(
                rules.MODEL_EVIDENCE_MISSING,
                Status.REVIEW,
                "the residual degrees of freedom are not known: the table does not "
                "show them and no evidence file gives them (nobs and parameters)",
            )
        )
    else:
        emit(rules.residual_dof(dof, policy))
    if nobs is not None and n_params is not None:
        emit(rules.params_vs_n(n_params, nobs, policy))
    # A level held by one or two children is fitted to them: its coefficient is their outcome.
    # Only the counts per level can show it is not (evidence; tre.outputs writes them).
    known = set(model.categorical_cells) if model else set()
    unverified = {v: ls for v, ls in _categorical_levels(frame).items() if v not in known}
    if unverified:
        names = "; ".join(f"{v}: {', '.join(ls)}" for v, ls in unverified.items())
        emit(
            rules.Breach(
                rules.CATEGORICAL_UNVERIFIED,
                Status.REVIEW,
                f"how many children each level of a categorical predictor holds is not known "
                f"({names}): a level held by very few is fitted to them, and its coefficient "
                "gives their outcome; give the counts per level as evidence (tre.outputs does)",
            ),
            [{"variable": v, "levels": ls, **loc} for v, ls in unverified.items()],
        )
    for variable, levels in (model.categorical_cells if model else {}).items():
        for level, count in levels.items():
            breach = rules.count_cell(count, policy)
            if breach:
                emit(
                    rules.Breach(
                        rules.CATEGORICAL_CELL,
                        breach.status,
                        f"level {level!r} of {variable!r}: {breach.message}",
                        breach.evidence,
                    ),
                    [{"variable": variable, "level": level, "count": count, **loc}],
                )
    return findings


def check_correlation(
    frame: pl.DataFrame,
    layout: Layout,
    policy: Policy,
    evidence: TableEvidence | None = None,
    location: dict | None = None,
) -> list[Finding]:
    findings: list[Finding] = []
    numeric = [c for c in frame.columns if layout.roles[c] != Role.LABEL]
    perfect: list[dict[str, Any]] = []
    for i, column in enumerate(numeric):
        for j, value in enumerate(layout.parsed[column].values):
            if j != i and value is not None and rules.correlation_perfect(value):
                perfect.append({"row": j, "column": column, "value": value, **(location or {})})
    if perfect:
        b = rules.correlation_perfect(1.0)
        assert b is not None
        findings.append(
            Finding(
                rule=b.rule,
                status=b.status,
                message=f"{len(perfect)} off-diagonal correlation(s) of exactly "
                "+-1: check for a deterministic relation or very few "
                "observations",
                cells=perfect,
                policy_version=policy.label,
            )
        )
    n = evidence.correlation_n if evidence else None
    if n is None and evidence and evidence.model and evidence.model.nobs is not None:
        n = evidence.model.nobs
    if n is None:
        findings.append(
            Finding(
                rule=rules.CORRELATION_EVIDENCE_MISSING,
                status=Status.REVIEW,
                message="the number of observations behind the correlations "
                "is not known (no evidence file)",
                policy_version=policy.label,
            )
        )
    else:
        b2 = rules.correlation_min_n(n, policy)
        if b2:
            findings.append(
                Finding(
                    rule=b2.rule,
                    status=b2.status,
                    message=b2.message,
                    evidence=b2.evidence,
                    policy_version=policy.label,
                    cells=[location] if location else [],
                )
            )
    return findings

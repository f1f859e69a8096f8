"""Survival outputs: life tables and Kaplan-Meier tables.

A step where fewer than ``survival_min_step`` people leave the risk set (events plus
censored), or a row with a small positive number of events or censorings, identifies them.
Stratified tables (a group label column) are checked within each group.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from airlock.checks import rules
from airlock.checks.derived import half_unit
from airlock.checks.findings import Finding, Status
from airlock.checks.layout import Layout, Role, words

TIME_WORDS = {
    "time",
    "timeline",
    "t",
    "days",
    "months",
    "years",
    "interval",
    "start",
    "tstart",
    "event_at",
    "followup",
    "follow",
}
AT_RISK = {
    "at risk",
    "at_risk",
    "n risk",
    "n_risk",
    "n at risk",
    "no at risk",
    "number at risk",
    "risk set",
    "nrisk",
}
EVENTS = {
    "events",
    "observed",
    "event",
    "deaths",
    "d",
    "n event",
    "died",
    "failures",
    "n events",
    "number of events",
    "dead",
    "relapses",
}
CENSORED = {
    "censored",
    "n censor",
    "censor",
    "lost",
    "withdrawn",
    "censorings",
    "number censored",
    "n censored",
}
REMOVED = {"removed", "left", "leaving"}
# 1 - S(t): cumulative incidence / failure curves step where the survival curve does
INCIDENCE = {
    "cumulative incidence",
    "cuminc",
    "cif",
    "cumulative failure",
    "failure probability",
    "cumulative risk",
    "1 survival",
}
ESTIMATE = {
    "survival",
    "surv",
    "km estimate",
    "km_estimate",
    "survival function",
    "s t",
    "survival probability",
    "estimate",
    "cumulative survival",
}


def _kind(column: str) -> str | None:
    key = " ".join(words(column))
    for name, keys in (
        ("at_risk", AT_RISK),
        ("events", EVENTS),
        ("censored", CENSORED),
        ("removed", REMOVED),
        ("estimate", ESTIMATE),
        ("incidence", INCIDENCE),
    ):
        if key in keys or key.replace(" ", "_") in keys:
            return name
    if key.startswith("km") or key.startswith("survival"):
        return "estimate"
    if set(words(column)) & TIME_WORDS or key in {"event at", "time at", "timeline"}:
        return "time"
    return None


def survival_columns(frame: pl.DataFrame) -> dict[str, str]:
    kinds: dict[str, str] = {}
    for column in frame.columns:
        kind = _kind(column)
        if kind and kind not in kinds:
            kinds[kind] = column
    curve = "estimate" in kinds or "incidence" in kinds
    if "time" not in kinds and (curve or "at_risk" in kinds) and frame.width:
        # an unnamed time axis (a pandas index written as 'index' or ''): the first column,
        # when it is numeric and never decreases
        first = frame.columns[0]
        series = frame[first]
        if series.dtype.is_numeric() and series.null_count() == 0 and frame.height > 1:
            if bool((series.diff().drop_nulls() >= 0).all()) and first not in kinds.values():
                kinds["time"] = first
    return kinds


def looks_like_survival(frame: pl.DataFrame) -> bool:
    kinds = survival_columns(frame)
    return "time" in kinds and (
        "at_risk" in kinds
        or "estimate" in kinds
        or "incidence" in kinds
        or ("events" in kinds and "censored" in kinds)
    )


def check_survival(
    frame: pl.DataFrame, layout: Layout, policy: Any, location: dict | None = None
) -> list[Finding]:
    kinds = survival_columns(frame)
    groups_by = [c for c in layout.columns(Role.LABEL) if c not in kinds.values()]
    hits: list[dict[str, Any]] = []
    first_breach: rules.Breach | None = None

    def values(kind: str) -> list[float | None] | None:
        column = kinds.get(kind)
        return layout.parsed[column].values if column else None

    at_risk, events, censored, removed = (
        values(k) for k in ("at_risk", "events", "censored", "removed")
    )
    if at_risk is None and events is None and removed is None:
        return [
            Finding(
                rule=rules.SURVIVAL_EVIDENCE_MISSING,
                status=Status.REVIEW,
                message="survival estimates without numbers at risk or events: the size "
                "of each step cannot be checked; add the number at risk and events",
                policy_version=policy.label,
            )
        ]
    implied = implied_events(frame, layout, kinds, groups_by) if events is None else {}
    previous: dict[tuple, float] = {}
    for row in range(frame.height):
        group = tuple(str(frame[c][row]) for c in groups_by)
        checks = []
        if row in implied:
            # no events column, but the curve's step and the number at risk give the events
            checks.append((f"events implied by the step of {implied[row][1]}", *implied[row]))
        for what, series in (("events", events), ("censored", censored), ("removed", removed)):
            if series is not None and series[row] is not None:
                checks.append((f"{what} in one row", series[row], kinds[what]))
        if at_risk is not None and at_risk[row] is not None:
            prior = previous.get(group)
            if prior is not None:
                checks.append(
                    ("drop in the number at risk", prior - at_risk[row], kinds["at_risk"])
                )
            previous[group] = at_risk[row]
        for what, amount, column in checks:
            breach = rules.survival_step(amount, what, policy)
            if breach:
                first_breach = first_breach or breach
                cell: dict[str, Any] = {"row": row, "column": column, "step": amount}
                if groups_by:
                    cell["labels"] = dict(zip(groups_by, group, strict=True))
                cell.update(location or {})
                hits.append(cell)
    findings: list[Finding] = []
    tail = []
    for row, value in enumerate(at_risk or []):
        if value is not None and rules.survival_at_risk(value, policy):
            cell = {"row": row, "column": kinds["at_risk"], "value": value}
            cell.update(location or {})
            tail.append(cell)
    if tail:
        example = rules.survival_at_risk(tail[0]["value"], policy)
        assert example is not None
        findings.append(
            Finding(
                rule=example.rule,
                status=example.status,
                message=f"{len(tail)} row(s) with fewer than {policy.survival_min_step} at "
                f"risk; e.g. {example.message}",
                cells=tail,
                evidence=example.evidence,
                policy_version=policy.label,
            )
        )
    if not hits or first_breach is None:
        return findings
    return findings + [
        Finding(
            rule=rules.SURVIVAL_STEP,
            status=Status.FAIL,
            message=f"{len(hits)} step(s) below the survival minimum "
            f"{policy.survival_min_step}; e.g. {first_breach.message}. Group the times "
            "(life table intervals) so that each step holds enough people",
            cells=hits,
            evidence={"survival_min_step": policy.survival_min_step},
            policy_version=policy.label,
        )
    ]


def implied_events(
    frame: pl.DataFrame, layout: Layout, kinds: dict[str, str], groups_by: list[str]
) -> dict[int, tuple[float, str]]:
    """Events a Kaplan-Meier table shows without an events column: each step of the curve is
    S(t) = S(t-) (1 - d / n), so d = n (1 - S(t) / S(t-)) with n at risk. Rows whose step could
    only come from few events map to (the most events the printed, rounded numbers allow,
    the estimate column). The number at risk is taken as the larger of this row's and the
    previous row's (a table sampled at intervals), so the bound never understates the events.
    """
    curve = kinds.get("estimate") or kinds.get("incidence")
    if curve is None or "at_risk" not in kinds:
        return {}
    values = layout.parsed[curve].values
    at_risk = layout.parsed[kinds["at_risk"]].values
    known = [v for v in values if v is not None]
    if not known:
        return {}
    scale = 100.0 if max(known) > 1.0 + 1e-9 else 1.0  # percentages
    h = half_unit(known) / scale
    survival = [
        None if v is None else (1.0 - v / scale if curve == kinds.get("incidence") else v / scale)
        for v in values
    ]
    out: dict[int, tuple[float, str]] = {}
    last: dict[tuple, tuple[float, float, bool]] = {}  # group -> (S, at risk, printed S)
    for row in range(frame.height):
        group = tuple(str(frame[c][row]) for c in groups_by)
        s, n = survival[row], at_risk[row]
        if s is None or n is None:
            continue
        s_prev, n_prev, printed = last.get(group, (1.0, n, False))
        last[group] = (s, n, True)
        if s >= s_prev - 1e-12 or s_prev <= 0:
            continue  # no step
        h_prev = h if printed else 0.0  # the curve starts at exactly 1
        ratio_low = max(0.0, (s - h) / (s_prev + h_prev))
        most = max(n, n_prev) * (1.0 - ratio_low)
        out[row] = (round(most, 3), curve)
    return out

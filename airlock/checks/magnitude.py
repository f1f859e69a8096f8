"""Magnitude tables (sum, mean, median, min, max, percentiles, std, mode).

Their risks (dominance, class disclosure, exposed extremes) depend on the contributions behind
each cell, which the table does not show: they come from the evidence file. Without evidence a
cell is never passed silently: it is ``review`` with a message naming the missing evidence, and
an exact minimum or maximum fails outright.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from airlock.checks import rules
from airlock.checks.findings import Finding, Status
from airlock.checks.frequency import check_count_cells, count_cells
from airlock.checks.layout import Layout, Role
from airlock.evidence import CellEvidence, TableEvidence
from airlock.policy import Policy

LINEAR = {"sum", "mean", "unknown", "std"}
EXTREMES = {"min", "max"}
PERCENTILES = {"median", "percentile", "mode"}
# ACRO check names -> our rules (ACRO 1.0.x spells them like this in results.json)
ACRO_RULES = {
    "MinimumThresholdCheck": rules.MIN_CONTRIBUTORS,
    "threshold": rules.MIN_CONTRIBUTORS,
    "NKCheck": rules.NK_DOMINANCE,
    "nk-rule": rules.NK_DOMINANCE,
    "PPercentCheck": rules.P_RATIO,
    "p-ratio": rules.P_RATIO,
    "all-values-are-same": rules.CLASS_DISCLOSURE,
    "negative": rules.NEGATIVE_VALUES,
    "missing": rules.MISSING_VALUES,
}


def evidence_index(evidence: TableEvidence | None) -> dict[tuple, CellEvidence]:
    index: dict[tuple, CellEvidence] = {}
    for cell in evidence.cells if evidence else []:
        if cell.row is not None:
            index[("row", cell.row, cell.column)] = cell
        if cell.labels:
            index[("labels", tuple(sorted(cell.labels.items())), cell.column)] = cell
    return index


def find_evidence(
    index: dict[tuple, CellEvidence], row: int, column: str, labels: dict[str, str]
) -> CellEvidence | None:
    if labels:
        hit = index.get(("labels", tuple(sorted(labels.items())), column))
        if hit is not None:
            return hit
    return index.get(("row", row, column))


def values_match(shown: float, claimed: float | None) -> bool:
    """The table's value equals the evidence's, allowing for the decimals the table shows."""
    if claimed is None:
        return True
    if abs(shown - claimed) <= 1e-9 * max(1.0, abs(claimed)):
        return True
    text = repr(float(shown))
    decimals = len(text.split(".")[1]) if "." in text and "e" not in text else 0
    return round(claimed, decimals) == round(shown, decimals)


def acro_is_as_strict(evidence: TableEvidence, policy: Policy) -> bool:
    """Whether ACRO ran with thresholds at least as strict as ours (from its config.json)."""
    cfg = evidence.acro.config if evidence.acro else {}
    try:
        return (
            int(cfg["safe_threshold"]) >= policy.min_cell_count
            and int(cfg["safe_nk_n"]) >= policy.nk_n
            and float(cfg["safe_nk_k"]) <= policy.nk_k
            and float(cfg["safe_pratio_p"]) >= policy.p_ratio
        )
    except (KeyError, TypeError, ValueError):
        return False


def cell_rules(cell: CellEvidence, statistic: str, policy: Policy) -> list[rules.Breach]:
    """Every magnitude rule for one cell with producer evidence."""
    out: list[rules.Breach | None] = []
    if cell.n is None:
        return [
            rules.Breach(
                rules.MAGNITUDE_EVIDENCE_MISSING,
                Status.REVIEW,
                "evidence gives no number of contributors for this cell",
            )
        ]
    if cell.n == 0:
        return []
    out.append(rules.min_contributors(cell.n, policy))
    if cell.n_distinct is not None:
        out.append(rules.class_disclosure(cell.n_distinct, cell.n))
    out.append(rules.missing_values(cell.missing, policy))
    if cell.negative:
        out.append(rules.negative_values(True))
    elif statistic in LINEAR:
        if not cell.largest or cell.total is None:
            out.append(
                rules.Breach(
                    rules.MAGNITUDE_EVIDENCE_MISSING,
                    Status.REVIEW,
                    "evidence lacks the largest contributions or the cell total needed for the "
                    "dominance rules",
                )
            )
        else:
            out.append(rules.nk_dominance(cell.largest, cell.total, policy))
            out.append(rules.p_ratio(cell.largest, cell.total, policy))
    if statistic in EXTREMES:
        out.append(rules.extreme_value(statistic, cell.n_at_value, policy))
    elif statistic in PERCENTILES:
        out.append(rules.percentile_value(statistic, cell.n_at_value, policy))
    return [b for b in out if b is not None]


def check_magnitude(
    frame: pl.DataFrame,
    layout: Layout,
    policy: Policy,
    evidence: TableEvidence | None = None,
    location: dict | None = None,
) -> list[Finding]:
    grouped: dict[tuple[str, Status], list[tuple[rules.Breach, dict[str, Any]]]] = {}
    index = evidence_index(evidence)
    from_acro = evidence is not None and evidence.acro is not None
    acro_ok = from_acro and acro_is_as_strict(evidence, policy)  # type: ignore[arg-type]
    stat_columns = layout.columns(Role.STATISTIC)
    missing_evidence: list[dict[str, Any]] = []
    mismatched: list[dict[str, Any]] = []
    acro_cells = 0
    acro_value_columns = [c for c in frame.columns if layout.roles[c] != Role.LABEL]

    def add(breach: rules.Breach, ref: dict[str, Any]) -> None:
        grouped.setdefault((breach.rule, breach.status), []).append((breach, ref))

    for column in stat_columns:
        column_statistic = layout.statistic.get(column, "unknown")
        parsed = layout.parsed[column]
        for row in range(frame.height):
            value = parsed.values[row]
            if value is None:
                continue
            statistic = column_statistic
            if statistic == "unknown" and row in layout.row_statistic:
                statistic = layout.row_statistic[row]  # statistics in rows: describe()
            labels = layout.labels_of(row, frame)
            ref: dict[str, Any] = {"row": row, "column": column, "value": value}
            if labels:
                ref["labels"] = labels
            ref.update(location or {})
            if statistic == "count":
                breach = rules.count_cell(value, policy)
                if breach:
                    add(breach, ref)
                continue
            cell = find_evidence(index, row, column, labels)
            if cell is None and from_acro:
                cell = find_evidence(index, row, str(acro_value_columns.index(column)), {})
            if cell is None:
                if statistic in EXTREMES:
                    add(rules.extreme_value(statistic, None, policy), ref)  # type: ignore[arg-type]
                else:
                    missing_evidence.append(ref)
                continue
            if not values_match(value, cell.value):
                mismatched.append({**ref, "evidence_value": cell.value})
                continue
            if cell.acro_checks is not None:
                acro_cells += 1
                for check in cell.acro_checks:
                    rule = ACRO_RULES.get(check)
                    if rule:
                        add(
                            rules.Breach(rule, Status.FAIL, f"ACRO flagged this cell ({check})"),
                            ref,
                        )
                if statistic in EXTREMES:
                    add(rules.extreme_value(statistic, None, policy), ref)  # type: ignore[arg-type]
                continue
            for breach in cell_rules(cell, statistic, policy):
                add(breach, ref)

    findings: list[Finding] = []
    for (rule, status), items in grouped.items():
        first = items[0][0]
        findings.append(
            Finding(
                rule=rule,
                status=status,
                message=first.message
                if len(items) == 1
                else f"{len(items)} cells; e.g. {first.message}",
                cells=[ref for _, ref in items],
                evidence=first.evidence,
                policy_version=policy.label,
            )
        )
    if missing_evidence:
        findings.append(
            Finding(
                rule=rules.MAGNITUDE_EVIDENCE_MISSING,
                status=Status.REVIEW,
                message=f"{len(missing_evidence)} magnitude cell(s) without evidence: the "
                "dominance (NK, p-ratio), class-disclosure and minimum-contributor rules need, "
                "per cell, the number of contributors, the largest contributions, the cell total "
                "and the number of distinct values (write the table with tre.outputs, or attach "
                "an evidence file)",
                cells=missing_evidence,
                policy_version=policy.label,
            )
        )
    if mismatched:
        findings.append(
            Finding(
                rule=rules.EVIDENCE_MISMATCH,
                status=Status.REVIEW,
                message=f"{len(mismatched)} cell(s) differ from the evidence file: the evidence "
                "does not describe this table",
                cells=mismatched,
                policy_version=policy.label,
            )
        )
    if from_acro and acro_cells:
        problems = [
            "ACRO 1.0's all-values-identical check never fires, so class disclosure is not excluded"
        ]
        if not acro_ok:
            problems.append(
                "ACRO's thresholds (config.json) are missing or less strict than "
                "this project's policy"
            )
        findings.append(
            Finding(
                rule=rules.MAGNITUDE_EVIDENCE_MISSING,
                status=Status.REVIEW,
                message="evidence from an ACRO bundle: " + "; ".join(problems),
                evidence={"acro": evidence.acro.model_dump() if evidence and evidence.acro else {}},
                policy_version=policy.label,
            )
        )
    # the table's own count columns (e.g. n per row) are frequency cells
    counts = count_cells(frame, layout)
    if counts:
        findings += check_count_cells(frame, layout, counts, policy, location)
    if not stat_columns:
        findings.append(
            Finding(
                rule=rules.UNKNOWN_TABLE,
                status=Status.REVIEW,
                message="no statistic columns recognised",
                policy_version=policy.label,
            )
        )
    return findings

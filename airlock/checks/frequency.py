"""Frequency tables (long or wide): thresholds, zeros, suppression, rounding and margins.

Every count cell is checked with the rules in ``rules.py``; margins (rows or columns labelled
"Total", "All", ...) become linear equations over the cells so that a suppressed cell that can be
recomputed from totals and visible cells (secondary disclosure) is found, and totals that do
not add up are sent to a human.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import polars as pl

from airlock.checks import rules
from airlock.checks.findings import Finding, Status
from airlock.checks.layout import Layout, Role, is_ambiguous_total, is_total_label
from airlock.policy import Policy

COLUMN_DIM = "__column__"


@dataclass
class CountCell:
    row: int
    column: str
    value: float | None
    suppressed: bool
    labels: dict[str, str]
    upper: float | None = None  # what a marker such as '<10' says about the hidden value


def count_cells(frame: pl.DataFrame, layout: Layout) -> list[CountCell]:
    cells: list[CountCell] = []
    for column in layout.columns(Role.COUNT):
        parsed = layout.parsed[column]
        for row in range(frame.height):
            cells.append(
                CountCell(
                    row,
                    column,
                    parsed.values[row],
                    parsed.suppressed[row],
                    layout.labels_of(row, frame),
                    parsed.upper.get(row),
                )
            )
    return cells


def cell_ref(cell: CountCell, location: dict | None = None, **extra: Any) -> dict[str, Any]:
    ref: dict[str, Any] = {"row": cell.row, "column": cell.column}
    if cell.labels:
        ref["labels"] = cell.labels
    if cell.value is not None:
        ref["value"] = int(cell.value) if float(cell.value).is_integer() else cell.value
    ref.update(extra)
    ref.update(location or {})
    return ref


def margin_equations(
    cells: list[CountCell], layout: Layout, policy: Policy
) -> list[rules.MarginEquation]:
    """Equations ``total = sum(parts)`` along every dimension that has a margin.

    Dimensions are the label columns plus, when there are several count columns, the column
    itself. Rows with duplicate keys make the layout ambiguous: then no equations are built.
    """
    dims = layout.columns(Role.LABEL)
    multi_column = len(layout.columns(Role.COUNT)) > 1
    implicit = implicit_total_columns(cells, layout, policy) if multi_column else set()
    keys = [
        tuple(c.labels.get(d, "") for d in dims)
        + ((policy.total_labels[0] if c.column in implicit else c.column,) if multi_column else ())
        for c in cells
    ]
    return confirmed_equations(
        keys, [c.value for c in cells], [c.suppressed for c in cells], policy
    )


def implicit_total_columns(cells: list[CountCell], layout: Layout, policy: Policy) -> set[str]:
    """A count column that is not labelled as a total but equals the sum of the other count
    columns in every fully visible row (at least two rows), e.g. an 'N' column: a margin."""
    columns = layout.columns(Role.COUNT)
    if any(is_total_label(c, policy, ambiguous=False) for c in columns) or len(columns) < 3:
        return set()
    by_row: dict[int, dict[str, CountCell]] = {}
    for c in cells:
        by_row.setdefault(c.row, {})[c.column] = c
    found = set()
    for candidate in columns:
        others = [c for c in columns if c != candidate]
        checked = 0
        holds = True
        for row in by_row.values():
            line = [row[c] for c in columns if c in row]
            if len(line) != len(columns) or any(x.suppressed or x.value is None for x in line):
                continue
            checked += 1
            if row[candidate].value != sum(row[c].value or 0 for c in others):
                holds = False
                break
        if holds and checked >= 2:
            found.add(candidate)
    return found if len(found) == 1 else set()


def confirmed_equations(
    keys: list[tuple[str, ...]],
    values: list[float | None],
    suppressed: list[bool],
    policy: Policy,
    tolerance: float = 0.0,
) -> list[rules.MarginEquation]:
    """Margin equations, after dropping ambiguous margin labels ('All') whose fully visible
    lines never add up: such a label names a category (ALL is a leukaemia), not a total."""
    not_totals: set[tuple[int, str]] = set()
    # a dimension with a plain 'Total' has no second margin: 'All' there is a category
    plain = {
        d
        for key in keys
        for d, part in enumerate(key)
        if is_total_label(part, policy, ambiguous=False)
    }
    not_totals |= {
        (d, part)
        for key in keys
        for d, part in enumerate(key)
        if d in plain and is_ambiguous_total(part, policy)
    }
    for _ in range(len(keys) + 1):
        equations = cube_equations(keys, policy, not_totals)
        groups: dict[tuple[int, str], list[rules.MarginEquation]] = {}
        for eq in equations:
            groups.setdefault(eq.margin, []).append(eq)
        rejected = set()
        for (dim, label), eqs in groups.items():
            if not is_ambiguous_total(label, policy):
                continue
            visible = [e for e in eqs if not any(suppressed[i] for i in [e.total, *e.parts])]
            holds = [
                abs((values[e.total] or 0) - sum(values[p] or 0 for p in e.parts))
                <= tolerance * (len(e.parts) + 1)
                for e in visible
            ]
            # parts that would have to be negative also rule a margin out
            infeasible = any(
                (values[e.total] or 0)
                < sum(values[p] or 0 for p in e.parts if not suppressed[p])
                - tolerance * (len(e.parts) + 1)
                for e in eqs
                if not suppressed[e.total]
            )
            if (visible and not any(holds)) or infeasible:
                rejected.add((dim, label))
        if not rejected:
            return equations
        not_totals |= rejected
    return []


def cube_equations(
    keys: list[tuple[str, ...]],
    policy: Policy,
    not_totals: set[tuple[int, str]] | None = None,
) -> list[rules.MarginEquation]:
    """Margin equations of a table whose cells are identified by ``keys`` (one value per
    dimension). A cell whose value in dimension d is a total label (``policy.total_labels``) is
    the sum of the cells that agree with it on every other dimension and are not totals in d.
    Duplicate keys make the layout ambiguous: then no equations are returned."""
    index: dict[tuple[str, ...], int] = {}
    for i, key in enumerate(keys):
        if key in index:
            return []
        index[key] = i
    if not keys:
        return []
    n_dims = len(keys[0])
    skip = not_totals or set()
    is_total = [
        [is_total_label(part, policy) and (d, part) not in skip for d, part in enumerate(key)]
        for key in keys
    ]
    equations: list[rules.MarginEquation] = []
    for d in range(n_dims):
        # group the non-total cells of dimension d by their other coordinates
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, key in enumerate(keys):
            if not is_total[i][d]:
                groups.setdefault(key[:d] + key[d + 1 :], []).append(i)
        for i, key in enumerate(keys):
            if is_total[i][d]:
                parts = groups.get(key[:d] + key[d + 1 :], [])
                if parts:
                    equations.append(rules.MarginEquation(i, parts, (d, key[d])))
    return equations


def check_frequency(
    frame: pl.DataFrame,
    layout: Layout,
    policy: Policy,
    location: dict | None = None,
    suppression_declared: bool = False,
    margins_visible_only: bool = False,
) -> list[Finding]:
    cells = count_cells(frame, layout)
    return check_count_cells(
        frame,
        layout,
        cells,
        policy,
        location,
        suppression_declared,
        margins_visible_only=margins_visible_only,
    )


def check_count_cells(
    frame: pl.DataFrame,
    layout: Layout,
    cells: list[CountCell],
    policy: Policy,
    location: dict | None = None,
    suppression_declared: bool = False,
    with_margins: bool = True,
    margins_visible_only: bool = False,
) -> list[Finding]:
    found: dict[str, list[tuple[rules.Breach, dict]]] = {}
    visible = [c for c in cells if not c.suppressed and c.value is not None]
    rounded = rules.is_rounded([c.value for c in visible if c.value is not None], policy)
    for c in visible:
        breach = rules.count_cell(c.value or 0.0, policy) or rules.negative_count(c.value or 0.0)
        if breach:
            found.setdefault(breach.rule, []).append((breach, cell_ref(c, location)))
    findings = [_grouped(rule, items, policy) for rule, items in found.items()]

    suppressed = [c for c in cells if c.suppressed]
    if suppressed:
        findings.append(
            Finding(
                rule=rules.SUPPRESSION_APPLIED,
                status=Status.REVIEW,
                message=f"{len(suppressed)} cell(s) suppressed; the margins were checked for "
                "recoverability. Suppression is a mitigation: a checker confirms it.",
                cells=[cell_ref(c, location) for c in suppressed],
                evidence={"suppressed_cells": len(suppressed)},
                policy_version=policy.label,
            )
        )
    elif suppression_declared:
        findings.append(
            Finding(
                rule=rules.SUPPRESSION_APPLIED,
                status=Status.REVIEW,
                message="the producer applied suppression; a checker confirms it",
                policy_version=policy.label,
            )
        )

    if with_margins:
        findings += _margin_findings(cells, layout, policy, location, rounded, margins_visible_only)
        findings += _percent_findings(frame, layout, cells, policy, location)
    note = rules.rounding_note([c.value for c in visible if c.value is not None], policy)
    if note:
        findings.append(
            Finding(
                rule=note.rule,
                status=note.status,
                message=note.message,
                evidence=note.evidence,
                policy_version=policy.label,
            )
        )
    if not cells and not layout.columns(Role.CUMULATIVE):
        findings.append(
            Finding(
                rule=rules.UNKNOWN_TABLE,
                status=Status.REVIEW,
                message="no count cells recognised in this table",
                policy_version=policy.label,
            )
        )
    return findings


def _margin_findings(
    cells: list[CountCell],
    layout: Layout,
    policy: Policy,
    location: dict | None,
    rounded: bool,
    visible_only: bool = False,
) -> list[Finding]:
    equations = margin_equations(cells, layout, policy)
    if not equations:
        return []
    if visible_only:
        # declared: totals were computed from the visible cells after suppression, so they
        # carry nothing about the suppressed ones; only their consistency is checked
        equations = [
            rules.MarginEquation(e.total, [p for p in e.parts if not cells[p].suppressed], e.margin)
            for e in equations
            if not cells[e.total].suppressed
        ]
    recovered, inconsistent = rules.recoverable_cells(
        [c.value for c in cells],
        [c.suppressed for c in cells],
        equations,
        policy,
        upper=[c.upper for c in cells],
    )
    findings: list[Finding] = []
    if recovered:
        status = Status.REVIEW if rounded else Status.FAIL
        findings.append(
            Finding(
                rule=rules.SECONDARY_DISCLOSURE,
                status=status,
                message=f"{len(recovered)} suppressed cell(s) can be recomputed from the margins "
                "and visible cells; suppress more cells (secondary suppression) or recompute "
                "the totals after suppression"
                + (
                    " (counts are rounded, so the recovered values are approximate)"
                    if rounded
                    else ""
                ),
                cells=[
                    cell_ref(cells[r.cell], location, recovered_value=r.value, how=r.how)
                    for r in recovered
                ],
                evidence={"recoverable": len(recovered)},
                policy_version=policy.label,
            )
        )
    if inconsistent and not rounded:
        findings.append(
            Finding(
                rule=rules.MARGIN_INCONSISTENT,
                status=Status.REVIEW,
                message=f"{len(inconsistent)} total(s) do not equal the sum of their cells "
                "(computed before suppression, on other data, or wrong): a checker must look",
                cells=[
                    cell_ref(
                        cells[equations[e].total],
                        location,
                        parts=[cells[p].labels or cells[p].column for p in equations[e].parts],
                    )
                    for e in inconsistent
                ],
                evidence={"inconsistent_margins": len(inconsistent)},
                policy_version=policy.label,
            )
        )
    return findings


def _percent_findings(
    frame: pl.DataFrame,
    layout: Layout,
    cells: list[CountCell],
    policy: Policy,
    location: dict | None,
) -> list[Finding]:
    """A suppressed count beside a visible percentage in the same row can be recomputed."""
    percents = layout.columns(Role.PERCENT)
    if not percents:
        return []
    hits = []
    for c in cells:
        if not c.suppressed:
            continue
        shown = [p for p in percents if layout.parsed[p].values[c.row] is not None]
        if shown:
            hits.append(cell_ref(c, location, percent_columns=shown))
    if not hits:
        return []
    return [
        Finding(
            rule=rules.PERCENT_REVEALS_SUPPRESSED,
            status=Status.FAIL,
            message=f"{len(hits)} suppressed count(s) sit beside a visible percentage, which "
            "with the total reveals the count: suppress the percentage too",
            cells=hits,
            policy_version=policy.label,
        )
    ]


def _grouped(rule: str, items: list[tuple[rules.Breach, dict]], policy: Policy) -> Finding:
    first = items[0][0]
    if len(items) == 1:
        message = first.message
    else:
        message = f"{len(items)} cells: {first.message}" + (
            " (and others)" if rule == rules.MIN_CELL_COUNT else ""
        )
    return Finding(
        rule=rule,
        status=first.status,
        message=message,
        cells=[ref for _, ref in items],
        evidence={k: v for k, v in first.evidence.items() if k not in {"count"}},
        policy_version=policy.label,
    )

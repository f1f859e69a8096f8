"""Every disclosure rule, once: one function per rule, used by the airlock and by ``tre.outputs``.

A rule takes numbers and the policy and returns a ``Breach`` (the rule fired: status, message,
the numbers behind it) or None. Callers attach the cells and the policy version. Thresholds come
from ``policies/disclosure.yaml`` through ``Policy``; nothing here hard-codes a threshold.

Boundary conventions (documented in docs/disclosure.md and tested at the boundary):
- a count ``n`` fails when ``0 < n < min_cell_count`` (9 fails, 10 passes); zero is its own rule;
- NK dominance fails when the ``nk_n`` largest contributions are ``>= nk_k`` of the total
  (a share exactly equal to k FAILS, as in ACRO 1.0);
- p-ratio fails when ``(total - x1 - x2) / x1 < p`` (exactly p passes);
- residual degrees of freedom fail when ``dof < min_residual_dof`` (9 fails, 10 passes);
- a survival step fails when ``0 < step < survival_min_step``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from airlock.checks.findings import Status
from airlock.policy import Policy

# Rule identifiers (what findings record in ``Finding.rule``).
MIN_CELL_COUNT = "frequency.min_cell_count"
ZERO_CELL = "frequency.zero_cell"
SECONDARY_DISCLOSURE = "frequency.secondary_disclosure"
MARGIN_INCONSISTENT = "frequency.margin_inconsistent"
SUPPRESSION_APPLIED = "frequency.suppression_applied"
ROUNDED = "frequency.rounded"
PERCENT_REVEALS_SUPPRESSED = "frequency.percentage_reveals_suppressed"
DERIVED_COUNT = "frequency.derived_count"
NEGATIVE_COUNT = "frequency.negative_count"
MIN_CONTRIBUTORS = "magnitude.min_contributors"
NK_DOMINANCE = "magnitude.nk_dominance"
P_RATIO = "magnitude.p_ratio"
CLASS_DISCLOSURE = "magnitude.class_disclosure"
EXTREME_VALUE = "magnitude.extreme_value"
PERCENTILE_VALUE = "magnitude.percentile_value"
NEGATIVE_VALUES = "magnitude.negative_values"
MISSING_VALUES = "magnitude.missing_values"
MAGNITUDE_EVIDENCE_MISSING = "magnitude.evidence_missing"
RESIDUAL_DOF = "model.residual_dof"
PARAMS_VS_N = "model.params_vs_n"
CATEGORICAL_CELL = "model.categorical_cell"
MODEL_EVIDENCE_MISSING = "model.evidence_missing"
CATEGORICAL_UNVERIFIED = "model.categorical_unverified"
CORRELATION_PERFECT = "correlation.perfect"
CORRELATION_MIN_N = "correlation.min_n"
CORRELATION_EVIDENCE_MISSING = "correlation.evidence_missing"
SURVIVAL_STEP = "survival.step"
SURVIVAL_AT_RISK = "survival.at_risk"
SURVIVAL_EVIDENCE_MISSING = "survival.evidence_missing"
EVIDENCE_MISMATCH = "evidence.mismatch"
MITIGATION_APPLIED = "evidence.mitigation_applied"
UNKNOWN_TABLE = "table.unknown"


@dataclass(frozen=True)
class Breach:
    """A rule that fired: its id, the verdict, a message for the checker, and the numbers."""

    rule: str
    status: Status
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- frequency


def min_cell_count(count: float, policy: Policy) -> Breach | None:
    """A count of people fails when it is positive and below the minimum (9 fails, 10 passes)."""
    if 0 < count < policy.min_cell_count:
        return Breach(
            MIN_CELL_COUNT,
            Status.FAIL,
            f"count {_fmt(count)} is below the minimum cell count {policy.min_cell_count}",
            {"count": count, "min_cell_count": policy.min_cell_count},
        )
    return None


def zero_cell(count: float, policy: Policy) -> Breach | None:
    """A zero cell is disclosive (it reveals that nobody has the attribute) when the policy says so.

    Structural zeros (impossible combinations) are harmless but only a human can tell them from
    sampling zeros, so the verdict is ``fail`` for a checker to overrule with a justification.
    """
    if count == 0 and policy.zeros_disclosive:
        return Breach(
            ZERO_CELL,
            Status.FAIL,
            "zero cell: disclosive unless a checker accepts it as a structural zero",
            {"count": 0, "zeros_disclosive": True},
        )
    return None


def count_cell(count: float, policy: Policy) -> Breach | None:
    """The frequency rules for one visible count: zero rule, then minimum cell count."""
    return zero_cell(count, policy) or min_cell_count(count, policy)


def derived_count(
    low: float, high: float, what: str, policy: Policy, zero_counts: bool = True
) -> Breach | None:
    """A count the table does not print but gives away (a difference between running totals or
    nested categories, a percentage times its denominator) is a count of people: it fails as a
    printed one would. ``[low, high]`` holds every value the printed numbers allow (rounded
    percentages give a range); the rule fires only when every whole number in it is disclosive
    (positive and below ``min_cell_count``, or 0 when zeros are disclosive and ``zero_counts``).
    """
    if not (math.isfinite(low) and math.isfinite(high)):
        return None  # an infinite or undefined product (inf x 0): not a count
    first = max(0, math.ceil(low - 1e-9))
    last = math.floor(high + 1e-9)
    if last < first:
        return None
    if last >= policy.min_cell_count:
        return None  # some allowed value is a safe count
    if first == 0 and not (zero_counts and policy.zeros_disclosive):
        return None
    shown = _fmt(first) if first == last else f"{_fmt(first)}-{_fmt(last)}"
    return Breach(
        DERIVED_COUNT,
        Status.FAIL,
        f"{what} is a count of {shown}, below the minimum cell count {policy.min_cell_count}"
        + (" (or zero)" if first == 0 else ""),
        {"derived": [first, last], "min_cell_count": policy.min_cell_count},
    )


def negative_count(count: float) -> Breach | None:
    """A negative number in a count column is not a count of people: a difference or an
    adjustment, whose size may be a small count. A checker must look."""
    if count < 0:
        return Breach(
            NEGATIVE_COUNT,
            Status.REVIEW,
            f"negative value {_fmt(count)} in a count column: a difference of counts (or an "
            "adjustment) can reveal a small count; a checker must look",
            {"count": count},
        )
    return None


def is_rounded(counts: Sequence[float], policy: Policy) -> bool:
    """Counts look rounded: enough non-zero counts, all multiples of the rounding base."""
    base = policy.rounding_base
    nonzero = [c for c in counts if c != 0]
    if base <= 1 or len(nonzero) < policy.rounded_min_cells:
        return False
    return all(float(c).is_integer() and int(c) % base == 0 for c in nonzero)


def rounding_note(counts: Sequence[float], policy: Policy) -> Breach | None:
    """Rounded counts: the threshold is applied to the displayed (rounded) values. A note."""
    if not is_rounded(counts, policy):
        return None
    base = policy.rounding_base
    return Breach(
        ROUNDED,
        Status.PASS,
        f"all non-zero counts are multiples of {base}: the table looks rounded to base {base}. "
        f"The minimum cell count ({policy.min_cell_count}) was applied to the rounded values; "
        f"a displayed count v stands for a true count within v ± {base / 2:g}.",
        {"rounding_base": base, "cells": len(counts)},
    )


@dataclass
class MarginEquation:
    """``total`` cell = sum of ``parts`` cells; cells are indices into a flat list of cells."""

    total: int
    parts: list[int]
    margin: tuple[int, str] = (0, "")  # (dimension, label) of the total: equations of one margin


@dataclass(frozen=True)
class Recovery:
    """A suppressed cell whose value can be deduced from visible cells and margins."""

    cell: int
    value: float | None
    how: str


def recoverable_cells(
    values: Sequence[float | None],
    suppressed: Sequence[bool],
    equations: Sequence[MarginEquation],
    policy: Policy,
    upper: Sequence[float | None] | None = None,
) -> tuple[list[Recovery], list[int]]:
    """Secondary disclosure: which suppressed cells the margins reveal, and which equations are
    inconsistent with the visible cells.

    Each margin equation is linear in the suppressed cells (the unknowns). A suppressed cell is
    exactly recoverable when its unit vector lies in the row space of the system (solved with
    numpy's least squares / rank, not by hand-picking single-unknown rows, so chains such as a
    row total revealing one cell that then completes a column are found too). A line is also
    fully determined when its residual sits at the bound of what its suppressed cells could hold
    (suppressed cells that must sum to 0).
    Returns (recoveries, indices of inconsistent equations).
    """
    unknown = [i for i, s in enumerate(suppressed) if s]
    col = {cell: j for j, cell in enumerate(unknown)}
    rows: list[list[float]] = []
    rhs: list[float] = []
    inconsistent: list[int] = []
    recovered: dict[int, Recovery] = {}
    for e_index, eq in enumerate(equations):
        coeffs = [0.0] * len(unknown)
        residual = 0.0
        # total - sum(parts) = 0  ->  move the visible values to the right-hand side
        for cell, sign in [(eq.total, 1.0)] + [(p, -1.0) for p in eq.parts]:
            if suppressed[cell]:
                coeffs[col[cell]] += sign
            else:
                residual -= sign * float(values[cell] or 0.0)
        if not any(coeffs):
            if abs(residual) > 1e-6:
                inconsistent.append(e_index)
            continue
        # counts are never negative: suppressed parts that must sum to 0 are all 0, and parts
        # that must sum to less than 0 mean the margin is wrong. (No upper bound is assumed:
        # secondary suppression hides cells of any size.)
        part_unknowns = [p for p in eq.parts if suppressed[p]]
        if not suppressed[eq.total] and part_unknowns:
            needed = -residual  # the suppressed parts must sum to this
            if needed < -1e-6:
                inconsistent.append(e_index)
            elif abs(needed) < 1e-6:
                for p in part_unknowns:
                    recovered.setdefault(p, Recovery(p, 0.0, "its margin leaves 0 for it"))
        rows.append(coeffs)
        rhs.append(residual)
    if rows and unknown:
        a = np.array(rows)
        b = np.array(rhs)
        n = len(unknown)
        # a marker such as '<10' bounds its cell: x_j + z_j = 9 with a slack z_j >= 0
        bounded = [
            (j, float(upper[cell]))
            for j, cell in enumerate(unknown)
            if upper is not None and upper[cell] is not None
        ]
        if bounded:
            extra = np.zeros((len(bounded), n + len(bounded)))
            for k, (j, _bound) in enumerate(bounded):
                extra[k, j] = extra[k, n + k] = 1.0
            a = np.vstack([np.hstack([a, np.zeros((a.shape[0], len(bounded)))]), extra])
            b = np.concatenate([b, [bound for _, bound in bounded]])
        determined = {j: v for j, v in _determined(a, b).items() if j < n}
        free = [j for j in range(n) if j not in determined]
        # counts are >= 0 (and slacks too): variables that are 0 in every solution are pinned
        # (a cell at 0, or at its marker's bound), and pinning them can determine others
        # (x1 + x2 = 3 and x1 = 3 + x3 force x1 = 3). One LP finds them.
        if free:
            zero = _always_zero(a, b)
            if zero:
                pin = np.zeros((len(zero), a.shape[1]))
                for i, j in enumerate(sorted(zero)):
                    pin[i, j] = 1.0
                more = _determined(np.vstack([a, pin]), np.concatenate([b, np.zeros(len(zero))]))
                for j, (value, _how) in more.items():
                    if j < n and j not in determined:
                        determined[j] = (value, "the margins and non-negative counts pin it")
        for j, (value, how) in determined.items():
            cell = unknown[j]
            recovered.setdefault(cell, Recovery(cell, round(value, 6), how))
    return sorted(recovered.values(), key=lambda r: r.cell), inconsistent


def _determined(a: np.ndarray, b: np.ndarray) -> dict[int, tuple[float, str]]:
    """Unknowns of ``a x = b`` that every solution agrees on: x_j is determined iff the unit
    vector e_j lies in the row space of ``a``, i.e. its projection onto the row space has
    length 1. The row space comes from a rank-revealing (pivoted) QR of ``a.T``, much cheaper
    than an SVD for the wide systems of large suppressed tables."""
    from scipy.linalg import lstsq, qr  # lazily: only tables with suppressed cells need it

    q, r, _ = qr(a.T, mode="economic", pivoting=True)
    diag = np.abs(np.diag(r))
    tol = max(a.shape) * np.finfo(float).eps * (diag[0] if diag.size else 0.0)
    rank = int((diag > max(tol, 1e-9)).sum())
    in_row_space = (q[:, :rank] ** 2).sum(axis=1)
    solution = lstsq(a, b, lapack_driver="gelsy")[0]
    return {
        j: (float(solution[j]), "total minus the visible cells")
        for j in range(a.shape[1])
        if in_row_space[j] > 1 - 1e-9
    }


def _always_zero(a: np.ndarray, b: np.ndarray) -> set[int]:
    """Unknowns that are 0 in every non-negative solution of ``a x = b``.

    One linear programme (HiGHS via scipy), homogenised so that every unknown that can be
    positive reaches 1 at once: maximise sum(y) with y <= x, y <= 1, a x = s b, s >= 1, x >= 0.
    (A convex combination of solutions, scaled up, makes all possibly-positive unknowns >= 1.)
    """
    # imported lazily: only tables with suppressed cells need them
    from scipy import sparse
    from scipy.optimize import linprog

    m, n = a.shape
    # variables: x (n), y (n), s (1); sparse, since a suppressed table may have 1000s of cells
    c = np.concatenate([np.zeros(n), -np.ones(n), [0.0]])
    a_eq = sparse.hstack(
        [sparse.csr_matrix(a), sparse.csr_matrix((m, n)), sparse.csr_matrix(-b.reshape(-1, 1))]
    )
    identity = sparse.identity(n, format="csr")
    a_ub = sparse.hstack([-identity, identity, sparse.csr_matrix((n, 1))])  # y - x <= 0
    bounds = [(0, None)] * n + [(0, 1)] * n + [(1, None)]
    res = linprog(
        c,
        A_ub=a_ub.tocsr(),
        b_ub=np.zeros(n),
        A_eq=a_eq.tocsr(),
        b_eq=np.zeros(m),
        bounds=bounds,
        method="highs",
    )
    if res.status != 0:  # infeasible margins: reported as inconsistent elsewhere
        return set()
    y = res.x[n : 2 * n]
    return {j for j in range(n) if y[j] < 0.5}


# ---------------------------------------------------------------- magnitude


def min_contributors(n: int, policy: Policy) -> Breach | None:
    """A magnitude cell built from fewer than the minimum number of people fails."""
    if n < policy.min_cell_count:
        return Breach(
            MIN_CONTRIBUTORS,
            Status.FAIL,
            f"cell summarises {n} contributor(s), fewer than {policy.min_cell_count}",
            {"contributors": n, "min_cell_count": policy.min_cell_count},
        )
    return None


def nk_dominance(largest: Sequence[float], total: float, policy: Policy) -> Breach | None:
    """NK rule: the ``nk_n`` largest contributions make up ``>= nk_k`` of the cell total -> fail.

    The boundary (share exactly k) FAILS. Needs non-negative contributions (see
    ``negative_values``) and a positive total.
    """
    if total <= 0 or not largest:
        return None
    top = sorted((float(x) for x in largest), reverse=True)[: policy.nk_n]
    share = sum(top) / total
    # compare with a relative tolerance so that 0.9 computed as 0.8999999999 still hits the boundary
    if share > policy.nk_k or math.isclose(share, policy.nk_k, rel_tol=1e-9):
        return Breach(
            NK_DOMINANCE,
            Status.FAIL,
            f"the {policy.nk_n} largest contributions are {share:.1%} of the cell total "
            f"(limit: below {policy.nk_k:.0%})",
            {"share": share, "nk_n": policy.nk_n, "nk_k": policy.nk_k},
        )
    return None


def p_ratio(largest: Sequence[float], total: float, policy: Policy) -> Breach | None:
    """p% rule: the rest of the cell, ``total - x1 - x2``, is less than ``p * x1`` -> fail.

    The second-largest contributor could then estimate the largest within p%.
    """
    top = sorted((float(x) for x in largest), reverse=True)
    if not top or top[0] <= 0:
        return None
    x1 = top[0]
    x2 = top[1] if len(top) > 1 else 0.0
    ratio = (total - x1 - x2) / x1
    if ratio < policy.p_ratio and not math.isclose(ratio, policy.p_ratio, rel_tol=1e-9):
        return Breach(
            P_RATIO,
            Status.FAIL,
            f"p-ratio {ratio:.3f}: the cell minus its two largest contributions is under "
            f"{policy.p_ratio:.0%} of the largest",
            {"ratio": ratio, "p": policy.p_ratio},
        )
    return None


def class_disclosure(n_distinct: int, n: int) -> Breach | None:
    """Every contributor has the same value: the statistic reveals each person's value."""
    if n >= 1 and n_distinct == 1:
        return Breach(
            CLASS_DISCLOSURE,
            Status.FAIL,
            f"all {n} contributors have the same value: the cell reveals each one's value",
            {"contributors": n, "distinct_values": 1},
        )
    return None


def extreme_value(statistic: str, n_at_value: int | None, policy: Policy) -> Breach | None:
    """An exact minimum or maximum is one person's value: fail unless at least
    ``min_cell_count`` contributors share it (evidence ``n_at_value``)."""
    if n_at_value is not None and n_at_value >= policy.min_cell_count:
        return None
    shared = "unknown" if n_at_value is None else str(n_at_value)
    return Breach(
        EXTREME_VALUE,
        Status.FAIL,
        f"an exact {statistic} is a single person's value (contributors sharing it: {shared}); "
        "top-code or remove it",
        {"statistic": statistic, "n_at_value": n_at_value},
    )


def percentile_value(statistic: str, n_at_value: int | None, policy: Policy) -> Breach | None:
    """An exact percentile (or median, or mode) may be one person's value: review unless at
    least ``min_cell_count`` contributors share it."""
    if n_at_value is not None and n_at_value >= policy.min_cell_count:
        return None
    return Breach(
        PERCENTILE_VALUE,
        Status.REVIEW,
        f"an exact {statistic} may be one person's value; consider a fuzzy percentile "
        "(mean of neighbouring percentiles)",
        {"statistic": statistic, "n_at_value": n_at_value},
    )


def negative_values(has_negative: bool) -> Breach | None:
    """Negative contributions make dominance undefined: a human must look (ACRO does the same)."""
    if has_negative:
        return Breach(
            NEGATIVE_VALUES,
            Status.REVIEW,
            "negative contributions: dominance rules are undefined, a checker must review",
            {"negative": True},
        )
    return None


def missing_values(n_missing: int, policy: Policy) -> Breach | None:
    if policy.missing_values_review and n_missing > 0:
        return Breach(
            MISSING_VALUES,
            Status.REVIEW,
            f"{n_missing} missing value(s) in the cell",
            {"missing": n_missing},
        )
    return None


# ---------------------------------------------------------------- models


def residual_dof(dof: float, policy: Policy) -> Breach | None:
    """Residual degrees of freedom below the minimum fail (9 fails, 10 passes)."""
    if dof < policy.min_residual_dof:
        return Breach(
            RESIDUAL_DOF,
            Status.FAIL,
            f"residual degrees of freedom {_fmt(dof)} below the minimum {policy.min_residual_dof}",
            {"df_resid": dof, "min_residual_dof": policy.min_residual_dof},
        )
    return None


def params_vs_n(n_params: int, nobs: int, policy: Policy) -> Breach | None:
    """More parameters than a fraction of the observations (DataSHIELD nfilter.glm) fails."""
    limit = policy.model_max_params_fraction * nobs
    if n_params > limit:
        return Breach(
            PARAMS_VS_N,
            Status.FAIL,
            f"{n_params} parameters for {nobs} observations (limit "
            f"{policy.model_max_params_fraction:g} x N = {limit:g})",
            {"n_params": n_params, "nobs": nobs},
        )
    return None


def correlation_perfect(r: float) -> Breach | None:
    """An off-diagonal correlation of exactly +-1: one variable is a function of another."""
    if math.isclose(abs(r), 1.0, abs_tol=1e-12):
        return Breach(
            CORRELATION_PERFECT,
            Status.REVIEW,
            f"off-diagonal correlation of exactly {r:+g}: check for a deterministic relation or "
            "very few observations",
            {"r": r},
        )
    return None


def correlation_min_n(n: int, policy: Policy) -> Breach | None:
    if n < policy.correlation_min_n:
        return Breach(
            CORRELATION_MIN_N,
            Status.FAIL,
            f"correlations from {n} observations, fewer than {policy.correlation_min_n}",
            {"n": n, "correlation_min_n": policy.correlation_min_n},
        )
    return None


# ---------------------------------------------------------------- survival


def survival_step(leaving: float, what: str, policy: Policy) -> Breach | None:
    """A step where fewer than ``survival_min_step`` people leave the risk set (or have an
    event, or are censored) identifies them: ``0 < step < minimum`` fails."""
    if 0 < leaving < policy.survival_min_step:
        return Breach(
            SURVIVAL_STEP,
            Status.FAIL,
            f"{what}: {_fmt(leaving)} is below the survival minimum {policy.survival_min_step}",
            {"step": leaving, "what": what, "survival_min_step": policy.survival_min_step},
        )
    return None


def survival_at_risk(at_risk: float, policy: Policy) -> Breach | None:
    """Fewer than ``survival_min_step`` people still at risk: the tail of the curve is about
    a handful of identifiable children. ``0 < n < minimum`` fails (truncate the table)."""
    if 0 < at_risk < policy.survival_min_step:
        return Breach(
            SURVIVAL_AT_RISK,
            Status.FAIL,
            f"only {_fmt(at_risk)} at risk (minimum {policy.survival_min_step}): truncate the "
            "table or curve where fewer remain",
            {"at_risk": at_risk, "survival_min_step": policy.survival_min_step},
        )
    return None


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"

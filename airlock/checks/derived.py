"""Counts a table gives away without printing them (differencing inside one table).

Every cell of a table can pass the count rules while the table still reveals a small count:
- running totals (a ``cumulative`` column): the difference between neighbouring rows is the
  count of the rows in between;
- nested categories: age bands ``0-4`` and ``0-5`` (or ``<5`` and ``<6``, ``15+`` and ``14+``,
  ``[0, 5)`` and ``[0, 6)``), or ``All cancers`` and ``All cancers excluding Wilms``: the
  difference is the count of the children in one and not the other;
- a percentage or a rate beside its denominator: ``2.0 %`` of ``150 patients`` is 3 children
  (and ``100 %`` leaves 0 in the complement); ``2.5 per 100,000`` of a population of 120,000 is
  3 cases.
Each derived count goes through one rule, ``rules.derived_count`` (fails as a printed count
would: ``0 < n < min_cell_count``, zero by the zero rule). Percentages are rounded, so a derived
count is a range of whole numbers; the rule fires only when every one of them is disclosive.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

import polars as pl

from airlock.checks import rules
from airlock.checks.findings import Finding
from airlock.checks.layout import (
    Layout,
    Role,
    is_cumulative,
    is_total_label,
    words,
)
from airlock.policy import Policy

# Column names that say "this is a denominator" (person-time, population, people at risk).
DENOMINATOR_WORDS = {
    "population",
    "pop",
    "denominator",
    "denom",
    "py",
    "pyrs",
    "pys",
    "person",
    "persons",
    "exposure",
    "eligible",
    "cohort",
    "base",
}
PROPORTION_WORDS = {"prop", "proportion", "fraction", "risk", "share"}
MAX_LISTED = 20  # cells listed per finding; the count in the message is complete


@dataclass
class Derived:
    low: float
    high: float
    what: str
    ref: dict[str, Any]
    zero_counts: bool = True


@dataclass
class _Column:
    values: list[float | None]
    half_unit: float  # half of the last printed decimal: the rounding of each value
    name: str
    extra: dict[str, Any] = field(default_factory=dict)


def check_derived(
    frame: pl.DataFrame, layout: Layout, policy: Policy, location: dict | None = None
) -> list[Finding]:
    """One finding for every count the table gives away through differences or denominators."""
    derived = (
        cumulative_differences(frame, layout)
        + implied_counts(frame, layout)
        + nested_differences(frame, layout, policy)
    )
    hits: list[tuple[rules.Breach, Derived]] = []
    for d in derived:
        breach = rules.derived_count(d.low, d.high, d.what, policy, d.zero_counts)
        if breach:
            hits.append((breach, d))
    if not hits:
        return []
    first = hits[0][0]
    return [
        Finding(
            rule=rules.DERIVED_COUNT,
            status=first.status,
            message=(
                f"{len(hits)} small count(s) can be derived from this table although no cell "
                f"prints one; e.g. {first.message}. Suppress or coarsen them as printed counts"
            ),
            cells=[
                {**d.ref, "derived": b.evidence["derived"], "how": d.what, **(location or {})}
                for b, d in hits[:MAX_LISTED]
            ],
            evidence={"derived_counts": len(hits), "min_cell_count": policy.min_cell_count},
            policy_version=policy.label,
        )
    ]


# ---------------------------------------------------------------- helpers


def half_unit(values: list[float | None]) -> float:
    """Half a unit of the last decimal printed in a column ('2.0' -> 0.05, '3' -> 0.5)."""
    decimals = 0
    for v in values:
        if v is None or not math.isfinite(v):
            continue
        text = repr(float(v))
        if "e" in text:
            return 0.0  # exponent notation: take the value as exact
        frac = text.split(".")[1].rstrip("0") if "." in text else ""
        decimals = max(decimals, len(frac))
    return 0.5 * 10.0**-decimals


def _visible(layout: Layout, column: str) -> list[float | None]:
    parsed = layout.parsed[column]
    # infinite values ('inf') are not counts or percentages of people: set aside
    return [
        None if s or v is None or not math.isfinite(v) else v
        for v, s in zip(parsed.values, parsed.suppressed, strict=True)
    ]


def _label_columns(layout: Layout) -> list[str]:
    return layout.columns(Role.LABEL)


def _groups(
    frame: pl.DataFrame, layout: Layout, by: list[str], skip_totals: bool
) -> dict[tuple[str, ...], list[int]]:
    groups: dict[tuple[str, ...], list[int]] = {}
    for row in range(frame.height):
        if skip_totals and row in layout.total_rows:
            continue
        labels = layout.labels_of(row, frame)
        groups.setdefault(tuple(labels.get(c, "") for c in by), []).append(row)
    return groups


def _ordered_groups(
    frame: pl.DataFrame, layout: Layout, series: list[float | None]
) -> tuple[dict[tuple[str, ...], list[int]], int] | None:
    """Rows grouped so that ``series`` runs monotonically inside each group (running totals
    ordered by one label, e.g. age, within the others, e.g. sex); +1 ascending, -1 descending
    (reverse cumulative, 'n aged x or more'); None when no grouping makes it monotone."""
    labels = _label_columns(layout)
    options = [[c for c in labels if c != order] for order in labels] or [[]]
    for by in options:
        groups = _groups(frame, layout, by, skip_totals=True)
        for direction in (1, -1):
            ok = True
            for rows in groups.values():
                seen = [series[r] for r in rows if series[r] is not None]
                if any(direction * (b - a) < -1e-9 for a, b in zip(seen, seen[1:], strict=False)):
                    ok = False
                    break
            if ok:
                return groups, direction
    return None


def _ref(layout: Layout, frame: pl.DataFrame, row: int, column: str, value: Any) -> dict:
    ref: dict[str, Any] = {"row": row, "column": column}
    labels = layout.labels_of(row, frame)
    if labels:
        ref["labels"] = labels
    if value is not None:
        ref["value"] = int(value) if float(value).is_integer() else value
    return ref


# ---------------------------------------------------------------- running totals


def _differences(
    frame: pl.DataFrame,
    layout: Layout,
    column: str,
    lows: list[float | None],
    highs: list[float | None],
    what: str,
) -> list[Derived]:
    """The first running total of each group and the step to each next visible one."""
    mids = [
        None if lo is None or hi is None else (lo + hi) / 2
        for lo, hi in zip(lows, highs, strict=True)
    ]
    ordered = _ordered_groups(frame, layout, mids)
    if ordered is None:
        return []
    groups, direction = ordered
    out: list[Derived] = []
    for rows in groups.values():
        rows = [r for r in rows if mids[r] is not None]
        if direction < 0:
            rows = rows[::-1]  # reverse cumulative: the last row is the smallest running total
        previous: int | None = None
        for r in rows:
            lo, hi = lows[r], highs[r]
            assert lo is not None and hi is not None
            if previous is None:
                how = f"the first {what} ({column})"
                out.append(Derived(lo, hi, how, _ref(layout, frame, r, column, mids[r])))
            else:
                p_lo, p_hi = lows[previous], highs[previous]
                assert p_lo is not None and p_hi is not None
                how = f"the step between two {what}s ({column}, rows {previous} and {r})"
                ref = _ref(layout, frame, r, column, mids[r])
                out.append(Derived(lo - p_hi, hi - p_lo, how, ref))
            previous = r
    return out


def cumulative_differences(frame: pl.DataFrame, layout: Layout) -> list[Derived]:
    out: list[Derived] = []
    for column in layout.columns(Role.CUMULATIVE):
        values = _visible(layout, column)
        out += _differences(frame, layout, column, values, values, "running total")
    return out


# ---------------------------------------------------------------- percentages x denominators


def percent_scale(name: str, values: list[float | None]) -> float | None:
    """What a percentage or rate column is 'per': 100 for a percentage, 1 for a proportion,
    100000 for 'rate per 100,000' (also '100k', 'per 1000 py'); None when not stated (a 'ratio',
    an 'incidence' without its unit)."""
    low = name.lower().replace(",", "").replace("_", " ")
    m = re.search(r"per\s*(\d+)\s*(k|000)?", low)
    if m:
        base = float(m.group(1))
        if m.group(2) == "k":
            base *= 1000
        elif m.group(2) == "000":
            base *= 1000
        return base
    if re.search(r"per\s*(million|m)\b", low):
        return 1e6
    if re.search(r"per\s*(thousand)\b", low):
        return 1000.0
    tokens = set(words(name))
    nums = [v for v in values if v is not None]
    if tokens & {"%", "pct", "percent", "percentage"}:
        return 100.0
    if tokens & PROPORTION_WORDS or "cumulative" in tokens:
        return 1.0 if nums and all(0 <= v <= 1 for v in nums) else 100.0
    return None


def _denominators(layout: Layout) -> list[str]:
    """Columns that may be a percentage's denominator: counts, and columns named as one."""
    out = list(layout.columns(Role.COUNT))
    for column, role in layout.roles.items():
        if role == Role.STATISTIC and column not in out:  # person-years: not whole numbers
            tokens = words(column)
            if set(tokens) & DENOMINATOR_WORDS or "at risk" in " ".join(tokens):
                out.append(column)
    return out


def _explained(p: list[float | None], h: float, scale: float, a: list, b: list) -> bool:
    """Whether ``p`` is ``scale * a / b`` in every row where all three are printed."""
    checked = 0
    for pv, av, bv in zip(p, a, b, strict=True):
        if pv is None or av is None or bv is None:
            continue
        if bv == 0:
            return False
        if abs(pv - scale * av / bv) > h + 1e-9:
            return False
        checked += 1
    return checked > 0


def _is_share(
    frame: pl.DataFrame,
    layout: Layout,
    p: list[float | None],
    h: float,
    scale: float,
    d: list[float | None],
) -> bool:
    """Whether ``p`` is ``d``'s share of a common total (a distribution: 'n, %' columns), in
    the whole table or within the groups of some label columns: then ``d`` is the numerator,
    already checked as a count, and not a denominator."""
    labels = _label_columns(layout)
    subsets = [list(s) for k in range(len(labels)) for s in combinations(labels, k)] or [[]]
    for by in subsets:
        groups = _groups(frame, layout, by, skip_totals=False)
        consistent = True
        tested = False
        for rows in groups.values():
            lo, hi = 0.0, math.inf
            seen = 0
            for r in rows:
                pv, dv = p[r], d[r]
                if pv is None or dv is None:
                    continue
                seen += 1
                # the common total T must satisfy |scale * dv / T - pv| <= h
                lo = max(lo, scale * dv / (pv + h) if pv + h > 0 else math.inf)
                hi = min(hi, scale * dv / (pv - h) if pv - h > 0 else math.inf)
            if seen >= 2:
                tested = True
            if lo > hi * (1 + 1e-9):
                consistent = False
                break
        if consistent and tested:
            return True
    return False


def implied_counts(frame: pl.DataFrame, layout: Layout) -> list[Derived]:
    out: list[Derived] = []
    denominators = _denominators(layout)
    counts = layout.columns(Role.COUNT)
    for column in layout.columns(Role.PERCENT):
        p = _visible(layout, column)
        scale = percent_scale(column, p)
        if scale is None or not any(v is not None for v in p):
            continue
        h = half_unit(p)
        count_values = {c: _visible(layout, c) for c in set(counts) | set(denominators)}
        if any(
            _explained(p, h, scale, count_values[a], count_values[b])
            for a, b in combinations(count_values, 2)
        ) or any(
            _explained(p, h, scale, count_values[b], count_values[a])
            for a, b in combinations(count_values, 2)
        ):
            continue  # numerator and denominator both printed: the counts are checked
        named = [c for c in denominators if c not in counts]
        for denominator in named or denominators:
            d = count_values[denominator]
            if _is_share(frame, layout, p, h, scale, d):
                continue
            lows: list[float | None] = [None] * len(p)
            highs: list[float | None] = [None] * len(p)
            whole = True
            for r, (pv, dv) in enumerate(zip(p, d, strict=True)):
                if pv is None or dv is None or dv < 0:
                    continue
                lo, hi = max(0.0, (pv - h) * dv / scale), (pv + h) * dv / scale
                if scale <= 100:
                    hi = min(hi, dv)
                if not (math.isfinite(lo) and math.isfinite(hi)):
                    continue  # overflow (1e308 x 1e308): no count of people
                if math.ceil(lo - 1e-9) > math.floor(hi + 1e-9):
                    whole = False  # no whole number of people: not this column's denominator
                    break
                lows[r], highs[r] = lo, hi
            if not whole or all(v is None for v in lows):
                continue
            words_p = set(words(column))
            if is_cumulative(list(words_p)) and scale <= 100:
                out += _differences(
                    frame, layout, column, lows, highs, f"running total implied by {denominator}"
                )
                continue
            for r, (lo, hi) in enumerate(zip(lows, highs, strict=True)):
                if lo is None or hi is None:
                    continue
                dv = d[r]
                assert dv is not None
                ref = _ref(layout, frame, r, column, p[r])
                ref["denominator"] = {"column": denominator, "value": dv}
                out.append(
                    Derived(lo, hi, f"{column} of {denominator} {dv:g}", ref)  # the numerator
                )
                if scale <= 100:  # a proportion: the rest of the denominator are people too
                    out.append(
                        Derived(
                            dv - hi,
                            dv - lo,
                            f"the complement of {column} in {denominator} {dv:g}",
                            dict(ref),
                        )
                    )
    return out


# ---------------------------------------------------------------- nested categories

_NUM = r"(\d+(?:\.\d+)?)"
_UNITS = re.compile(
    r"\b(years?|yrs?|y|months?|mos?|days?|aged?|ages|age group|age band)\b|:", re.IGNORECASE
)
_RANGE = re.compile(rf"^{_NUM}\s*(?:-|–|—|to)\s*{_NUM}$")
_BELOW = re.compile(rf"^(?:<|under|below|less than|younger than|before)\s*{_NUM}$")
_AT_MOST = re.compile(rf"^(?:<=|≤|=<|up to|at most)\s*{_NUM}$")
_PLUS = re.compile(rf"^{_NUM}\s*(?:\+|and over|and above|and older|or more|or older|plus)$")
_AT_LEAST = re.compile(rf"^(?:>=|≥|=>|at least)\s*{_NUM}$")
_ABOVE = re.compile(rf"^(?:>|over|above|older than|after)\s*{_NUM}$")
_INTERVAL = re.compile(r"^([\[(])\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?|inf)\s*([\])])$")
_EXCLUDING = re.compile(
    r"^(.*?)[\s,;(]*\b(?:excluding|excl\.?|except|without|other than|not including|minus)\s+"
    r"(.+?)\)?$",
    re.IGNORECASE,
)

Interval = tuple[float, bool, float, bool]  # low, low closed, high, high closed


def parse_range(label: str) -> Interval | None:
    """An age band, a period or a bin as an interval of the real line: integer bands are whole
    years ('0-4' is [0, 5)), '<5' is [0, 5) (ages, years and counts are not negative), '15+'
    is [15, inf), pandas' '(0.0, 5.0]' as written."""
    text = _UNITS.sub(" ", label.strip().lower()).strip()
    text = re.sub(r"\s+", " ", text)
    m = _INTERVAL.match(text)
    if m:
        high = math.inf if m.group(3) == "inf" else float(m.group(3))
        return float(m.group(2)), m.group(1) == "[", high, m.group(4) == "]"
    m = _RANGE.match(text)
    if m:
        a, b = float(m.group(1)), float(m.group(2))
        if a > b:
            return None
        if a.is_integer() and b.is_integer():
            return a, True, b + 1, False  # whole units: '0-4' holds 4.9 years
        return a, True, b, True
    for pattern, build in (
        (_BELOW, lambda x: (0.0, True, x, False)),
        (_AT_MOST, lambda x: (0.0, True, x + 1, False) if x.is_integer() else (0, True, x, True)),
        (_PLUS, lambda x: (x, True, math.inf, False)),
        (_AT_LEAST, lambda x: (x, True, math.inf, False)),
        (
            _ABOVE,
            lambda x: (
                (x + 1, True, math.inf, False) if x.is_integer() else (x, False, math.inf, False)
            ),
        ),
    ):
        m = pattern.match(text)
        if m:
            return build(float(m.group(1)))
    return None


def _within(a: Interval, b: Interval) -> bool:
    """Whether interval ``a`` lies inside ``b`` and differs from it."""
    if a == b:
        return False
    lo_ok = b[0] < a[0] or (b[0] == a[0] and (b[1] or not a[1]))
    hi_ok = a[2] < b[2] or (a[2] == b[2] and (b[3] or not a[3]))
    return lo_ok and hi_ok


def _norm(text: str) -> str:
    return " ".join(words(text))


def _nested_pairs(labels: list[str], policy: Policy) -> list[tuple[int, int, str]]:
    """(inner, outer, how) index pairs among ``labels``: ranges inside ranges, and 'X
    excluding Y' inside 'X' (or inside the total when X is empty or 'all')."""
    pairs: list[tuple[int, int, str]] = []
    ranges = {i: parse_range(t) for i, t in enumerate(labels)}
    ranges = {i: r for i, r in ranges.items() if r is not None}
    if len(ranges) >= 2:
        for i, a in ranges.items():
            for j, b in ranges.items():
                if i != j and _within(a, b):
                    pairs.append((i, j, f"the difference between {labels[j]!r} and {labels[i]!r}"))
    by_name = {_norm(t): i for i, t in enumerate(labels)}
    for i, text in enumerate(labels):
        m = _EXCLUDING.match(text.strip())
        if not m:
            continue
        base = _norm(m.group(1))
        j = by_name.get(base)
        if j is None and (not base or base in {"all", "total", "all cancers", "overall"}):
            j = next((k for k, t in enumerate(labels) if is_total_label(t, policy)), None)
        if j is not None and j != i:
            pairs.append((i, j, f"the difference between {labels[j]!r} and {labels[i]!r}"))
    return pairs


def nested_differences(frame: pl.DataFrame, layout: Layout, policy: Policy) -> list[Derived]:
    out: list[Derived] = []
    counts = layout.columns(Role.COUNT)
    labels = _label_columns(layout)
    # long tables: nested categories in a label column, within the same other labels
    for column in labels:
        others = [c for c in labels if c != column]
        for rows in _groups(frame, layout, others, skip_totals=False).values():
            texts = [layout.labels_of(r, frame).get(column, "") for r in rows]
            for i, j, how in _nested_pairs(texts, policy):
                inner, outer = rows[i], rows[j]
                for count in counts:
                    values = _visible(layout, count)
                    a, b = values[inner], values[outer]
                    if a is None or b is None:
                        continue
                    ref = _ref(layout, frame, outer, count, b)
                    ref["inner"] = _ref(layout, frame, inner, count, a)
                    out.append(Derived(b - a, b - a, f"{how} ({count})", ref, zero_counts=False))
    # wide tables: nested categories as count columns ('0-4', '0-9'), within each row
    pairs = _nested_pairs(counts, policy)
    for i, j, how in pairs:
        inner, outer = _visible(layout, counts[i]), _visible(layout, counts[j])
        for row in range(frame.height):
            a, b = inner[row], outer[row]
            if a is None or b is None:
                continue
            ref = _ref(layout, frame, row, counts[j], b)
            ref["inner"] = _ref(layout, frame, row, counts[i], a)
            out.append(Derived(b - a, b - a, how, ref, zero_counts=False))
    return out

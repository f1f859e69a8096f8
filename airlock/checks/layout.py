"""Reading a table's layout: which columns are labels, counts, percentages or statistics.

Tables reach the airlock as polars DataFrames parsed from CSV, spreadsheets, HTML or notebooks,
so numbers often arrive as text with suppression markers ("<10", "*", "[c]") or as "12 (4.5%)".
This module turns each column into parsed values and a role, using the column name first (a
name says what a column is: ``n``, ``mean_age``, ``diagnosis_year``) and the values second
(integer-valued, years, fractions). Markers and margin labels come from the policy.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from enum import StrEnum
from functools import lru_cache

import polars as pl

from airlock.checks.cells import INVISIBLE
from airlock.policy import Policy

_INVISIBLE = re.compile(INVISIBLE)
NA_TEXTS = {"", "na", "n/a", "nan", "null", "none", "missing", "<na>"}
_NUMBER = re.compile(r"^[+-]?(\d{1,3}(,\d{3})+|\d+)(\.\d+)?([eE][+-]?\d+)?$|^[+-]?\.\d+$")
_N_PCT = re.compile(r"^\s*(\d[\d,]*)\s*\(\s*[\d.]+\s*%?\s*\)\s*$")

COUNT_WORDS = {
    "n",
    "count",
    "counts",
    "freq",
    "frequency",
    "number",
    "num",
    "no",
    "cases",
    "patients",
    "deaths",
    "events",
    "persons",
    "people",
    "children",
    "subjects",
    "total",
    "obs",
    "observations",
    "records",
    "tumours",
    "tumors",
    "individuals",
    "participants",
    "diagnoses",
    "survivors",
    "births",
    "size",
    "registrations",
    "admissions",
    "relapses",
    "nobs",
}
PERCENT_WORDS = {
    "%",
    "pct",
    "percent",
    "percentage",
    "prop",
    "proportion",
    "rate",
    "share",
    "ratio",
    "per",
    "prevalence",
    "incidence",
    "risk",
    "fraction",
    "cumulative",
}
STAT_WORDS = {
    "mean": "mean",
    "avg": "mean",
    "average": "mean",
    "median": "median",
    "sum": "sum",
    "min": "min",
    "minimum": "min",
    "max": "max",
    "maximum": "max",
    "sd": "std",
    "std": "std",
    "stdev": "std",
    "stddev": "std",
    "var": "std",
    "variance": "std",
    "mode": "mode",
    "iqr": "percentile",
    "q1": "percentile",
    "q3": "percentile",
    "quantile": "percentile",
    "percentile": "percentile",
    "median_": "median",
    "lq": "percentile",
    "uq": "percentile",
    # extremes under everyday names: the oldest child's age is one child's value
    "oldest": "max",
    "youngest": "min",
    "earliest": "min",
    "latest": "max",
    "highest": "max",
    "lowest": "min",
    "largest": "max",
    "smallest": "min",
    "longest": "max",
    "shortest": "min",
}
# A column of running totals (cumulative counts): its cells are sums of the cells above, so the
# differences between neighbouring rows are counts of people (airlock/checks/derived.py).
CUMULATIVE_WORDS = {"cumulative", "cum", "cumul", "cumsum", "running", "ytd"}
LABEL_WORDS = {
    "year",
    "yr",
    "id",
    "code",
    "group",
    "category",
    "cat",
    "class",
    "stage",
    "grade",
    "site",
    "country",
    "region",
    "sex",
    "gender",
    "level",
    "band",
    "index",
    "rank",
    "period",
    "month",
    "week",
    "day",
    "label",
    "name",
    "type",
    "diagnosis",
    "iccc",
    "icd",
    "morphology",
    "age",
    "decade",
    "quarter",
    "bin",
    "interval",
    "lower",
    "upper",
    "left",
    "right",
    "from",
    "to",
    "edge",
    "variable",
    "term",
    "characteristic",
}


class Role(StrEnum):
    LABEL = "label"
    COUNT = "count"
    PERCENT = "percent"
    STATISTIC = "statistic"
    CUMULATIVE = "cumulative"  # running totals of counts


@dataclass
class Parsed:
    """One column's values as numbers; ``suppressed[i]`` when the cell holds a marker or NA."""

    values: list[float | None]
    suppressed: list[bool]
    numeric: bool  # every non-marker cell parsed as a number
    any_number: bool
    upper: dict[int, float] = field(default_factory=dict)  # '<10' says: at most 9


_UPPER = re.compile(r"^\s*(<=|<|≤)\s*=?\s*(\d+)\s*$")


def marker_upper_bound(text: str) -> float | None:
    """The largest value a marker such as '<10' (9) or '<=5' / '≤5' (5) allows."""
    m = _UPPER.match(text)
    if not m:
        return None
    bound = float(m.group(2))
    return bound if m.group(1) in {"<=", "≤"} else bound - 1


@dataclass
class Layout:
    roles: dict[str, Role]
    statistic: dict[str, str]  # statistic kind per STATISTIC column
    parsed: dict[str, Parsed]
    total_rows: set[int] = field(default_factory=set)
    total_columns: set[str] = field(default_factory=set)
    n_rows: int = 0
    row_statistic: dict[int, str] = field(default_factory=dict)  # stats in rows (describe())
    _labels: list[dict[str, str]] | None = None

    def columns(self, role: Role) -> list[str]:
        return [c for c, r in self.roles.items() if r == role]

    def labels_of(self, row: int, frame: pl.DataFrame) -> dict[str, str]:
        if self._labels is None or len(self._labels) != frame.height:
            columns = {c: frame[c].to_list() for c in self.columns(Role.LABEL)}
            self._labels = [
                {c: _text(v[r]) for c, v in columns.items()} for r in range(frame.height)
            ]
        return dict(self._labels[row])


def words(name: str) -> list[str]:
    """Lower-case tokens of a column name: 'Mean age (days)' -> ['mean', 'age', 'days']."""
    name = name.replace("%", " % ")
    name = re.sub(r"([a-z])([A-Z])", r"\1 \2", name)
    return [w for w in re.split(r"[^0-9a-zA-Z%]+", name.lower()) if w]


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _is_marker(text: str, policy: Policy, patterns: list[re.Pattern[str]]) -> bool:
    low = text.strip().lower()
    if low in NA_TEXTS:
        return True
    if low in {m.lower() for m in policy.suppression_markers}:
        return True
    return any(p.search(low) for p in patterns)


def parse_number(text: str) -> float | None:
    t = _INVISIBLE.sub("", text).strip().replace("\u2212", "-")
    if t.endswith("%"):
        t = t[:-1].strip()
    if _NUMBER.match(t):
        try:
            return float(t.replace(",", ""))
        except ValueError:
            return None
    m = _N_PCT.match(t)
    if m:
        return float(m.group(1).replace(",", ""))
    return None


def parse_column(series: pl.Series, policy: Policy) -> Parsed:
    patterns = [re.compile(p, re.IGNORECASE) for p in policy.suppression_patterns]
    values: list[float | None] = []
    suppressed: list[bool] = []
    numeric = True
    any_number = False
    if series.dtype.is_numeric():
        for v in series.to_list():
            if v is None or (isinstance(v, float) and math.isnan(v)):
                values.append(None)
                suppressed.append(True)
            else:
                values.append(float(v))
                suppressed.append(False)
                any_number = True
        return Parsed(values, suppressed, True, any_number)
    if series.dtype == pl.Boolean:
        return Parsed([None] * len(series), [False] * len(series), False, False)
    if series.dtype == pl.String:
        texts = series.to_list()
    else:  # dates, categoricals, lists, structs...: their text form
        texts = [None if v is None else str(v) for v in series.to_list()]
    upper: dict[int, float] = {}
    for v in texts:
        text = "" if v is None else str(v)
        num = parse_number(text)
        if num is not None:
            values.append(num)
            suppressed.append(False)
            any_number = True
        elif _is_marker(text, policy, patterns):
            bound = marker_upper_bound(text)
            if bound is not None:
                upper[len(values)] = bound
            values.append(None)
            suppressed.append(True)
        else:
            values.append(None)
            suppressed.append(False)
            numeric = False
    # a column holding only suppression markers is a fully suppressed data column
    all_markers = numeric and not any_number and any(suppressed)
    return Parsed(values, suppressed, numeric and (any_number or all_markers), any_number, upper)


@lru_cache(maxsize=64)
def _total_sets(plain: tuple[str, ...], ambiguous: tuple[str, ...]) -> tuple[set, set]:
    return {" ".join(words(t)) for t in plain}, {" ".join(words(t)) for t in ambiguous}


@lru_cache(maxsize=65536)
def _normalised(text: str) -> str:
    return " ".join(words(text)) if text else ""


def is_total_label(text: str, policy: Policy, ambiguous: bool = True) -> bool:
    """Whether a label marks a margin; with ``ambiguous`` also labels such as 'All' that need
    the numbers to confirm them."""
    plain, maybe = _total_sets(tuple(policy.total_labels), tuple(policy.ambiguous_total_labels))
    low = _normalised(text)
    return low in plain or (ambiguous and low in maybe)


def is_ambiguous_total(text: str, policy: Policy) -> bool:
    return is_total_label(text, policy) and not is_total_label(text, policy, ambiguous=False)


def column_role(name: str, parsed: Parsed) -> tuple[Role, str | None]:
    """The role of a column from its name, then its values."""
    tokens = words(name)
    if not parsed.numeric:
        return Role.LABEL, None
    if re.fullmatch(r"[+-]?\d+(\.\d+)?", name.strip()):
        # a numeric header (a year, a category code) is a category of a wide table: a data column
        tokens = []
    nums = [v for v in parsed.values if v is not None]
    integer_valued = all(float(v).is_integer() for v in nums)
    if (
        is_cumulative(tokens)
        and integer_valued
        and not set(tokens) & (PERCENT_WORDS - {"cumulative"})
    ):
        return Role.CUMULATIVE, None
    if "at risk" in " ".join(tokens) and integer_valued:
        return Role.COUNT, None  # 'n at risk' is a count of people, not a risk (a proportion)
    if any(t in PERCENT_WORDS for t in tokens):
        return Role.PERCENT, None
    for t in tokens:
        if t in STAT_WORDS or re.fullmatch(r"p\d{1,2}|q\d|\d{1,2}(st|nd|rd|th)", t):
            kind = STAT_WORDS.get(t, "percentile")
            return Role.STATISTIC, kind
    count_hint = any(t in COUNT_WORDS for t in tokens)
    label_hint = any(t in LABEL_WORDS for t in tokens)
    if count_hint and integer_valued and not (label_hint and tokens[0] in LABEL_WORDS):
        return Role.COUNT, None
    if "total" in tokens and not integer_valued:
        return Role.STATISTIC, "sum"
    if label_hint and integer_valued:
        return Role.LABEL, None  # codes, years, ids: fractional values are never labels
    if integer_valued:
        distinct = set(nums)
        if len(distinct) >= 2 and all(1900 <= v <= 2100 for v in distinct) and not count_hint:
            return Role.LABEL, None  # calendar years
        return Role.COUNT, None
    return Role.STATISTIC, "unknown"


def is_cumulative(tokens: list[str]) -> bool:
    """Whether a column name (as ``words``) says it holds running totals."""
    return bool(set(tokens) & CUMULATIVE_WORDS) or "to date" in " ".join(tokens)


def row_statistic(label: str) -> str | None:
    """The statistic a row label names ('mean', 'max', '25%', 'count'), as in pandas'
    ``describe()``, where statistics are rows and variables are columns."""
    text = label.strip().lower()
    if re.fullmatch(r"\d{1,2}(\.\d+)?\s*%", text):
        return "percentile"
    tokens = words(text)
    if len(tokens) != 1:
        return None
    token = tokens[0]
    if token in {"count", "n", "nobs", "freq"}:
        return "count"
    if token in STAT_WORDS:
        return STAT_WORDS[token]
    if re.fullmatch(r"p\d{1,2}|q\d", token):
        return "percentile"
    return None


def read_layout(frame: pl.DataFrame, policy: Policy) -> Layout:
    roles: dict[str, Role] = {}
    stats: dict[str, str] = {}
    parsed: dict[str, Parsed] = {}
    for name in frame.columns:
        p = parse_column(frame[name], policy)
        parsed[name] = p
        role, kind = column_role(name, p)
        roles[name] = role
        if kind:
            stats[name] = kind
    # a column of nothing but markers ('x', '-') is a suppressed data column only in a table
    # that has numbers somewhere; in an all-text table it is text
    if not any(p.any_number for p in parsed.values()):
        for name in frame.columns:
            roles[name] = Role.LABEL
            stats.pop(name, None)
    layout = Layout(roles, stats, parsed, n_rows=frame.height)
    for row in range(frame.height):
        if any(is_total_label(v, policy) for v in layout.labels_of(row, frame).values()):
            layout.total_rows.add(row)
    for row in range(frame.height):
        for text in layout.labels_of(row, frame).values():
            kind = row_statistic(text)
            if kind:
                layout.row_statistic[row] = kind
                break
    layout.total_columns = {
        c for c in frame.columns if roles[c] != Role.LABEL and is_total_label(c, policy)
    }
    return layout

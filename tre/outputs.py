"""Researcher helpers: disclosure-safe tables and figures, written with their evidence.

Run inside the sandbox on polars DataFrames/LazyFrames or DuckDB relations::

    from tre import outputs
    t = outputs.frequency_table(df, rows="sex", columns="iccc3_group", suppress=True)
    t.status, t.findings          # the airlock's verdict, computed now
    t.save("results/sex_by_group.csv")   # + results/sex_by_group.evidence.json

Every helper computes its table, then checks the exact bytes it will write with the airlock's
own ``check_table`` (same rules, same policy), so the researcher sees the verdict the airlock
will give. Suppression and rounding are options; margins are true totals computed from the
data, and secondary suppression makes sure no suppressed cell can be recomputed from them.
Applying suppression or rounding makes the result ``review`` with an automatic note (as ACRO).
"""

from __future__ import annotations

import datetime as dt
import io
import itertools
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from airlock.checks import rules
from airlock.checks.findings import Finding, Status, worst
from airlock.checks.frequency import cube_equations
from airlock.checks.layout import is_total_label
from airlock.checks.tables import check_table
from airlock.evidence import CellEvidence, ModelEvidence, TableEvidence
from airlock.policy import Policy, load_policy

SUPPRESSED = "suppressed"  # what a suppressed cell holds in a written table
TOTAL = "Total"
MISSING_LABEL = "missing"
STATISTICS = ("count", "sum", "mean", "median", "min", "max", "std", "mode")
_PERCENTILE = re.compile(r"^p(\d{1,2})$")


class OutputError(ValueError):
    """Bad input to an output helper: the message says what to change."""


@dataclass
class TableOutput:
    """A checked output: the table as it will be written, its evidence, the airlock's findings."""

    name: str
    output_class: str
    table: pl.DataFrame
    evidence: TableEvidence
    findings: list[Finding]
    figure_png: bytes | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> Status:
        return worst([f.status for f in self.findings])

    def csv_text(self) -> str:
        return _csv(self.table)

    def save(self, path: str | Path) -> list[Path]:
        """Write ``<path>`` (CSV), ``<stem>.evidence.json`` and, for figures, ``<stem>.png``.

        Files are written to a temporary name and renamed, so a crash never leaves half a table.
        """
        target = Path(path)
        if target.suffix.lower() != ".csv":
            target = target.with_suffix(".csv")
        target.parent.mkdir(parents=True, exist_ok=True)
        written = [_atomic_write(target, self.csv_text().encode())]
        evidence = self.evidence.model_copy(update={"name": target.name})
        written.append(
            _atomic_write(
                target.with_name(f"{target.stem}.evidence.json"), evidence.to_json().encode()
            )
        )
        if self.figure_png is not None:
            written.append(_atomic_write(target.with_suffix(".png"), self.figure_png))
        return written

    def __repr__(self) -> str:
        rules_hit = sorted({f.rule for f in self.findings if f.status != Status.PASS})
        return (
            f"<{self.output_class} {self.name!r}: {self.status.value}"
            f"{' (' + ', '.join(rules_hit) + ')' if rules_hit else ''}>"
        )


def _atomic_write(path: Path, data: bytes) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


def _csv(frame: pl.DataFrame) -> str:
    return frame.write_csv(null_value=SUPPRESSED, float_precision=None)


def _frame(data: Any) -> pl.DataFrame:
    """A polars DataFrame from a polars DataFrame/LazyFrame or a DuckDB relation."""
    if isinstance(data, pl.DataFrame):
        return data
    if isinstance(data, pl.LazyFrame):
        return data.collect()
    if hasattr(data, "pl") and callable(data.pl):  # duckdb.DuckDBPyRelation
        result = data.pl()
        return result.collect() if isinstance(result, pl.LazyFrame) else result
    raise OutputError(
        f"expected a polars DataFrame/LazyFrame or a DuckDB relation, not {type(data).__name__}"
    )


def _columns(value: str | list[str] | None, frame: pl.DataFrame, what: str) -> list[str]:
    names = [] if value is None else [value] if isinstance(value, str) else list(value)
    for n in names:
        if n not in frame.columns:
            raise OutputError(f"{what}: no column {n!r}; columns are {', '.join(frame.columns)}")
    if len(set(names)) != len(names):
        raise OutputError(f"{what}: a column is named twice")
    return names


def default_policy() -> Policy:
    """The policy a helper uses when none is passed: the file named by
    ``TRE_DISCLOSURE_POLICY`` (the sandbox's effective project policy) or the repository's
    ``policies/disclosure.yaml``, plus the JSON overrides in ``TRE_DISCLOSURE_OVERRIDES``."""
    path = os.environ.get("TRE_DISCLOSURE_POLICY")
    overrides_text = os.environ.get("TRE_DISCLOSURE_OVERRIDES", "")
    try:
        overrides = json.loads(overrides_text) if overrides_text else {}
    except json.JSONDecodeError as exc:
        raise OutputError(f"TRE_DISCLOSURE_OVERRIDES is not JSON: {exc}") from exc
    if not isinstance(overrides, dict):
        raise OutputError("TRE_DISCLOSURE_OVERRIDES must be a JSON object")
    return load_policy(Path(path), overrides) if path else load_policy(overrides=overrides)


def _policy(policy: Policy | None) -> Policy:
    return policy or default_policy()


def _labels(frame: pl.DataFrame, dims: list[str], policy: Policy) -> pl.DataFrame:
    """Label columns as text; a level spelled like a margin ('Total', 'All') is refused."""
    out = frame.with_columns(
        [pl.col(d).cast(pl.String).fill_null(MISSING_LABEL).alias(d) for d in dims]
    )
    for d in dims:
        for level in out[d].unique().to_list():
            if is_total_label(level, policy):
                raise OutputError(
                    f"column {d!r} has a level {level!r} that reads as a margin label; "
                    "rename it (e.g. with pl.col(...).replace)"
                )
    return out


def _check(
    name: str, table: pl.DataFrame, evidence: TableEvidence, policy: Policy
) -> tuple[str, list[Finding]]:
    """Check the table exactly as the airlock will read it back from the CSV."""
    reread = pl.read_csv(io.StringIO(_csv(table)), infer_schema_length=None)
    return check_table(reread, policy, evidence)


def _evidence(name: str, output_class: str, policy: Policy, **kw: Any) -> TableEvidence:
    return TableEvidence(
        name=name,
        output_class=output_class,
        producer="tre.outputs",
        created=dt.datetime.now(dt.UTC),
        policy_version=policy.label,
        **kw,
    )


# ---------------------------------------------------------------- frequency tables


def _cube(frame: pl.DataFrame, dims: list[str], margins: bool) -> tuple[list[tuple], list[int]]:
    """Counts for every combination of observed levels (zeros included) plus, with margins,
    every partial and grand total; returns (keys, counts)."""
    counted = frame.group_by(dims).len(name="__n")
    counts = {tuple(r[:-1]): int(r[-1]) for r in counted.iter_rows()}
    levels = [sorted(frame[d].unique().to_list()) for d in dims]
    keys: list[tuple] = []
    values: list[int] = []
    for combo in itertools.product(*levels):
        keys.append(combo)
        values.append(counts.get(combo, 0))
    if margins:
        base = dict(zip(keys, values, strict=True))
        for r in range(1, len(dims) + 1):
            for totalled in itertools.combinations(range(len(dims)), r):
                sums: dict[tuple, int] = {}
                for key, v in base.items():
                    k = tuple(TOTAL if i in totalled else x for i, x in enumerate(key))
                    sums[k] = sums.get(k, 0) + v
                for k in sorted(sums):
                    keys.append(k)
                    values.append(sums[k])
    return keys, values


def suppress_cells(keys: list[tuple], values: list[float], policy: Policy) -> list[bool]:
    """Primary suppression (every cell a count rule fails) then secondary suppression until
    no suppressed cell can be recomputed from the margins (``rules.recoverable_cells``)."""
    suppressed = [rules.count_cell(v, policy) is not None for v in values]
    equations = cube_equations([tuple(str(x) for x in k) for k in keys], policy)
    for _ in range(len(values) + 1):
        recovered, _inconsistent = rules.recoverable_cells(values, suppressed, equations, policy)
        if not recovered:
            break
        for r in recovered:
            # hide the smallest visible partner of the recovered cell in one of its equations
            candidates: list[int] = []
            for eq in equations:
                members = [eq.total, *eq.parts]
                if r.cell in members:
                    candidates += [m for m in eq.parts if not suppressed[m]]
                    if not candidates and not suppressed[eq.total]:
                        candidates.append(eq.total)
            if candidates:
                best = min(candidates, key=lambda m: (values[m], m))
                suppressed[best] = True
    return suppressed


def _round(value: float, base: int) -> int:
    return int(math.floor(value / base + 0.5) * base)


def frequency_table(
    data: Any,
    rows: str | list[str],
    columns: str | None = None,
    *,
    suppress: bool = False,
    round_to: int | None = None,
    margins: bool = True,
    name: str = "frequency_table",
    policy: Policy | None = None,
) -> TableOutput:
    """Counts of people by ``rows`` (and ``columns`` for a wide table), with totals.

    Every combination of the observed levels is shown (zeros included: they can be
    disclosive). ``suppress`` hides cells the count rules fail, then hides further cells until
    no hidden cell can be recomputed from the totals. ``round_to`` rounds every shown count
    (totals are rounded true totals).
    """
    pol = _policy(policy)
    frame = _frame(data)
    row_dims = _columns(rows, frame, "rows")
    col_dims = _columns(columns, frame, "columns")
    if not row_dims:
        raise OutputError("rows: name at least one column")
    if set(row_dims) & set(col_dims):
        raise OutputError("a column cannot be both a row and a column dimension")
    if round_to is not None and round_to < 1:
        raise OutputError("round_to must be a positive integer")
    dims = row_dims + col_dims
    frame = _labels(frame.select(dims), dims, pol)
    keys, counts = _cube(frame, dims, margins)
    suppressed = (
        suppress_cells(keys, [float(c) for c in counts], pol) if suppress else [False] * len(counts)
    )
    shown: list[int | None] = [
        None if s else (_round(c, round_to) if round_to else c)
        for c, s in zip(counts, suppressed, strict=True)
    ]
    long = pl.DataFrame(
        {**{d: [k[i] for k in keys] for i, d in enumerate(dims)}, "n": shown},
        schema={**{d: pl.String for d in dims}, "n": pl.Int64},
    )
    if col_dims:
        column = col_dims[0] if len(col_dims) == 1 else "__columns__"
        if len(col_dims) > 1:
            long = long.with_columns(pl.concat_str(col_dims, separator=" | ").alias(column))
        order = list(dict.fromkeys(long[column].to_list()))
        table = long.pivot(on=column, index=row_dims, values="n").select(row_dims + order)
    else:
        table = long
    notes = []
    if suppress and any(suppressed):
        notes.append(f"{sum(suppressed)} cell(s) suppressed (primary and secondary)")
    if round_to:
        notes.append(f"counts rounded to base {round_to}")
    evidence = _evidence(
        name,
        "frequency_table",
        pol,
        suppression_applied=bool(suppress and any(suppressed)),
        rounding_base=round_to,
        notes=notes,
        margins="true_totals" if margins else None,
    )
    output_class, findings = _check(name, table, evidence, pol)
    return TableOutput(
        name, output_class, table, evidence, findings, extra={"suppressed": sum(suppressed)}
    )


# ---------------------------------------------------------------- magnitude tables


def _stat_expr(statistic: str, value: str) -> pl.Expr:
    col = pl.col(value).drop_nulls()
    m = _PERCENTILE.match(statistic)
    if m:
        return col.quantile(int(m.group(1)) / 100, interpolation="nearest")
    exprs = {
        "sum": col.sum(),
        "mean": col.mean(),
        "median": col.median(),
        "min": col.min(),
        "max": col.max(),
        "std": col.std(),
        "count": col.count(),
        "mode": col.mode().sort().first(),
    }
    if statistic not in exprs:
        raise OutputError(f"unknown statistic {statistic!r}; use {', '.join(STATISTICS)} or pNN")
    return exprs[statistic]


def _cell_rule_breaches(cell: CellEvidence, statistic: str, policy: Policy) -> list[rules.Breach]:
    from airlock.checks.magnitude import cell_rules  # the airlock's own per-cell rules

    return [b for b in cell_rules(cell, statistic, policy) if b.status != Status.PASS]


def magnitude_table(
    data: Any,
    rows: str | list[str],
    values: str,
    statistics: list[str] | str = "mean",
    *,
    columns: str | list[str] | None = None,
    suppress: bool = False,
    name: str = "magnitude_table",
    policy: Policy | None = None,
) -> TableOutput:
    """Statistics of ``values`` by ``rows`` (and ``columns``), long format, one column per
    statistic (``mean_<values>``...) and ``n``, with per-cell evidence for the dominance,
    class-disclosure and extreme-value rules. Evidence stores contributions as shares of the
    cell total (the rules are scale-free), never the raw values."""
    pol = _policy(policy)
    frame = _frame(data)
    dims = _columns(rows, frame, "rows") + _columns(columns, frame, "columns")
    if not dims:
        raise OutputError("rows: name at least one column")
    _columns(values, frame, "values")
    if not frame[values].dtype.is_numeric():
        raise OutputError(f"values: column {values!r} is not numeric")
    stats = [statistics] if isinstance(statistics, str) else list(statistics)
    if not stats:
        raise OutputError("statistics: name at least one")
    frame = _labels(frame.select(dims + [values]), dims, pol)
    v = pl.col(values)
    k = max(pol.nk_n, 2)
    agg = (
        frame.group_by(dims)
        .agg(
            v.drop_nulls().count().alias("__n"),
            v.null_count().alias("__missing"),
            v.drop_nulls().sum().alias("__total"),
            v.drop_nulls().abs().top_k(k).alias("__largest"),
            v.drop_nulls().n_unique().alias("__distinct"),
            (v.drop_nulls().min() < 0).alias("__negative"),
            *[_stat_expr(s, values).alias(f"__stat_{s}") for s in stats],
        )
        .sort(dims)
    )
    # contributors equal to each shown value (an exact min, max or percentile is exposed
    # unless enough people share it)
    at_value = frame.join(agg.select(dims + [f"__stat_{s}" for s in stats]), on=dims)
    at_value = at_value.group_by(dims).agg(
        *[(v == pl.col(f"__stat_{s}")).sum().alias(f"__at_{s}") for s in stats]
    )
    agg = agg.join(at_value, on=dims, how="left").sort(dims)
    out_columns = {d: agg[d].to_list() for d in dims}
    cells: list[CellEvidence] = []
    suppressed_n: list[bool] = [False] * agg.height
    stat_values: dict[str, list[float | None]] = {}
    any_suppressed = False
    for s in stats:
        column = f"{s}_{values}"
        shown: list[float | None] = []
        for i, r in enumerate(agg.iter_rows(named=True)):
            value = r[f"__stat_{s}"]
            value = None if value is None else float(value)
            total = float(r["__total"] or 0.0)
            largest = [float(x) for x in (r["__largest"] or [])]
            if total > 0 and not r["__negative"]:
                largest = [x / total for x in largest]
                total = 1.0
            else:
                # no share can be formed (negative or all-zero contributions): record nothing
                # rather than a person's raw value; the negative/class rules decide the cell
                largest, total = [], 0.0
            cell = CellEvidence(
                column=column,
                row=i,
                labels={d: r[d] for d in dims},
                statistic=_kind(s),
                value=value,
                n=int(r["__n"]),
                largest=largest,
                total=total,
                n_distinct=int(r["__distinct"]),
                n_at_value=int(r[f"__at_{s}"] or 0),
                negative=bool(r["__negative"]),
                missing=int(r["__missing"]),
            )
            breaches = _cell_rule_breaches(cell, _kind(s), pol)
            if suppress and any(b.status == Status.FAIL for b in breaches):
                cell = CellEvidence(
                    column=column, row=i, labels=cell.labels, statistic=_kind(s), suppressed=True
                )
                shown.append(None)
                any_suppressed = True
                if r["__n"] < pol.min_cell_count:
                    suppressed_n[i] = True
            else:
                shown.append(value)
            cells.append(cell)
        stat_values[column] = shown
    n_shown = [None if s else int(n) for s, n in zip(suppressed_n, agg["__n"], strict=True)]
    if suppress:
        n_shown = [None if (x is not None and rules.count_cell(x, pol)) else x for x in n_shown]
        any_suppressed = any_suppressed or any(x is None for x in n_shown)
    table = pl.DataFrame(
        {**out_columns, **stat_values, "n": n_shown},
        schema={
            **{d: pl.String for d in dims},
            **{c: pl.Float64 for c in stat_values},
            "n": pl.Int64,
        },
    )
    evidence = _evidence(
        name,
        "magnitude_table",
        pol,
        suppression_applied=any_suppressed,
        cells=cells,
        notes=["cells suppressed by the magnitude rules"] if any_suppressed else [],
    )
    output_class, findings = _check(name, table, evidence, pol)
    return TableOutput(name, output_class, table, evidence, findings)


def _kind(statistic: str) -> str:
    return "percentile" if _PERCENTILE.match(statistic) else statistic


# ---------------------------------------------------------------- regression


def regression(
    model_or_formula: Any,
    data: Any = None,
    *,
    family: str = "ols",
    name: str = "regression",
    policy: Policy | None = None,
) -> TableOutput:
    """A coefficient table of a fitted statsmodels model, or of ``formula`` fitted on ``data``
    (``family``: ols, logit, poisson). The evidence carries N, residual degrees of freedom,
    the number of parameters and the count per level of every categorical predictor."""
    import statsmodels.formula.api as smf  # imported here: ~1 s, only when used

    pol = _policy(policy)
    frame: pl.DataFrame | None = None
    if isinstance(model_or_formula, str):
        if data is None:
            raise OutputError("regression from a formula needs data")
        frame = _frame(data)
        fitters = {"ols": smf.ols, "logit": smf.logit, "poisson": smf.poisson}
        if family not in fitters:
            raise OutputError(f"family must be one of {', '.join(fitters)}")
        try:
            result = (
                fitters[family](model_or_formula, frame.to_pandas()).fit(disp=0)
                if family != "ols"
                else smf.ols(model_or_formula, frame.to_pandas()).fit()
            )
        except Exception as exc:  # patsy and statsmodels raise many types for a bad formula
            raise OutputError(f"cannot fit {model_or_formula!r}: {exc}") from exc
    else:
        result = model_or_formula
        if not hasattr(result, "params") or not hasattr(result, "df_resid"):
            raise OutputError("pass a fitted statsmodels results object or a formula string")
        model_frame = getattr(getattr(result.model, "data", None), "frame", None)
        if model_frame is not None:
            frame = pl.from_pandas(model_frame)
    params = result.params
    conf = result.conf_int()
    stat_name = "t" if getattr(result, "use_t", False) else "z"
    table = pl.DataFrame(
        {
            "term": [str(t) for t in params.index],
            "coef": [float(x) for x in params.values],
            "std_err": [float(x) for x in result.bse.values],
            stat_name: [float(x) for x in result.tvalues.values],
            "p_value": [float(x) for x in result.pvalues.values],
            "ci_lower": [float(x) for x in conf.iloc[:, 0].values],
            "ci_upper": [float(x) for x in conf.iloc[:, 1].values],
        }
    )
    categorical: dict[str, dict[str, int]] = {}
    if frame is not None:
        used = set(getattr(result.model, "exog_names", [])) | {
            str(getattr(result.model, "endog_names", ""))
        }
        for column in frame.columns:
            series = frame[column]
            mentioned = any(
                column == u or f"({column})" in u or u.startswith(f"{column}[") for u in used
            )
            binary_outcome = (
                column == str(getattr(result.model, "endog_names", "")) and series.n_unique() == 2
            )
            # a numeric column in C(...) is categorical too: `C(stage)[T.4]` is a level
            as_levels = any(u.startswith(f"C({column}") for u in used)
            if mentioned and (not series.dtype.is_numeric() or binary_outcome or as_levels):
                counts = series.cast(pl.String).fill_null(MISSING_LABEL).value_counts()
                categorical[column] = {str(r[0]): int(r[1]) for r in counts.iter_rows()}
    evidence = _evidence(
        name,
        "model_summary",
        pol,
        model=ModelEvidence(
            nobs=int(result.nobs),
            df_resid=float(result.df_resid),
            n_params=len(params),
            categorical_cells=categorical,
        ),
    )
    output_class, findings = _check(name, table, evidence, pol)
    return TableOutput(name, output_class, table, evidence, findings)


# ---------------------------------------------------------------- survival


def survival_table(
    data: Any,
    time: str,
    event: str,
    *,
    group: str | None = None,
    interval: float | None = None,
    truncate: bool = False,
    name: str = "survival_table",
    policy: Policy | None = None,
) -> TableOutput:
    """Kaplan-Meier estimate computed with polars (product-limit over distinct event times),
    or, with ``interval``, a life table over intervals of that width (times grouped by
    ``floor(time / interval)``, so each row pools everyone leaving in the interval).

    Columns: [group], time, at_risk, events, censored, survival. ``event`` is 1/True for an
    event and 0/False for censoring. ``truncate`` drops the tail where fewer than
    ``survival_min_step`` people remain at risk (noted in the evidence).
    """
    pol = _policy(policy)
    frame = _frame(data)
    dims = _columns(group, frame, "group")
    _columns([time, event], frame, "time/event")
    if interval is not None and interval <= 0:
        raise OutputError("interval must be positive")
    f = frame.select(dims + [time, event]).drop_nulls([time, event])
    if f.height == 0:
        raise OutputError("no rows with both a time and an event indicator")
    if not f[time].dtype.is_numeric() or (f[time] < 0).any():
        raise OutputError(f"time column {time!r} must be numeric and non-negative")
    f = f.with_columns(pl.col(event).cast(pl.Int8, strict=False).alias("__event"))
    if not set(f["__event"].unique().to_list()) <= {0, 1}:
        raise OutputError(f"event column {event!r} must be 0/1 or boolean")
    if dims:
        f = _labels(f, dims, pol)
    t = (pl.col(time) / interval).floor() * interval if interval else pl.col(time)
    f = f.with_columns(t.alias("__t"))
    keys = dims + ["__t"]
    steps = (
        f.group_by(keys)
        .agg(
            pl.col("__event").sum().alias("events"),
            (1 - pl.col("__event")).sum().alias("censored"),
            pl.len().alias("__leaving"),
        )
        .sort(keys)
    )
    over = dims or None
    steps = steps.with_columns(
        (pl.col("__leaving").sum().over(over) if over else pl.col("__leaving").sum()).alias("__n")
    )
    leaving_before = (
        pl.col("__leaving").cum_sum().over(over) if over else pl.col("__leaving").cum_sum()
    ) - pl.col("__leaving")
    steps = steps.with_columns((pl.col("__n") - leaving_before).alias("at_risk"))
    factor = 1 - pl.col("events") / pl.col("at_risk")
    steps = steps.with_columns(
        (factor.cum_prod().over(over) if over else factor.cum_prod()).alias("survival")
    )
    table = steps.select(
        *dims,
        pl.col("__t").alias("time"),
        pl.col("at_risk").cast(pl.Int64),
        pl.col("events").cast(pl.Int64),
        pl.col("censored").cast(pl.Int64),
        "survival",
    )
    notes = [f"life table, interval {interval:g}"] if interval else []
    if truncate:
        kept = table.filter(pl.col("at_risk") >= pol.survival_min_step)
        if kept.height < table.height:
            notes.append(
                f"truncated: {table.height - kept.height} row(s) with fewer than "
                f"{pol.survival_min_step} at risk removed"
            )
        table = kept
    evidence = _evidence(name, "survival_table", pol, notes=notes)
    output_class, findings = _check(name, table, evidence, pol)
    return TableOutput(name, output_class, table, evidence, findings)


# ---------------------------------------------------------------- histogram


def _nice_width(span: float, bins: int, scale: float) -> float:
    """A 1/2/2.5/5 x 10^k bin width covering ``span`` in ``bins`` bins; spans too small to
    matter next to the values' ``scale`` (or zero) get a width from the scale instead."""
    floor = max(abs(scale), 1.0) * 1e-9
    raw = span / bins if span > floor else max(abs(scale), 1.0) / bins
    magnitude = 10.0 ** math.floor(math.log10(raw))
    for step in (1, 2, 2.5, 5, 10):
        if raw <= step * magnitude:
            return step * magnitude
    return 10 * magnitude


def histogram_bins(
    values: list[float], bins: int = 10, value_range: tuple[float, float] | None = None
) -> tuple[list[float], list[int]]:
    """Bin edges and counts. Bins are [lower, upper) except the last, which is closed, so the
    maximum is always counted (numpy's convention; ACRO's np.digitize drops it). Without
    ``value_range`` the edges are rounded outward to a 'nice' width so they do not print the
    exact minimum and maximum (each one person's value)."""
    if bins < 1:
        raise OutputError("bins must be at least 1")
    data = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not data:
        raise OutputError("no finite values to bin")
    explicit = value_range is not None
    if value_range is not None:
        lo, hi = float(value_range[0]), float(value_range[1])
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise OutputError("range must be (low, high) with high > low")
        width = (hi - lo) / bins
        edges = [lo + i * width for i in range(bins)] + [hi]
    else:
        lo_v, hi_v = min(data), max(data)
        width = _nice_width(hi_v - lo_v, bins, max(abs(lo_v), abs(hi_v)))
        lo = math.floor(lo_v / width) * width
        if lo > lo_v:  # float rounding
            lo -= width
        n = max(1, math.ceil((hi_v - lo) / width))
        while lo + n * width < hi_v:  # float rounding
            n += 1
        edges = [lo + i * width for i in range(n + 1)]
    counts = [0] * (len(edges) - 1)
    last = len(counts) - 1
    for x in data:
        if explicit and (x < edges[0] or x > edges[-1]):
            continue  # outside the range the researcher asked for
        # bisect on edges: index of the bin whose lower edge <= x (the last bin is closed)
        lo_i, hi_i = 0, len(edges) - 1
        while hi_i - lo_i > 1:
            mid = (lo_i + hi_i) // 2
            if edges[mid] <= x:
                lo_i = mid
            else:
                hi_i = mid
        counts[min(lo_i, last)] += 1
    return edges, counts


def histogram(
    data: Any,
    column: str,
    *,
    bins: int = 10,
    value_range: tuple[float, float] | None = None,
    suppress: bool = False,
    name: str = "histogram",
    policy: Policy | None = None,
) -> TableOutput:
    """A histogram as a table (every bin a frequency cell) plus a PNG drawn from that table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pol = _policy(policy)
    frame = _frame(data)
    _columns(column, frame, "column")
    if not frame[column].dtype.is_numeric():
        raise OutputError(f"column {column!r} is not numeric")
    edges, counts = histogram_bins(frame[column].to_list(), bins, value_range)
    shown: list[int | None] = list(counts)
    if suppress:
        shown = [None if rules.count_cell(c, pol) else c for c in counts]
    table = pl.DataFrame(
        {"bin_lower": edges[:-1], "bin_upper": edges[1:], "n": shown},
        schema={"bin_lower": pl.Float64, "bin_upper": pl.Float64, "n": pl.Int64},
    )
    suppressed = sum(1 for x in shown if x is None)
    evidence = _evidence(
        name,
        "histogram",
        pol,
        suppression_applied=suppressed > 0,
        notes=[f"{suppressed} bin(s) suppressed"] if suppressed else [],
    )
    output_class, findings = _check(name, table, evidence, pol)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    widths = [b - a for a, b in zip(edges[:-1], edges[1:], strict=True)]
    ax.bar(edges[:-1], [x or 0 for x in shown], width=widths, align="edge", edgecolor="black")
    ax.set_xlabel(column)
    ax.set_ylabel("count")
    ax.set_title(name + (" (suppressed bins shown as 0)" if suppressed else ""))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return TableOutput(name, output_class, table, evidence, findings, figure_png=buf.getvalue())

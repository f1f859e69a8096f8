"""The same frequency and magnitude tables checked by tre.outputs and by ACRO 1.0, in one run.

Reports, per scenario, both verdicts, the time each took (producing and checking the table,
pandas/polars conversion excluded) and the reason for EVERY disagreement, derived from the
rules each side applied. Needs the dev group's ``acro`` (pandas).
"""

from __future__ import annotations

import contextlib
import io
import logging
import statistics
import time
from dataclasses import dataclass

import numpy as np
import polars as pl

from airlock.checks import rules
from airlock.checks.findings import Status
from airlock.checks.tables import check_table
from airlock.policy import load_policy
from tre import outputs

# our rule -> the ACRO 1.0 check that would flag the same risk (None: ACRO has none)
EQUIVALENT: dict[str, tuple[str, ...] | None] = {
    rules.MIN_CELL_COUNT: ("MinimumThresholdCheck",),
    rules.MIN_CONTRIBUTORS: ("MinimumThresholdCheck",),
    # ACRO 1.0 flags a zero count through its threshold check (0 < 10)
    rules.ZERO_CELL: ("PresenceOfZeroCheck", "MinimumThresholdCheck"),
    rules.NK_DOMINANCE: ("NKCheck",),
    rules.P_RATIO: ("PPercentCheck",),
    rules.CLASS_DISCLOSURE: ("AllValuesSameCheck",),
    rules.NEGATIVE_VALUES: ("NegativeCheck",),
    rules.EXTREME_VALUE: None,
    rules.PERCENTILE_VALUE: None,
    rules.SECONDARY_DISCLOSURE: None,
}
KNOWN = {
    rules.CLASS_DISCLOSURE: "ACRO 1.0's all-values-identical check never fires",
    rules.EXTREME_VALUE: "ACRO has no rule for an exact min/max being one person's value",
    rules.PERCENTILE_VALUE: "ACRO has no rule for exact percentiles/medians",
    rules.NEGATIVE_VALUES: "dominance is undefined with negative contributions: we do not "
    "compute NK/p% there, ACRO does",
    rules.MAGNITUDE_EVIDENCE_MISSING: "we never pass a magnitude cell without evidence",
    rules.MITIGATION_APPLIED: "suppression applied: review (ACRO says the same in its summary)",
    rules.SUPPRESSION_APPLIED: "suppressed cells: review until a checker confirms them",
}


@dataclass
class Scenario:
    name: str
    data: pl.DataFrame
    aggfunc: str | None = None  # None: frequency table
    values: str = "dose"


def _cohort(n: int, seed: int, rows: int = 20, cols: int = 10) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    w = np.linspace(3, 0.5, cols)
    return pl.DataFrame(
        {
            "region": [f"r{i:02d}" for i in rng.integers(0, rows, n)],
            "grp": [f"g{j}" for j in rng.choice(cols, n, p=w / w.sum())],
            "dose": rng.gamma(2.0, 50.0, n).round(1),
            "change": rng.normal(0, 5, n).round(1),
        }
    )


def scenarios() -> list[Scenario]:
    big = _cohort(40_000, 1)
    small = _cohort(2_500, 2)
    zero = big.filter(~((pl.col("region") == "r03") & (pl.col("grp") == "g4")))
    dominated = big.with_columns(
        pl.when(
            (pl.col("region") == "r05")
            & (pl.col("grp") == "g2")
            & (
                pl.int_range(pl.len())
                == pl.int_range(pl.len())
                .filter((pl.col("region") == "r05") & (pl.col("grp") == "g2"))
                .first()
            )
        )
        .then(1_000_000.0)
        .otherwise(pl.col("dose"))
        .alias("dose")
    )
    identical = big.with_columns(
        pl.when((pl.col("region") == "r07") & (pl.col("grp") == "g9"))
        .then(42.0)
        .otherwise(pl.col("dose"))
        .alias("dose")
    )
    return [
        Scenario("frequency, all cells large", big),
        Scenario("frequency, small cells", small),
        Scenario("frequency, one zero cell", zero),
        Scenario("mean, safe", big, "mean"),
        Scenario("mean, one dominated cell", dominated, "mean"),
        Scenario("mean, one cell where everyone has the same value", identical, "mean"),
        Scenario("mean of a variable with negative values", big, "mean", "change"),
        Scenario("max", big, "max"),
        Scenario("median", big, "median"),
        Scenario("sum, small cells", small, "sum"),
    ]


def run_ours(s: Scenario) -> outputs.TableOutput:
    if s.aggfunc is None:
        return outputs.frequency_table(s.data, rows="region", columns="grp", margins=False)
    return outputs.magnitude_table(
        s.data, rows="region", columns="grp", values=s.values, statistics=s.aggfunc
    )


def run_acro(session, frame, s: Scenario):
    if s.aggfunc is None:
        session.crosstab(frame.region, frame.grp)
    else:
        session.crosstab(frame.region, frame.grp, values=frame[s.values], aggfunc=s.aggfunc)
    return session.results.get_index(-1)


def _acro_flags(record) -> set[str]:
    cells = (record.sdc or {}).get("cells", {})
    return {check for check, where in cells.items() if where}


def _quiet() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("acro", "acro:records", "acro:summary"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)


def _timed(fn, repeat: int):
    out = fn()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        samples.append(time.perf_counter() - start)
    return out, statistics.median(samples) * 1000


def _acro_ran(record) -> list[str]:
    return sorted((record.sdc or {}).get("cells", {}))


def _acro_cells(record, check: str, data: pl.DataFrame) -> set[tuple[str, str]]:
    """ACRO's flagged [row, column] positions as (region, grp) labels (its tables are sorted)."""
    regions = sorted(data["region"].unique().to_list())
    groups = sorted(data["grp"].unique().to_list())
    where = (record.sdc or {}).get("cells", {}).get(check, [])
    return {(regions[r], groups[c]) for r, c in where}


def _our_cells(finding) -> set[tuple[str, str]]:
    out = set()
    for c in finding.cells:
        labels = c.get("labels", {})
        column = labels.get("grp", c.get("column"))
        if "region" in labels:
            out.add((labels["region"], column))
    return out


def reasons(ours: outputs.TableOutput, record, data: pl.DataFrame) -> list[str]:
    """Why the verdicts (or the flagged cells) differ, from what each side actually did."""
    out = []
    ran = _acro_ran(record)
    explained: set[tuple[str, tuple[str, str]]] = set()  # (ACRO check, cell) we account for
    our_cells_by_check: dict[str, set] = {}
    for f in ours.findings:
        if f.status == Status.PASS:
            continue
        checks = EQUIVALENT.get(f.rule)
        mine = _our_cells(f)
        note = KNOWN.get(f.rule)
        if checks is None:
            out.append(
                f"ours {f.status.value} by {f.rule} on {len(f.cells)} cell(s): "
                f"{note or 'ACRO has no equivalent rule'}"
            )
            continue
        present = [c for c in checks if c in ran]
        if not present:
            out.append(
                f"ours {f.status.value} by {f.rule} on {len(f.cells)} cell(s): ACRO did "
                f"not run {'/'.join(checks)} here (it ran: {', '.join(ran)})"
                + (f" [{note}]" if note else "")
            )
            continue
        theirs = set().union(*(_acro_cells(record, c, data) for c in present))
        for c in present:
            our_cells_by_check.setdefault(c, set()).update(mine)
        explained |= {(c, cell) for c in present for cell in mine & theirs}
        if not mine <= theirs:
            out.append(
                f"ours {f.status.value} by {f.rule} on {len(mine - theirs)} cell(s) "
                f"ACRO's {'/'.join(present)} did not flag: {sorted(mine - theirs)[:5]}"
            )
    for check in _acro_flags(record):
        extra = {
            cell for cell in _acro_cells(record, check, data) if (check, cell) not in explained
        }
        if extra:
            out.append(
                f"ACRO flagged {check} on {len(extra)} cell(s) where no rule of ours "
                f"of that kind fired: {sorted(extra)[:5]}"
            )
    return out


def main() -> list[dict]:
    import pandas as pd  # noqa: F401  (ACRO's dependency; imported here to time it apart)
    from acro import ACRO

    logging.getLogger("acro").setLevel(logging.ERROR)
    policy = load_policy()
    repeat = 3
    rows = []
    with contextlib.redirect_stdout(io.StringIO()):
        session = ACRO(suppress=False)
    _quiet()
    for s in scenarios():
        frame = s.data.to_pandas()
        ours, ours_ms = _timed(lambda s=s: run_ours(s), repeat)
        with contextlib.redirect_stdout(io.StringIO()):
            record, acro_ms = _timed(lambda s=s, f=frame: run_acro(session, f, s), repeat)
        flags = _acro_flags(record)
        why = reasons(ours, record, s.data)
        rows.append(
            {
                "scenario": s.name,
                "ours": ours.status.value,
                "acro": record.status,
                "ours_ms": ours_ms,
                "acro_ms": acro_ms,
                "reasons": why,
                "acro_flags": sorted(flags),
            }
        )
    # secondary disclosure: ACRO's own suppressed table with margins, read by our checker
    small = scenarios()[1].data.to_pandas()
    with contextlib.redirect_stdout(io.StringIO()):
        suppressing = ACRO(suppress=True)
        _quiet()
        acro_table = suppressing.crosstab(small.region, small.grp, margins=True)
    acro_csv = acro_table.reset_index().to_csv(index=False)
    _, findings = check_table(pl.read_csv(io.StringIO(acro_csv), infer_schema_length=None), policy)
    secondary = [f for f in findings if f.rule == rules.SECONDARY_DISCLOSURE]
    forced_zero = sum(1 for f in secondary for c in f.cells if c.get("recovered_value") == 0)
    total_ours = sum(r["ours_ms"] for r in rows)
    total_acro = sum(r["acro_ms"] for r in rows)
    print(f"{'scenario':50s} {'ours':>7s} {'ACRO':>7s} {'ours ms':>8s} {'ACRO ms':>8s}")
    for r in rows:
        print(
            f"{r['scenario']:50s} {r['ours']:>7s} {r['acro']:>7s} {r['ours_ms']:8.1f} "
            f"{r['acro_ms']:8.1f}"
        )
        if r["ours"] != r["acro"] or r["reasons"]:
            for reason in r["reasons"] or ["(verdicts differ; no rule-level reason found)"]:
                print(f"    - {reason}")
    print(
        f"total: ours {total_ours:.0f} ms, ACRO {total_acro:.0f} ms, "
        f"ratio ACRO/ours = {total_acro / total_ours:.2f}"
    )
    print(
        f"ACRO suppress=True, margins=True table read by our checker: "
        f"{len(secondary)} secondary-disclosure finding(s)"
        + (
            f" ({sum(len(f.cells) for f in secondary)} cells pinned, {forced_zero} of them "
            "to 0: ACRO recomputes totals from the visible cells, so its totals read as true "
            "totals say every suppressed cell is 0)"
            if secondary
            else ""
        )
    )
    return rows


if __name__ == "__main__":
    main()

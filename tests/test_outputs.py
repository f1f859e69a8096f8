"""Researcher helpers in tre.outputs: correct numbers, safe suppression, the airlock's verdict."""

from __future__ import annotations

import io
import json

import duckdb
import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.optimize import LinearConstraint, milp

from airlock.checks import rules
from airlock.checks.findings import Status
from airlock.checks.tables import check_table
from airlock.evidence import load_evidence
from airlock.policy import load_policy
from tre import outputs

P = load_policy()


def people(counts: dict[tuple[str, str], int]) -> pl.DataFrame:
    """One row per person from counts per (sex, group)."""
    rows = [(s, g) for (s, g), n in counts.items() for _ in range(n)]
    return pl.DataFrame(rows, schema=["sex", "grp"], orient="row")


def cohort(n: int = 400, seed: int = 1) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    return pl.DataFrame(
        {
            "sex": rng.choice(["F", "M"], n),
            "grp": rng.choice(["I", "II", "III", "IV"], n, p=[0.5, 0.3, 0.17, 0.03]),
            "age": rng.integers(0, 6500, n).astype(float),
            "time": rng.exponential(900, n).round() + 1,
            "event": rng.integers(0, 2, n),
        }
    )


def reread(out: outputs.TableOutput) -> pl.DataFrame:
    return pl.read_csv(io.StringIO(out.csv_text()), infer_schema_length=None)


# ---------------------------------------------------------------- frequency


def test_frequency_counts_match_duckdb_and_include_zeros():
    data = people({("F", "a"): 30, ("F", "b"): 12, ("M", "a"): 25})  # (M, b) is a zero
    con = duckdb.connect()
    con.register("people", data)
    out = outputs.frequency_table(con.sql("select * from people"), rows=["sex", "grp"])
    got = {(r["sex"], r["grp"]): r["n"] for r in out.table.iter_rows(named=True)}
    expected = {
        (s, g): n
        for s, g, n in con.sql("select sex, grp, count(*) from people group by all").fetchall()
    }
    assert len(expected) == 3
    for key, n in expected.items():
        assert got[key] == n
    assert got[("M", "b")] == 0
    assert got[("Total", "Total")] == 67 and got[("F", "Total")] == 42
    assert out.status == Status.FAIL
    assert any(f.rule == rules.ZERO_CELL for f in out.findings)


def test_wide_table_has_true_margins():
    data = people({("F", "a"): 30, ("F", "b"): 12, ("M", "a"): 25, ("M", "b"): 40})
    out = outputs.frequency_table(data, rows="sex", columns="grp")
    assert out.table.columns == ["sex", "a", "b", "Total"]
    assert out.table.row(2) == ("Total", 55, 52, 107)
    assert out.status == Status.PASS and out.output_class == "frequency_table"


def test_suppression_hides_small_cells_and_protects_them_from_margins():
    data = people({("F", "a"): 30, ("F", "b"): 4, ("M", "a"): 25, ("M", "b"): 40})
    plain = outputs.frequency_table(data, rows="sex", columns="grp")
    assert plain.status == Status.FAIL
    out = outputs.frequency_table(data, rows="sex", columns="grp", suppress=True)
    table = reread(out)
    assert table.filter(pl.col("sex") == "F")["b"].item() == outputs.SUPPRESSED
    # the total of row F and of column b must not give the 4 back
    _, findings = check_table(table, P)
    assert not any(f.rule == rules.SECONDARY_DISCLOSURE for f in findings)
    assert out.status == Status.REVIEW  # mitigation applied: a checker confirms it
    assert any(f.rule == rules.MITIGATION_APPLIED for f in out.findings)


def test_rounding_makes_review_and_rounds_every_count():
    data = people({("F", "a"): 31, ("F", "b"): 12, ("M", "a"): 27, ("M", "b"): 44})
    out = outputs.frequency_table(data, rows="sex", columns="grp", round_to=5)
    values = [v for c in ["a", "b", "Total"] for v in out.table[c].to_list()]
    assert all(v % 5 == 0 for v in values)
    assert out.table.row(2) == ("Total", 60, 55, 115)  # rounded true totals (58, 56, 114)
    assert out.status == Status.REVIEW


def test_saved_files_get_the_same_verdict_from_the_airlock(tmp_path):
    data = people({("F", "a"): 30, ("F", "b"): 4, ("M", "a"): 25, ("M", "b"): 40})
    out = outputs.frequency_table(data, rows="sex", columns="grp", suppress=True)
    written = out.save(tmp_path / "sex_by_grp.csv")
    assert [p.name for p in written] == ["sex_by_grp.csv", "sex_by_grp.evidence.json"]
    evidence = load_evidence(tmp_path / "sex_by_grp.evidence.json")
    assert evidence.name == "sex_by_grp.csv" and evidence.suppression_applied
    _, findings = check_table(pl.read_csv(written[0], infer_schema_length=None), P, evidence)
    assert {f.rule for f in findings} == {f.rule for f in out.findings}
    assert not list(tmp_path.glob(".*tmp"))


def _milp_range(a_eq, b_eq, j):
    """Integer oracle: min and max of x_j over non-negative integer solutions of a x = b."""
    n = a_eq.shape[1]
    c = np.zeros(n)
    c[j] = 1
    cons = LinearConstraint(a_eq, b_eq, b_eq)
    lo = milp(c, constraints=cons, integrality=np.ones(n), bounds=(0, np.inf))
    hi = milp(-c, constraints=cons, integrality=np.ones(n), bounds=(0, 10_000))
    assert lo.status == 0 and hi.status == 0
    return round(lo.fun), round(-hi.fun)


def _oracle_recoverable(table: pl.DataFrame, row_dim: str) -> list[tuple[str, str]]:
    """Cells of a wide table with margins that an attacker can pin exactly (independent of the
    product's algebra: integer programming over the table's own row/column structure)."""
    cols = [c for c in table.columns if c not in (row_dim, "Total")]
    rows = [r for r in table[row_dim].to_list() if r != "Total"]
    grid = {
        (r, c): table.filter(pl.col(row_dim) == r)[c].item()
        for r in rows + ["Total"]
        for c in cols + ["Total"]
    }
    names = list(grid)
    hidden = [k for k in names if grid[k] == outputs.SUPPRESSED]
    if not hidden:
        return []
    index = {k: i for i, k in enumerate(hidden)}
    a_rows, b = [], []
    lines = [[(r, c) for c in cols] + [(r, "Total")] for r in rows + ["Total"]]
    lines += [[(r, c) for r in rows] + [("Total", c)] for c in cols + ["Total"]]
    for line in lines:
        coeffs = np.zeros(len(hidden))
        rhs = 0.0
        *parts, total = line
        for cell, sign in [(total, 1.0)] + [(p, -1.0) for p in parts]:
            if cell in index:
                coeffs[index[cell]] += sign
            else:
                rhs -= sign * float(grid[cell])
        if coeffs.any():
            a_rows.append(coeffs)
            b.append(rhs)
    a = np.array(a_rows)
    pinned = []
    for cell, j in index.items():
        lo, hi = _milp_range(a, np.array(b), j)
        if lo == hi:
            pinned.append(cell)
    return pinned


count = st.one_of(st.integers(0, 12), st.integers(10, 60), st.integers(100, 300))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(2, 3).flatmap(
        lambda r: st.integers(2, 4).flatmap(
            lambda c: st.lists(st.lists(count, min_size=c, max_size=c), min_size=r, max_size=r)
        )
    )
)
def test_suppressed_table_never_passes_while_recoverable(grid):
    counts = {(f"r{i}", f"c{j}"): n for i, row in enumerate(grid) for j, n in enumerate(row)}
    rows = [(s, g) for (s, g), n in counts.items() for _ in range(n)]
    if not rows:
        return
    data = pl.DataFrame(rows, schema=["sex", "grp"], orient="row")
    out = outputs.frequency_table(data, rows="sex", columns="grp", suppress=True)
    table = reread(out)
    # every visible cell passes the count rules ...
    for column in table.columns[1:]:
        for value in table[column].to_list():
            if value != outputs.SUPPRESSED:
                assert rules.count_cell(float(value), P) is None, (grid, table)
    # ... and no suppressed cell can be pinned from the visible cells and margins
    text = table.with_columns([pl.col(c).cast(pl.String) for c in table.columns[1:]])
    assert _oracle_recoverable(text, "sex") == [], (grid, table)
    assert out.status in (Status.PASS, Status.REVIEW)
    if out.extra["suppressed"]:
        assert out.status == Status.REVIEW


def test_level_named_like_a_margin_is_refused():
    data = pl.DataFrame({"sex": ["F", "Total"], "grp": ["a", "b"]})
    with pytest.raises(outputs.OutputError, match="margin"):
        outputs.frequency_table(data, rows="sex")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda d: outputs.frequency_table(d, rows="nope"), "no column 'nope'"),
        (lambda d: outputs.frequency_table([1, 2], rows="sex"), "polars DataFrame"),
        (lambda d: outputs.frequency_table(d, rows="sex", columns="sex"), "both"),
        (lambda d: outputs.frequency_table(d, rows="sex", round_to=0), "round_to"),
        (lambda d: outputs.magnitude_table(d, rows="sex", values="grp"), "not numeric"),
        (
            lambda d: outputs.magnitude_table(d, rows="sex", values="age", statistics="p200"),
            "unknown statistic",
        ),
        (lambda d: outputs.survival_table(d, "age", "sex"), "0/1"),
        (lambda d: outputs.histogram(d, "age", bins=0), "bins"),
        (lambda d: outputs.regression("age ~ nope", d), "cannot fit"),
    ],
)
def test_bad_input_gets_a_clear_error(call, message):
    with pytest.raises(outputs.OutputError, match=message):
        call(cohort(50))


# ---------------------------------------------------------------- magnitude


def test_magnitude_dominance_class_and_extremes():
    rng = np.random.default_rng(3)
    ages = list(rng.integers(100, 200, 30).astype(float))
    data = pl.DataFrame(
        {
            "grp": ["dominated"] * 30 + ["same"] * 20 + ["normal"] * 30,
            "dose": ages[:29] + [1_000_000.0] + [5.0] * 20 + ages,
        }
    )
    out = outputs.magnitude_table(data, rows="grp", values="dose", statistics=["mean", "max"])
    by_rule = {f.rule: f for f in out.findings if f.status != Status.PASS}
    dominated = {c["labels"]["grp"] for c in by_rule[rules.NK_DOMINANCE].cells}
    assert dominated == {"dominated"}
    assert {c["labels"]["grp"] for c in by_rule[rules.CLASS_DISCLOSURE].cells} == {"same"}
    # max of 'same' is shared by 20 people: not exposed; the others are one person's value
    exposed = {c["labels"]["grp"] for c in by_rule[rules.EXTREME_VALUE].cells}
    assert exposed == {"dominated", "normal"}
    assert out.status == Status.FAIL
    # evidence holds shares of the cell total, never a person's raw value
    for cell in out.evidence.cells:
        assert all(0 <= x <= 1 for x in cell.largest)
    suppressed = outputs.magnitude_table(
        data, rows="grp", values="dose", statistics=["mean", "max"], suppress=True
    )
    assert suppressed.status == Status.REVIEW
    hidden = suppressed.table.filter(pl.col("grp") == "dominated")
    assert hidden["mean_dose"].item() is None and hidden["max_dose"].item() is None
    assert suppressed.table.filter(pl.col("grp") == "normal")["mean_dose"].item() is not None


def test_magnitude_negative_values_are_review():
    data = pl.DataFrame({"grp": ["a"] * 40, "change": [float(i - 10) for i in range(40)]})
    out = outputs.magnitude_table(data, rows="grp", values="change", statistics="mean")
    assert out.status == Status.REVIEW
    assert any(f.rule == rules.NEGATIVE_VALUES for f in out.findings)
    assert all(cell.largest == [] for cell in out.evidence.cells)  # no raw values recorded


def test_magnitude_small_group_fails_and_values_are_correct():
    data = cohort(300)
    out = outputs.magnitude_table(data, rows="grp", values="age", statistics=["mean", "median"])
    expected = data.group_by("grp").agg(pl.col("age").mean()).sort("grp")
    assert out.table["mean_age"].to_list() == pytest.approx(expected["age"].to_list())
    small = data.group_by("grp").len().filter(pl.col("len") < 10)
    if small.height:
        assert out.status == Status.FAIL


# ---------------------------------------------------------------- models


def test_regression_dof_boundary():
    rng = np.random.default_rng(5)

    def fit(n):
        d = pl.DataFrame({"x": rng.normal(size=n), "z": rng.normal(size=n)})
        d = d.with_columns(y=pl.col("x") + pl.Series(rng.normal(size=n)))
        return outputs.regression("y ~ x + z", d)

    nine, ten = fit(12), fit(13)  # 3 parameters: dof 9 and 10
    assert nine.evidence.model.df_resid == 9 and nine.status == Status.FAIL
    assert any(f.rule == rules.RESIDUAL_DOF for f in nine.findings)
    assert ten.status == Status.PASS


def test_regression_from_fitted_model_checks_categorical_levels():
    import statsmodels.formula.api as smf

    rng = np.random.default_rng(6)
    n = 200
    d = pl.DataFrame({"x": rng.normal(size=n), "site": ["a"] * 195 + ["b"] * 5})
    d = d.with_columns(y=pl.col("x") * 2 + pl.Series(rng.normal(size=n)))
    fitted = smf.ols("y ~ x + C(site)", d.to_pandas()).fit()
    out = outputs.regression(fitted)
    assert out.evidence.model.categorical_cells["site"] == {"a": 195, "b": 5}
    assert any(f.rule == rules.CATEGORICAL_CELL for f in out.findings)
    assert out.table["coef"].to_list() == pytest.approx(list(fitted.params.values))


def test_a_numeric_column_used_as_levels_has_its_counts_recorded():
    """`C(stage)` of an integer stage: each stage is a level (a coefficient fitted to its
    children), so its counts are evidence like a text column's, and a small one fails."""
    import statsmodels.formula.api as smf

    rng = np.random.default_rng(9)
    n = 120
    stage = [1] * 60 + [2] * 57 + [4] * 3
    d = pl.DataFrame({"x": rng.normal(size=n), "stage": stage})
    d = d.with_columns(y=pl.col("x") + pl.Series(rng.normal(size=n)))
    out = outputs.regression(smf.ols("y ~ x + C(stage)", d.to_pandas()).fit())
    assert out.evidence.model.categorical_cells["stage"] == {"1": 60, "2": 57, "4": 3}
    assert any(f.rule == rules.CATEGORICAL_CELL for f in out.findings)
    assert not any(f.rule == rules.CATEGORICAL_UNVERIFIED for f in out.findings)


# ---------------------------------------------------------------- survival


def test_kaplan_meier_matches_lifelines():
    from lifelines import KaplanMeierFitter

    data = cohort(300, seed=7)
    out = outputs.survival_table(data, "time", "event")
    kmf = KaplanMeierFitter().fit(data["time"].to_numpy(), data["event"].to_numpy())
    table = kmf.event_table
    for r in out.table.iter_rows(named=True):
        assert r["at_risk"] == table.loc[r["time"], "at_risk"]
        assert r["events"] == table.loc[r["time"], "observed"]
        assert r["survival"] == pytest.approx(kmf.survival_function_at_times(r["time"]).item())
    assert out.status == Status.FAIL  # single events at distinct times


def test_life_table_intervals_and_groups():
    rng = np.random.default_rng(8)
    n = 2000
    data = pl.DataFrame(
        {
            "time": rng.uniform(0, 1000, n),
            "event": rng.integers(0, 2, n),
            "sex": rng.choice(["F", "M"], n),
        }
    )
    out = outputs.survival_table(data, "time", "event", interval=250, group="sex")
    assert out.table["time"].unique().sort().to_list() == [0, 250, 500, 750]
    first = out.table.filter(pl.col("sex") == "F").row(0, named=True)
    assert first["at_risk"] == (data["sex"] == "F").sum()
    assert out.status == Status.PASS


# ---------------------------------------------------------------- histogram


def test_histogram_counts_the_maximum_and_matches_numpy():
    values = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0]
    edges, counts = outputs.histogram_bins(values, bins=5, value_range=(0, 10))
    np_counts, np_edges = np.histogram(values, bins=5, range=(0, 10))
    assert counts == list(np_counts) and edges == pytest.approx(list(np_edges))
    assert sum(counts) == len(values)  # the maximum (10.0) is in the last bin
    edges, counts = outputs.histogram_bins(values, bins=4)
    assert sum(counts) == len(values) and edges[-1] >= 10.0 and edges[0] <= 0.0


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=200), st.integers(1, 30)
)
def test_histogram_never_loses_a_value(values, bins):
    edges, counts = outputs.histogram_bins(values, bins)
    assert sum(counts) == len(values)
    assert edges[0] <= min(values) and edges[-1] >= max(values)


def test_histogram_png_and_table(tmp_path):
    data = cohort(500)
    out = outputs.histogram(data, "age", bins=8)
    assert out.figure_png.startswith(b"\x89PNG")
    assert out.table["n"].sum() == 500
    written = out.save(tmp_path / "age")
    assert {p.suffix for p in written} == {".csv", ".json", ".png"}
    evidence = json.loads((tmp_path / "age.evidence.json").read_text())
    assert evidence["output_class"] == "histogram"
    small = outputs.histogram(data.head(40), "age", bins=8)
    assert small.status == Status.FAIL  # bins below 10
    hidden = outputs.histogram(data.head(40), "age", bins=8, suppress=True)
    assert hidden.status == Status.REVIEW


def test_survival_truncate_drops_the_small_tail():
    rng = np.random.default_rng(9)
    n = 600
    data = pl.DataFrame({"time": rng.exponential(150, n), "event": rng.integers(0, 2, n)})
    full = outputs.survival_table(data, "time", "event", interval=100)
    assert full.table["at_risk"].min() < 10
    assert any(f.rule == rules.SURVIVAL_AT_RISK for f in full.findings)
    cut = outputs.survival_table(data, "time", "event", interval=100, truncate=True)
    assert cut.table["at_risk"].min() >= 10
    assert not any(f.rule == rules.SURVIVAL_AT_RISK for f in cut.findings)
    assert any("truncated" in note for note in cut.evidence.notes)


def _oracle_long(table: pl.DataFrame, dims: list[str]) -> list[tuple]:
    """Integer-programming oracle for a long table with 'Total' levels in every dimension."""
    keys = [tuple(r[d] for d in dims) for r in table.iter_rows(named=True)]
    shown = dict(zip(keys, table["n"].to_list(), strict=True))
    hidden = [k for k, v in shown.items() if v == outputs.SUPPRESSED]
    if not hidden:
        return []
    index = {k: i for i, k in enumerate(hidden)}
    a_rows, b = [], []
    for key in keys:
        for d in range(len(dims)):
            if key[d] != outputs.TOTAL:
                continue
            parts = [
                k
                for k in keys
                if k[d] != outputs.TOTAL and all(k[o] == key[o] for o in range(len(dims)) if o != d)
            ]
            coeffs = np.zeros(len(hidden))
            rhs = 0.0
            for cell, sign in [(key, 1.0)] + [(p, -1.0) for p in parts]:
                if cell in index:
                    coeffs[index[cell]] += sign
                else:
                    rhs -= sign * float(shown[cell])
            if coeffs.any():
                a_rows.append(coeffs)
                b.append(rhs)
    a = np.array(a_rows)
    return [cell for cell, j in index.items() if len(set(_milp_range(a, np.array(b), j))) == 1]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(count, min_size=8, max_size=8))
def test_three_way_suppressed_table_is_not_recoverable(values):
    levels = [(a, b, c) for a in ("a1", "a2") for b in ("b1", "b2") for c in ("c1", "c2")]
    rows = [lv for lv, n in zip(levels, values, strict=True) for _ in range(n)]
    if not rows:
        return
    data = pl.DataFrame(rows, schema=["x", "y", "z"], orient="row")
    out = outputs.frequency_table(data, rows=["x", "y", "z"], suppress=True)
    table = reread(out).with_columns(pl.col("n").cast(pl.String))
    table = table.with_columns([pl.col(c).cast(pl.String) for c in ("x", "y", "z")])
    for value in table["n"].to_list():
        if value != outputs.SUPPRESSED:
            assert rules.count_cell(float(value), P) is None
    assert _oracle_long(table, ["x", "y", "z"]) == [], (values, table)


def test_sandbox_policy_comes_from_the_environment(tmp_path, monkeypatch):
    data = people({("F", "a"): 30, ("F", "b"): 7, ("M", "a"): 25, ("M", "b"): 40})
    assert outputs.frequency_table(data, rows="sex", columns="grp").status == Status.FAIL
    monkeypatch.setenv("TRE_DISCLOSURE_OVERRIDES", '{"min_cell_count": 5}')
    relaxed = outputs.frequency_table(data, rows="sex", columns="grp")
    assert relaxed.status == Status.PASS
    assert relaxed.evidence.policy_version == outputs.default_policy().label != P.label
    monkeypatch.setenv("TRE_DISCLOSURE_OVERRIDES", "[1]")
    with pytest.raises(outputs.OutputError, match="JSON object"):
        outputs.frequency_table(data, rows="sex", columns="grp")
    monkeypatch.delenv("TRE_DISCLOSURE_OVERRIDES")
    strict = tmp_path / "disclosure.yaml"
    import yaml

    body = yaml.safe_load(open(outputs.load_policy.__defaults__[0]).read())
    body["min_cell_count"] = 50
    strict.write_text(yaml.safe_dump(body))
    monkeypatch.setenv("TRE_DISCLOSURE_POLICY", str(strict))
    assert outputs.frequency_table(data, rows="sex", columns="grp").status == Status.FAIL
    assert outputs.default_policy().min_cell_count == 50

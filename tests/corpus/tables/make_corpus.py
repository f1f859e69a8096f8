"""Regenerate the table corpus files (CSV + evidence). The expected verdicts live, by hand, in
``manifest.yaml``; this script only writes the inputs. Run: ``uv run python
tests/corpus/tables/make_corpus.py`` (the ACRO bundle needs the dev group's ``acro``)."""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent


def csv(name: str, text: str) -> None:
    (HERE / name).write_text(text.strip() + "\n", encoding="utf-8")


def evidence(name: str, **fields: object) -> None:
    body = {"schema": "tre.evidence/1", "name": name, "producer": "corpus", **fields}
    (HERE / f"{Path(name).stem}.evidence.json").write_text(json.dumps(body, indent=2) + "\n")


def mag_cells(column: str, rows: list[dict], statistic: str = "mean") -> list[dict]:
    return [{"column": column, "row": i, "statistic": statistic, **r} for i, r in enumerate(rows)]


SAFE = {"n": 40, "largest": [30.0, 25.0], "total": 400.0, "n_distinct": 30, "negative": False}


def main() -> None:
    # ---------------------------------------------------------------- frequency
    csv(
        "freq_wide_safe.csv",
        """
sex,ALL,AML,Total
F,120,35,155
M,140,41,181
Total,260,76,336
""",
    )
    csv(
        "freq_cell_9.csv",
        """
sex,ALL,AML
F,120,9
M,140,41
""",
    )
    csv(
        "freq_cell_10.csv",
        """
sex,ALL,AML
F,120,10
M,140,41
""",
    )
    csv(
        "freq_zero.csv",
        """
sex,ALL,AML
F,120,0
M,140,41
""",
    )
    csv(
        "freq_long_years.csv",
        """
diagnosis_year,sex,n
2010,F,23
2010,M,31
2011,F,18
2011,M,27
2012,F,22
2012,M,35
""",
    )
    csv(
        "freq_long_small_labels.csv",
        """
site_id,stage,patients
1,1,45
1,2,38
2,1,51
2,2,28
""",
    )
    csv(
        "freq_percent_column.csv",
        """
iccc3_group,n,pct
I,150,54.2
II,60,21.7
III,40,14.4
IV,27,9.7
""",
    )
    csv(
        "freq_secondary_recoverable.csv",
        """
sex,ALL,AML,CML,Total
F,120,35,<10,160
M,140,41,22,203
Total,260,76,27,363
""",
    )
    csv(
        "freq_secondary_protected.csv",
        """
region,ALL,AML,CML,Total
North,120,35,[c],[c]
South,140,[c],[c],203
East,88,[c],[c],130
Total,348,110,[c],[c]
""",
    )
    csv(
        "freq_margins_before_suppression.csv",
        """
age_group,F,M,Total
0-4,110,95,205
5-9,*,60,66
10-14,70,81,151
Total,186,236,422
""",
    )
    csv(
        "freq_markers.csv",
        """
group,a,b,c,d
x,100,<10,~,
y,120,suppressed,NA,[c]
z,130,150,160,170
""",
    )
    csv(
        "freq_marker_bounds.csv",
        """
sex,ALL,AML,CML,Total
F,120,<10,<10,138
M,140,41,22,203
""",
    )
    csv(
        "freq_margin_inconsistent.csv",
        """
sex,ALL,AML,Total
F,120,35,150
M,140,41,181
Total,260,76,331
""",
    )
    csv(
        "freq_rounded.csv",
        """
sex,ALL,AML,CML
F,120,35,10
M,140,40,25
""",
    )
    csv(
        "freq_rounded_small.csv",
        """
sex,ALL,AML,CML
F,120,35,5
M,140,40,25
""",
    )
    csv(
        "freq_n_pct_text.csv",
        """
characteristic,ALL,AML
Female,45 (40.2%),7 (18.4%)
Male,67 (59.8%),31 (81.6%)
""",
    )
    csv(
        "freq_percent_reveals.csv",
        """
stage,n,percent
I,120,48.0
II,95,38.0
III,<10,3.2
IV,27,10.8
""",
    )
    csv(
        "freq_long_margins.csv",
        """
sex,group,n
F,I,40
F,II,*
F,Total,47
M,I,45
M,II,30
M,Total,75
Total,I,85
Total,II,*
Total,Total,122
""",
    )
    csv(
        "freq_zero_by_margin.csv",
        """
sex,ALL,AML,CML,Total
F,120,35,*,155
M,140,41,*,181
Total,260,76,*,336
""",
    )
    csv(
        "freq_histogram_small_bin.csv",
        """
bin_lower,bin_upper,n
0,1000,74
1000,2000,85
2000,3000,3
""",
    )
    # ---------------------------------------------------------------- magnitude
    csv(
        "mag_no_evidence.csv",
        """
sex,mean_age_days
F,2950.4
M,3120.8
""",
    )
    rows = "sex,mean_dose_mg\nF,12.5\nM,14.25\n"
    for name, cell_f in {
        "mag_safe.csv": SAFE,
        "mag_nk_exact_k.csv": {**SAFE, "largest": [50.0, 40.0], "total": 100.0},
        "mag_nk_below_k.csv": {**SAFE, "largest": [50.0, 39.0], "total": 100.0},
        "mag_class_disclosure.csv": {**SAFE, "n_distinct": 1},
        "mag_negative.csv": {**SAFE, "negative": True},
        "mag_contributors_9.csv": {**SAFE, "n": 9},
        "mag_contributors_10.csv": {**SAFE, "n": 10},
        "mag_p_ratio.csv": {**SAFE, "largest": [90.0, 5.0], "total": 99.0},
        "mag_p_ratio_safe.csv": {**SAFE, "largest": [90.0, 5.0], "total": 104.0},
    }.items():
        csv(name, rows)
        evidence(
            name,
            output_class="magnitude_table",
            cells=mag_cells("mean_dose_mg", [{**cell_f, "value": 12.5}, {**SAFE, "value": 14.25}]),
        )
    csv("mag_evidence_mismatch.csv", rows)
    evidence(
        "mag_evidence_mismatch.csv",
        output_class="magnitude_table",
        cells=mag_cells("mean_dose_mg", [{**SAFE, "value": 11.0}, {**SAFE, "value": 14.25}]),
    )
    csv(
        "mag_max_no_evidence.csv",
        """
sex,max_age_days,n
F,6204,155
M,6190,181
""",
    )
    csv(
        "mag_max_shared.csv",
        """
sex,max_age_days,n
F,6204,155
M,6190,181
""",
    )
    evidence(
        "mag_max_shared.csv",
        output_class="magnitude_table",
        cells=mag_cells(
            "max_age_days",
            [
                {**SAFE, "n": 155, "value": 6204, "n_at_value": 12},
                {**SAFE, "n": 181, "value": 6190, "n_at_value": 10},
            ],
            "max",
        ),
    )
    csv(
        "mag_max_single.csv",
        """
sex,max_age_days,n
F,6204,155
M,6190,181
""",
    )
    evidence(
        "mag_max_single.csv",
        output_class="magnitude_table",
        cells=mag_cells(
            "max_age_days",
            [
                {**SAFE, "n": 155, "value": 6204, "n_at_value": 12},
                {**SAFE, "n": 181, "value": 6190, "n_at_value": 9},
            ],
            "max",
        ),
    )
    csv(
        "mag_n_column_small.csv",
        """
sex,mean_age_days,n
F,2950.4,8
M,3120.8,181
""",
    )
    csv(
        "mag_pandas_describe.csv",
        """
,age_days,dose_mg
count,300.0,300.0
mean,2012.4,98.7
std,498.1,70.2
min,512.0,3.1
25%,1688.2,47.5
50%,2004.9,83.0
75%,2350.6,131.9
max,3460.0,402.8
""",
    )
    # ---------------------------------------------------------------- models
    coefs = """
term,coef,std_err,t,p_value
Intercept,1.20,0.30,4.0,0.001
age,0.05,0.01,5.0,0.0001
sex[T.M],-0.30,0.12,-2.5,0.02
"""
    for name, model in {
        "model_dof_9.csv": {"nobs": 12, "df_resid": 9, "n_params": 3},
        "model_dof_10.csv": {"nobs": 40, "df_resid": 10, "n_params": 3},
        "model_params_vs_n.csv": {"nobs": 8000, "df_resid": 7997, "n_params": 3000},
        "model_categorical_small.csv": {
            "nobs": 200,
            "df_resid": 197,
            "n_params": 3,
            "categorical_cells": {"sex": {"F": 196, "M": 4}},
        },
        "model_safe.csv": {
            "nobs": 200,
            "df_resid": 197,
            "n_params": 3,
            "categorical_cells": {"sex": {"F": 96, "M": 104}},
        },
    }.items():
        csv(name, coefs)
        evidence(name, output_class="model_summary", model=model)
    csv("model_no_evidence.csv", coefs)
    csv(
        "model_statsmodels_info.csv",
        """
Model:,OLS,Adj. R-squared:,0.412
Dependent Variable:,y,AIC:,120.5
No. Observations:,15,BIC:,123.1
Df Model:,6,Log-Likelihood:,-55.2
Df Residuals:,8,F-statistic:,3.1
""",
    )
    csv(
        "corr_perfect.csv",
        """
variable,age,dose,weight
age,1.0,0.42,1.0
dose,0.42,1.0,0.31
weight,1.0,0.31,1.0
""",
    )
    evidence("corr_perfect.csv", output_class="correlation_matrix", correlation_n=300)
    csv(
        "corr_small_n.csv",
        """
variable,age,dose
age,1.0,0.42
dose,0.42,1.0
""",
    )
    evidence("corr_small_n.csv", output_class="correlation_matrix", correlation_n=9)
    csv(
        "corr_safe.csv",
        """
variable,age,dose
age,1.0,0.42
dose,0.42,1.0
""",
    )
    evidence("corr_safe.csv", output_class="correlation_matrix", correlation_n=10)
    # ---------------------------------------------------------------- survival
    csv(
        "surv_step_9.csv",
        """
time,at_risk,events,censored,survival
0,200,20,10,0.90
365,170,15,10,0.82
730,145,0,9,0.82
1095,136,12,10,0.75
""",
    )
    csv(
        "surv_step_10.csv",
        """
time,at_risk,events,censored,survival
0,200,20,10,0.90
365,170,15,10,0.82
730,145,0,10,0.82
1095,135,12,10,0.75
""",
    )
    csv(
        "surv_km_events.csv",
        """
timeline,n_risk,observed,censored,km_estimate
0,60,0,0,1.0
31,60,1,0,0.983
45,59,2,1,0.950
""",
    )
    csv(
        "surv_estimate_only.csv",
        """
time,survival
0,1.0
365,0.91
730,0.84
""",
    )
    csv(
        "surv_grouped.csv",
        """
sex,time,at_risk,events,censored,survival
F,0,100,12,10,0.88
F,365,78,10,10,0.77
M,0,120,15,11,0.875
M,365,94,10,4,0.78
""",
    )
    csv(
        "surv_tail_small.csv",
        """
time,at_risk,events,censored,survival
0,60,20,10,0.67
365,30,12,0,0.40
730,18,10,0,0.19
1095,8,0,0,0.19
""",
    )
    csv(
        "surv_lifelines_event_table.csv",
        """
event_at,removed,observed,censored,entrance,at_risk
0.0,0,0,0,300,300
1.0,3,2,1,0,300
2.0,12,10,2,0,297
""",
    )
    # ---------------------------------------------------------------- other
    csv(
        "unknown_text.csv",
        """
note,author
see appendix,ab
draft,cd
""",
    )
    acro_bundle()


def acro_bundle() -> None:
    """A real ACRO 1.0 results.json: a crosstab of counts and a crosstab of means."""
    import os
    import shutil
    import tempfile

    import pandas as pd
    from acro import ACRO

    rows = []
    for sex, group, n, base in [
        ("F", "a", 40, 3000),
        ("F", "b", 25, 4000),
        ("F", "c", 4, 500),
        ("M", "a", 50, 3100),
        ("M", "b", 30, 4200),
        ("M", "c", 12, 700),
    ]:
        rows += [{"sex": sex, "grp": group, "age": float(base + 37 * i)} for i in range(n)]
    data = pd.DataFrame(rows)
    out = HERE / "acro_bundle"
    shutil.rmtree(out, ignore_errors=True)
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            session = ACRO(suppress=False)
            session.crosstab(data.sex, data.grp)
            session.crosstab(data.sex, data.grp, values=data.age, aggfunc="mean")
            session.finalise("bundle", "json")
            out.mkdir()
            for name in ("results.json", "config.json", "output_0_0.csv", "output_1_0.csv"):
                shutil.copy(Path(tmp) / "bundle" / name, out / name)
        finally:
            os.chdir(cwd)
    acro_regression()


def acro_regression() -> None:
    """ACRO's OLS on 11 rows and 2 predictors (no constant): residual dof 9."""
    import os
    import shutil
    import tempfile

    import pandas as pd
    from acro import ACRO

    data = pd.DataFrame(
        {
            "y": [float(i % 4) + 0.1 * i for i in range(11)],
            "x": [float(i) for i in range(11)],
            "z": [float((i * 7) % 5) for i in range(11)],
        }
    )
    out = HERE / "acro_ols"
    shutil.rmtree(out, ignore_errors=True)
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            session = ACRO(suppress=False)
            session.ols(data.y, data[["x", "z"]])
            session.finalise("bundle", "json")
            out.mkdir()
            for name in ("results.json", "config.json", "output_0_1.csv"):
                shutil.copy(Path(tmp) / "bundle" / name, out / name)
        finally:
            os.chdir(cwd)


if __name__ == "__main__":
    main()

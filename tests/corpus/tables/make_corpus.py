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
    statistical_red_team()
    acro_bundle()


def statistical_red_team() -> None:
    """Well-formed tables whose every printed count passes, but which give a small count away
    by differencing inside the table (running totals, nested categories, a percentage or a rate
    beside its denominator, a survival curve's steps), each with a safe look-alike."""
    tables = {
        # 12 -> 15: 3 children aged 1 (running totals)
        "freq_cumulative_counts.csv": "age_years,cum_cases\n0,12\n1,15\n2,27\n3,30\n4,44",
        "freq_cumulative_counts_safe.csv": "age_years,n,cumulative_n\n0,12\n1,15\n2,27\n3,30",
        # 7.6 % -> 9.5 % of 158: 3 children aged 1
        "freq_cumulative_pct.csv": "age_years,n_total,cumulative_pct\n"
        "0,158,7.6\n1,158,9.5\n2,158,17.1\n3,158,19.0\n4,158,100.0",
        "freq_cumulative_pct_safe.csv": "age_years,n,pct,cumulative_pct\n"
        "0,12,7.6,7.6\n1,15,9.5,17.1\n2,27,17.1,34.2\n3,30,19.0,53.2\n4,74,46.8,100.0",
        # 0-5 minus 0-4: 3 children aged 5; <6 minus <5 likewise
        "freq_nested_bands.csv": "age_band,n\n0-4,40\n0-5,43\n5-9,52\n10-14,66",
        "freq_nested_open_bands.csv": "age_group,cases\n<5,40\n<6,43\n15+,21\n14+,33",
        "freq_nested_bands_safe.csv": "age_band,n\n0-4,40\n5-9,52\n10-14,66\n0-14,158",
        # 158 - 155: 3 children with Wilms tumour
        "freq_excluding.csv": "group,n\nAll cancers,158\nAll cancers excluding Wilms,155\n"
        "Leukaemia,120",
        "freq_excluding_safe.csv": "group,n\nAll cancers,158\nAll cancers excluding Wilms,120\n"
        "Wilms,38",
        # 2.0 % of 150 patients: 3 died
        "freq_pct_of_denominator.csv": "stage,patients,pct_died\nI,150,2.0\nII,120,15.0\n"
        "III,98,30.6",
        # 100 % of 25: every child in stage IV died (a zero in the complement)
        "freq_pct_whole_group.csv": "stage,patients,pct_died\nI,150,12.0\nII,120,15.0\nIV,25,100.0",
        "freq_pct_shares_within_group_safe.csv": "sex,stage,n,pct\nF,I,40,33.3\nF,II,50,41.7\n"
        "F,III,30,25.0\nM,I,60,40.0\nM,II,45,30.0\nM,III,45,30.0",
        "freq_pct_numerator_shown_safe.csv": "stage,deaths,patients,pct_died\nI,12,150,8.0\n"
        "II,18,120,15.0\nIII,30,98,30.6",
        "freq_col_pct_wide_safe.csv": "sex,ALL_n,ALL_pct,AML_n,AML_pct\nF,120,46.2,35,46.1\n"
        "M,140,53.8,41,53.9",
        # 2.5 per 100,000 of 120,000: 3 cases
        "freq_rate_population.csv": "region,population,rate_per_100000\nNorth,120000,2.5\n"
        "South,95000,14.7",
        "freq_rate_population_safe.csv": "region,cases,population,rate_per_100000\n"
        "North,30,120000,25.0\nSouth,14,95000,14.7",
        # 1.97 per 1000 person-years of 1523.4: 3 events
        "mag_rate_person_years.csv": "group,person_years,events_per_1000_py\n"
        "Wilms,1523.4,1.97\nNeuroblastoma,2210.7,9.95",
        # a negative 'count': a difference of counts
        "freq_negative_count.csv": "group,cases_2019,change_in_cases\nWilms,35,-3\nALL,120,12",
        # the oldest child's age, under a name without min/max
        "mag_oldest.csv": "iccc_group,n,oldest_age_days\nLeukaemia,120,6201\nWilms,35,4012",
        # no events column, but S drops by 1/180 with 180 at risk: single deaths
        "surv_implied_events.csv": "time,at_risk,survival\n0,200,1.0\n1,180,0.995\n"
        "2,160,0.98875\n3,140,0.98257\n4,120,0.97555",
        "surv_cumulative_incidence.csv": "years,n_at_risk,cumulative_incidence\n0,200,0.0\n"
        "1,180,0.005\n2,160,0.0112\n3,140,0.0174",
        "surv_implied_events_safe.csv": "time,at_risk,survival\n0,200,1.0\n365,170,0.90\n"
        "730,140,0.82\n1095,120,0.75",
    }
    for name, text in tables.items():
        csv(name, text)


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

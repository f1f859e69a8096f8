"""check_table on the shapes tables arrive in: labels vs counts, markers, locations, errors."""

from __future__ import annotations

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from airlock.checks import rules
from airlock.checks.findings import Status, worst
from airlock.checks.layout import Role, read_layout
from airlock.checks.tables import check_table
from airlock.policy import load_policy

P = load_policy()


def verdict(df: pl.DataFrame, **kw) -> tuple[str, Status, set[str]]:
    output_class, findings = check_table(df, P, **kw)
    return (
        output_class,
        worst([f.status for f in findings]),
        {f.rule for f in findings if f.status != Status.PASS},
    )


@pytest.mark.parametrize(
    ("frame", "roles"),
    [
        ({"diagnosis_year": [2010, 2011, 2012], "n": [20, 30, 40]}, ["label", "count"]),
        ({"year": [2010, 2011], "cases": [20, 30]}, ["label", "count"]),
        ({"site_id": [1, 2, 3], "count": [20, 30, 40]}, ["label", "count"]),
        ({"group": ["a", "b"], "n": [20, 30], "pct": [40.0, 60.0]}, ["label", "count", "percent"]),
        ({"group": ["a", "b"], "2019": [20, 30], "2020": [11, 12]}, ["label", "count", "count"]),
        (
            {"group": ["a", "b"], "mean_age": [4.5, 6.1], "n": [20, 30]},
            ["label", "statistic", "count"],
        ),
        ({"sex": ["F", "M"], "value": ["<10", "25"]}, ["label", "count"]),
        ({"sex": ["F", "M"], "value": ["12 (40%)", "18 (60%)"]}, ["label", "count"]),
    ],
)
def test_column_roles(frame, roles):
    layout = read_layout(pl.DataFrame(frame), P)
    assert [layout.roles[c].value for c in frame] == roles


def test_year_labels_are_not_checked_as_counts():
    # if years were counts they would pass anyway: use small codes that would fail as counts
    assert verdict(pl.DataFrame({"stage": [1, 2, 3], "n": [20, 30, 40]}))[1] == Status.PASS
    assert verdict(pl.DataFrame({"stage": [1, 2, 3], "n": [20, 3, 40]}))[1] == Status.FAIL


def test_location_is_merged_into_every_finding():
    _, findings = check_table(
        pl.DataFrame({"g": ["a", "b"], "n": [3, 0]}), P, location={"cell": 3, "output": 0}
    )
    assert findings
    for f in findings:
        assert f.cells and all(c["cell"] == 3 and c["output"] == 0 for c in f.cells)
        assert f.policy_version == P.label


def test_cells_name_row_column_and_labels():
    _, findings = check_table(pl.DataFrame({"sex": ["F", "M"], "n": [30, 7]}), P)
    (f,) = [f for f in findings if f.rule == rules.MIN_CELL_COUNT]
    assert f.cells == [{"row": 1, "column": "n", "labels": {"sex": "M"}, "value": 7}]


def test_empty_and_unrecognised_tables_are_review_not_pass():
    assert verdict(pl.DataFrame())[:2] == ("unknown_table", Status.REVIEW)
    assert verdict(pl.DataFrame({"n": []}, schema={"n": pl.Int64}))[1] == Status.REVIEW
    assert verdict(pl.DataFrame({"a": ["x"], "b": ["y"]}))[:2] == ("unknown_table", Status.REVIEW)


def test_not_a_dataframe_is_an_error():
    with pytest.raises(TypeError, match="polars DataFrame"):
        check_table({"n": [1]}, P)  # type: ignore[arg-type]


def test_every_class_is_recognised():
    assert verdict(pl.DataFrame({"g": ["a"], "n": [12]}))[0] == "frequency_table"
    assert verdict(pl.DataFrame({"g": ["a"], "sum_dose": [12.5]}))[0] == "magnitude_table"
    assert (
        verdict(pl.DataFrame({"term": ["const", "x"], "coef": [1.0, 2.0], "se": [0.1, 0.2]}))[0]
        == "model_summary"
    )
    assert verdict(pl.DataFrame({"v": ["a", "b"], "a": [1.0, 0.2], "b": [0.2, 1.0]}))[0] == (
        "correlation_matrix"
    )
    assert (
        verdict(pl.DataFrame({"time": [0, 1], "at_risk": [50, 40], "events": [10, 10]}))[0]
        == "survival_table"
    )


def test_all_is_a_category_not_a_margin_unless_the_numbers_add_up():
    leukaemia = pl.DataFrame({"sex": ["F", "M"], "ALL": [120, 140], "AML": [35, 41]})
    assert verdict(leukaemia)[1] == Status.PASS
    with_all_margin = pl.DataFrame(
        {"sex": ["F", "M", "All"], "a": [12, "*", 40], "b": [35, 41, 76]}, strict=False
    )
    assert rules.SECONDARY_DISCLOSURE in verdict(with_all_margin)[2]


def test_total_column_reveals_suppressed_cell_in_long_and_wide():
    wide = pl.DataFrame(
        {"sex": ["F", "M"], "a": ["~", "30"], "b": ["40", "50"], "Total": ["45", "80"]}
    )
    assert rules.SECONDARY_DISCLOSURE in verdict(wide)[2]
    wide_safe = pl.DataFrame({"sex": ["F", "M"], "a": ["~", "30"], "b": ["40", "50"]})
    assert verdict(wide_safe)[1] == Status.REVIEW


def test_large_tables_are_refused_clearly():
    big = pl.DataFrame({f"c{i}": [1] * 100_000 for i in range(21)})
    output_class, findings = check_table(big, P)
    assert output_class == "unknown_table" and findings[0].status == Status.FAIL


cell_text = st.one_of(
    st.integers(-5, 300).map(str),
    st.sampled_from(
        ["*", "<10", "", "NA", "Total", "All", "x", "12 (4%)", "1,234", "3.5", "-", "[c]"]
    ),
    st.text(max_size=4),
)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 5).flatmap(
        lambda w: st.lists(st.lists(cell_text, min_size=w, max_size=w), min_size=0, max_size=8)
    ),
    st.lists(
        st.sampled_from(
            [
                "n",
                "count",
                "group",
                "Total",
                "mean_x",
                "max_y",
                "pct",
                "year",
                "time",
                "at_risk",
                "coef",
                "se",
                "2019",
                "ALL",
                "",
            ]
        ),
        min_size=5,
        max_size=5,
        unique=True,
    ),
)
def test_check_table_never_crashes_and_never_passes_a_small_visible_count(rows, names):
    width = len(rows[0]) if rows else 1
    columns = names[:width]
    frame = (
        pl.DataFrame(rows, schema=columns, orient="row")
        if rows
        else pl.DataFrame(schema={c: pl.String for c in columns})
    )
    output_class, findings = check_table(frame, P)
    status = worst([f.status for f in findings])
    assert output_class in {
        "frequency_table",
        "magnitude_table",
        "model_summary",
        "correlation_matrix",
        "survival_table",
        "unknown_table",
    }
    if output_class == "frequency_table":
        layout = read_layout(frame, P)
        small = [
            v
            for c in layout.columns(Role.COUNT)
            for v in layout.parsed[c].values
            if v is not None and 0 < v < P.min_cell_count
        ]
        if small:
            assert status == Status.FAIL


def test_counts_beside_statistics_are_checked_for_margins_too():
    table = pl.DataFrame(
        {
            "group": ["a", "b", "c", "Total"],
            "n": ["40", "*", "35", "82"],
            "mean_age": ["5.1", "*", "6.0", "5.5"],
        }
    )
    _, findings = check_table(table, P)
    hit = [f for f in findings if f.rule == rules.SECONDARY_DISCLOSURE]
    assert hit and hit[0].cells[0]["recovered_value"] == 7


def test_a_column_that_adds_up_is_a_margin_whatever_its_name():
    table = pl.DataFrame(
        {
            "sex": ["F", "M", "X"],
            "ALL": ["120", "140", "30"],
            "AML": ["35", "<10", "20"],
            "CML": ["11", "22", "12"],
            "N": ["166", "169", "62"],
        }
    )
    _, findings = check_table(table, P)
    hit = [f for f in findings if f.rule == rules.SECONDARY_DISCLOSURE]
    assert hit and hit[0].cells[0]["recovered_value"] == 7
    # a column that merely holds counts is not taken for a margin
    other = table.with_columns(pl.Series("N", ["160", "169", "62"]))
    _, findings = check_table(other, P)
    assert not any(f.rule == rules.SECONDARY_DISCLOSURE for f in findings)


@pytest.mark.parametrize(
    "column",
    [
        pl.Series("d", [None, None], dtype=pl.Date),
        pl.Series("l", [[1, 2], [3]]),
        pl.Series("s", [{"a": 1}, {"a": 2}]),
        pl.Series("b", [True, False]),
        pl.Series("c", ["a", "b"], dtype=pl.Categorical),
    ],
)
def test_any_column_type_is_read_without_error(column):
    frame = pl.DataFrame([column, pl.Series("n", [12, 3])])
    output_class, findings = check_table(frame, P)
    assert worst([f.status for f in findings]) in (Status.FAIL, Status.REVIEW)

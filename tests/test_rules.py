"""Every disclosure rule at its boundary, and secondary disclosure through margins."""

from __future__ import annotations

import pytest

from airlock.checks import rules
from airlock.checks.findings import Status
from airlock.checks.rules import MarginEquation, recoverable_cells
from airlock.policy import PolicyError, load_policy, policy_for_project

P = load_policy()


def test_min_cell_count_boundary():
    assert rules.min_cell_count(9, P).status == Status.FAIL
    assert rules.min_cell_count(10, P) is None
    assert rules.min_cell_count(1, P) is not None
    assert rules.min_cell_count(0, P) is None  # zero is its own rule


def test_zero_rule_follows_policy():
    assert rules.zero_cell(0, P).rule == rules.ZERO_CELL
    assert rules.zero_cell(0, policy_for_project({"zeros_disclosive": False})) is None
    assert rules.count_cell(0, P).rule == rules.ZERO_CELL
    assert rules.count_cell(3, P).rule == rules.MIN_CELL_COUNT


def test_threshold_comes_from_policy():
    p5 = policy_for_project({"min_cell_count": 5})
    assert rules.min_cell_count(5, p5) is None
    assert rules.min_cell_count(4, p5) is not None


def test_nk_share_exactly_k_fails():
    assert rules.nk_dominance([50, 40], 100, P).status == Status.FAIL  # 0.90 == k
    assert rules.nk_dominance([50, 39.99], 100, P) is None
    # 0.9 that floating point computes as 0.8999999...
    assert rules.nk_dominance([0.3, 0.6], 1.0, P) is not None
    # only the n largest count, whatever order they come in
    assert rules.nk_dominance([10, 46, 44], 100, P).status == Status.FAIL


def test_p_ratio_boundary():
    # (total - x1 - x2) / x1 : 0.09 fails, exactly 0.10 passes
    assert rules.p_ratio([100, 50], 159, P).status == Status.FAIL
    assert rules.p_ratio([100, 50], 160, P) is None
    assert rules.p_ratio([], 0, P) is None


def test_class_disclosure_and_negative():
    assert rules.class_disclosure(1, 25).status == Status.FAIL
    assert rules.class_disclosure(2, 25) is None
    assert rules.negative_values(True).status == Status.REVIEW
    assert rules.negative_values(False) is None


def test_extremes_fail_unless_shared_by_enough_people():
    assert rules.extreme_value("max", None, P).status == Status.FAIL
    assert rules.extreme_value("max", 9, P).status == Status.FAIL
    assert rules.extreme_value("min", 10, P) is None
    assert rules.percentile_value("median", 1, P).status == Status.REVIEW
    assert rules.percentile_value("median", 10, P) is None


def test_min_contributors_boundary():
    assert rules.min_contributors(9, P).status == Status.FAIL
    assert rules.min_contributors(10, P) is None


def test_residual_dof_boundary():
    assert rules.residual_dof(9, P).status == Status.FAIL
    assert rules.residual_dof(10, P) is None
    assert rules.residual_dof(9.5, P) is not None


def test_params_vs_n():
    assert rules.params_vs_n(34, 100, P).status == Status.FAIL
    assert rules.params_vs_n(33, 100, P) is None


def test_survival_step_boundary():
    assert rules.survival_step(9, "drop", P).status == Status.FAIL
    assert rules.survival_step(10, "drop", P) is None
    assert rules.survival_step(0, "drop", P) is None


def test_correlation_rules():
    assert rules.correlation_perfect(-1.0).status == Status.REVIEW
    assert rules.correlation_perfect(0.999) is None
    assert rules.correlation_min_n(9, P).status == Status.FAIL
    assert rules.correlation_min_n(10, P) is None


def test_rounding_detection_needs_enough_cells():
    assert rules.is_rounded([10, 15, 20, 25], P)
    assert not rules.is_rounded([10, 15, 20], P)  # too few to tell
    assert not rules.is_rounded([10, 15, 20, 26], P)
    assert rules.rounding_note([10, 15, 20, 25, 0], P).status == Status.PASS


# ---- secondary disclosure ------------------------------------------------------------------
# 2x2 table with margins, cells numbered:
#   0 1 | 2
#   3 4 | 5
#   ----+--
#   6 7 | 8
GRID = [
    MarginEquation(2, [0, 1]),
    MarginEquation(5, [3, 4]),
    MarginEquation(8, [6, 7]),
    MarginEquation(6, [0, 3]),
    MarginEquation(7, [1, 4]),
    MarginEquation(8, [2, 5]),
]
VALUES = [20.0, 5.0, 25.0, 30.0, 40.0, 70.0, 50.0, 45.0, 95.0]


def _hidden(*cells: int) -> list[bool]:
    return [i in cells for i in range(len(VALUES))]


def test_single_suppressed_cell_is_recovered():
    recovered, inconsistent = recoverable_cells(VALUES, _hidden(1), GRID, P)
    assert [(r.cell, r.value) for r in recovered] == [(1, 5.0)]
    assert inconsistent == []


def test_rectangle_of_four_suppressed_cells_is_safe():
    recovered, _ = recoverable_cells(VALUES, _hidden(0, 1, 3, 4), GRID, P)
    assert recovered == []


def test_chain_through_margins_is_recovered():
    # 1 and its row total hidden: column 1 reveals 1, then row 0 reveals its total
    recovered, _ = recoverable_cells(VALUES, _hidden(1, 2), GRID, P)
    assert {r.cell: r.value for r in recovered} == {1: 5.0, 2: 25.0}


def test_cells_forced_to_zero_are_recovered():
    values = [20.0, 0.0, 20.0, 30.0, 0.0, 30.0, 50.0, 0.0, 50.0]
    recovered, _ = recoverable_cells(values, _hidden(1, 4), GRID, P)
    assert {r.cell for r in recovered} == {1, 4}


def test_non_negativity_pins_a_cell_the_algebra_leaves_free():
    # x0 + x1 = 3 (cell 2 visible) and x3 = x0 + x4 - ... build: total 5 = x3 + x4 with
    # x3 = 3 + ... : use equations  2 = 0 + 1  and  0 = 3 + 4 (cell 0 is a sub-total)
    values = [3.0, 0.0, 3.0, 3.0, 0.0]
    eqs = [MarginEquation(2, [0, 1]), MarginEquation(0, [3, 4])]
    # hidden: 0, 1, 4 ; visible: 2 (=3), 3 (=3). Then x0 + x1 = 3 and x0 = 3 + x4 -> x0 = 3
    recovered, _ = recoverable_cells(values, [True, True, False, False, True], eqs, P)
    assert {r.cell: r.value for r in recovered} == {0: 3.0, 1: 0.0, 4: 0.0}


def test_inconsistent_margin_is_reported():
    values = list(VALUES)
    values[2] = 30.0  # row total no longer 20 + 5
    _, inconsistent = recoverable_cells(values, _hidden(), GRID, P)
    assert inconsistent == [0, 5]  # the row total and the column of totals


def test_project_override_changes_policy_label_and_bad_override_is_refused():
    p = policy_for_project({"min_cell_count": 5})
    assert p.label != P.label
    with pytest.raises(PolicyError, match="nk_k"):
        policy_for_project({"nk_k": 1.5})
    with pytest.raises(PolicyError, match="no_such_key"):
        policy_for_project({"no_such_key": 1})
    with pytest.raises(PolicyError, match="version"):
        policy_for_project({"version": "x"})


def test_policy_for_registry_project(policies_dir):
    from tre.registry import load_registry

    registry = load_registry(policies_dir)
    project = next(iter(registry.projects.values()))
    assert policy_for_project(project).label == P.label or project.disclosure
    stricter = project.model_copy(update={"disclosure": {"min_cell_count": 20, "nk_k": 0.8}})
    policy = policy_for_project(stricter)
    assert (policy.min_cell_count, policy.nk_k) == (20, 0.8)
    assert rules.min_cell_count(15, policy) is not None


def test_survival_at_risk_boundary():
    assert rules.survival_at_risk(9, P).status == Status.FAIL
    assert rules.survival_at_risk(10, P) is None
    assert rules.survival_at_risk(0, P) is None


def test_marker_bounds_pin_cells_at_their_largest_value():
    # row: 120 + x + y = 138 with x, y shown as '<10': both must be 9
    values = [120.0, None, None, 138.0]
    eqs = [MarginEquation(3, [0, 1, 2])]
    hidden = [False, True, True, False]
    recovered, _ = recoverable_cells(values, hidden, eqs, P, upper=[None, 9.0, 9.0, None])
    assert {r.cell: r.value for r in recovered} == {1: 9.0, 2: 9.0}
    # without the bound, or with room to spare, nothing is pinned
    assert recoverable_cells(values, hidden, eqs, P)[0] == []
    values[3] = 135.0
    assert recoverable_cells(values, hidden, eqs, P, upper=[None, 9.0, 9.0, None])[0] == []


def test_marker_upper_bounds_are_read():
    from airlock.checks.layout import marker_upper_bound

    assert marker_upper_bound("<10") == 9
    assert marker_upper_bound("< 5") == 4
    assert marker_upper_bound("<=5") == 5
    assert marker_upper_bound("≤7") == 7
    assert marker_upper_bound("*") is None


def test_derived_count_boundary_and_ranges():
    # a derived count fails as a printed one: 9 fails, 10 passes, 0 is the zero rule
    assert rules.derived_count(9, 9, "x", P).status == Status.FAIL
    assert rules.derived_count(10, 10, "x", P) is None
    assert rules.derived_count(0, 0, "x", P).status == Status.FAIL
    assert rules.derived_count(0, 0, "x", P, zero_counts=False) is None
    assert rules.derived_count(0, 0, "x", policy_for_project({"zeros_disclosive": False})) is None
    # a rounded percentage gives a range: it fires only when every whole number in it is small
    assert rules.derived_count(2.6, 3.4, "x", P).evidence["derived"] == [3, 3]
    assert rules.derived_count(8.6, 10.2, "x", P) is None  # 10 is possible
    assert rules.derived_count(3.2, 3.8, "x", P) is None  # no whole number: not a count
    assert rules.derived_count(4, 4, "x", policy_for_project({"min_cell_count": 4})) is None
    assert rules.derived_count(float("nan"), 1, "x", P) is None  # inf x 0: never an exception
    assert rules.derived_count(1, float("inf"), "x", P) is None


def test_negative_count_is_reviewed():
    assert rules.negative_count(-3).status == Status.REVIEW
    assert rules.negative_count(0) is None


def test_ranges_and_scales_read_from_labels():
    from airlock.checks.derived import parse_range, percent_scale

    assert parse_range("0-4") == (0, True, 5, False)  # whole years: 4.9 is in 0-4
    assert parse_range("<5") == parse_range("under 5 years") == (0, True, 5, False)
    assert parse_range("15+") == parse_range(">=15") == (15, True, float("inf"), False)
    assert parse_range("(0.0, 5.0]") == (0.0, False, 5.0, True)
    assert parse_range("2010-2014") == (2010, True, 2015, False)
    assert parse_range("Wilms") is None and parse_range("5-2") is None
    assert percent_scale("rate_per_100000", [2.5]) == 100000
    assert percent_scale("Rate per 100k", [2.5]) == 100000
    assert percent_scale("events_per_1000_py", [1.9]) == 1000
    assert percent_scale("pct_died", [2.0]) == 100
    assert percent_scale("proportion", [0.2]) == 1
    assert percent_scale("odds_ratio", [1.2]) is None


def test_derived_counts_never_raise_on_infinite_or_huge_values():
    import polars as pl

    from airlock.checks.tables import check_table

    for frame in (
        pl.DataFrame(
            {
                "group": ["A", "B", "C"],
                "population": [0.0, float("inf"), 1e308],
                "rate_per_100000": [float("inf"), 0.0, 1e308],
                "cum_n": [3.0, float("inf"), 5.0],
            }
        ),
        pl.DataFrame({"age_band": ["0-4", "0-5"], "n": [float("inf"), 3.0]}),
        pl.DataFrame(
            {
                "time": [0, 1, 2],
                "at_risk": [float("inf"), 180.0, 0.0],
                "survival": [1.0, 1e308, 0.5],
            }
        ),
    ):
        check_table(frame, P)  # a verdict, never an exception

"""Numbers in prose: possible counts are shown in context; obvious non-counts are set aside."""

from __future__ import annotations

import pytest

from airlock.checks.findings import Status
from airlock.checks.text import check_text, numbers_in_text
from airlock.policy import load_policy

POLICY = load_policy()


def kinds(text: str) -> dict[str, str]:
    return {n.value: n.kind for n in numbers_in_text(text, POLICY)}


@pytest.mark.parametrize(
    "text",
    [
        "Data were collected in 2015.",
        "Diagnosed between 2010 and 2014.",
        "Cohort 2005-2019, follow-up until 2024.",
        "Run on 2026-11-29 at 10:15:03.",
        "Produced with version 1.2.3 (v2).",
        "See Table 2 and Figure 3, section 4.",
        "The association was significant (p = 0.03).",
        "1. Introduction",
    ],
)
def test_obvious_non_counts_are_not_flagged(text):
    assert numbers_in_text(text, POLICY) == []
    assert check_text(text, POLICY) == []


def test_a_year_like_number_that_counts_people_is_kept():
    found = kinds("We included 2015 children.")
    assert found == {"2015": "count"}


def test_a_bare_four_digit_number_is_kept():
    assert kinds("Total: 2015") == {"2015": "count"}


def test_small_counts_of_people_fail_with_context():
    findings = check_text("Among girls, 3 children relapsed and n = 4 died.", POLICY)
    small = next(f for f in findings if f.rule == "text.small_count")
    assert small.status == Status.FAIL
    assert [c["value"] for c in small.cells] == ["3", "4"]
    assert "3 children relapsed" in small.cells[0]["context"]
    assert small.cells[0]["line"] == 1


def test_threshold_comes_from_the_policy():
    lax = load_policy(overrides={"min_cell_count": 3})
    assert not any(f.rule == "text.small_count" for f in check_text("3 children", lax))
    assert any(f.rule == "text.small_count" for f in check_text("2 children", lax))


def test_counts_percentages_and_decimals_are_reviewed():
    findings = check_text("Of 145 patients, 12.5% relapsed; mean age 6.3 years.\n", POLICY)
    (review,) = findings
    assert review.rule == "text.numbers" and review.status == Status.REVIEW
    assert review.evidence["by_kind"] == {"count": 1, "decimal": 1, "percentage": 1}


def test_zero_counts_are_reviewed():
    findings = check_text("0 deaths were observed.", POLICY)
    assert [f.rule for f in findings] == ["text.zero_count"]


def test_line_numbers_in_long_text():
    text = "\n".join(["no numbers"] * 50 + ["7 patients"])
    (finding,) = check_text(text, POLICY)
    assert finding.cells[0]["line"] == 51


def test_markdown_pipe_tables_are_checked_as_tables(tmp_path):
    from airlock.checks.engine import check_file

    f = tmp_path / "results.md"
    f.write_text(
        "# Results\n\nIncidence by site.\n\n| site | count |\n|---|---:|\n| north | 143 |\n"
        "| south | 4 |\n\nSee above.\n"
    )
    report = check_file(f, POLICY)
    small = [x for x in report.findings if x.rule == "frequency.min_cell_count"]
    assert small and small[0].cells[0]["lines"] == "5-8"
    assert not any(x.rule.startswith("text.") for x in report.findings)


def test_a_data_dump_of_numbers_fails_without_classifying_everything():
    from airlock.checks.text import MAX_NUMBERS

    text = "value 17 and 2345\n" * (MAX_NUMBERS // 2 + 10)
    findings = check_text(text, POLICY)
    dump = next(f for f in findings if f.rule == "text.too_many_numbers")
    assert dump.status == Status.FAIL and dump.evidence["numbers"] == MAX_NUMBERS + 20


@pytest.mark.parametrize(
    ("text", "values"),
    [
        ("counts rounded to 5, cells below 10 suppressed.", ["5", "10"]),  # no trailing comma
        ("we saw 1,234 children", ["1,234"]),  # thousands separators stay one number
        ("deaths by year 2,3,4 children", ["2", "3", "4"]),  # a list is several numbers
    ],
)
def test_numbers_are_split_where_people_would_split_them(text, values):
    assert [n.value for n in numbers_in_text(text, POLICY)] == values


def test_a_small_count_at_the_end_of_a_comma_list_fails():
    findings = check_text("deaths by year 12,3,4 children", POLICY)
    assert any(f.rule == "text.small_count" and f.status == Status.FAIL for f in findings)

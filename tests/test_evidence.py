"""Evidence files: the schema, clear errors, and ACRO results.json bundles."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from airlock.checks import rules
from airlock.checks.findings import Status, worst
from airlock.checks.tables import check_table
from airlock.evidence import EvidenceError, TableEvidence, load_evidence, parse_evidence
from airlock.policy import load_policy

P = load_policy()
BUNDLE = Path(__file__).parent / "corpus" / "tables" / "acro_bundle"


def test_roundtrip(tmp_path):
    ev = TableEvidence(
        name="t.csv",
        output_class="magnitude_table",
        cells=[{"column": "mean_x", "row": 0, "n": 12, "largest": [0.2, 0.1], "total": 1.0}],
    )
    path = tmp_path / "t.evidence.json"
    path.write_text(ev.to_json())
    assert load_evidence(path) == ev


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("not json", "cannot read"),
        ("[1, 2]", "JSON object"),
        ('{"schema": "other/1", "name": "x"}', "unknown evidence schema"),
        ('{"schema": "tre.evidence/1"}', "name"),
        (
            '{"schema": "tre.evidence/1", "name": "x", "cells": [{"column": "a", "n": -1}]}',
            "cells.0.n",
        ),
        ('{"schema": "tre.evidence/1", "name": "x", "surprise": 1}', "surprise"),
    ],
)
def test_bad_evidence_gets_a_clear_error(tmp_path, body, message):
    path = tmp_path / "e.json"
    path.write_text(body)
    with pytest.raises(EvidenceError, match=message):
        load_evidence(path)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(EvidenceError, match="cannot read"):
        load_evidence(tmp_path / "nope.json")


def test_acro_bundle_needs_a_table_name_when_it_holds_several_outputs():
    with pytest.raises(EvidenceError, match="name the table"):
        load_evidence(BUNDLE / "results.json")
    with pytest.raises(EvidenceError, match="no output 'other.csv'"):
        load_evidence(BUNDLE / "results.json", "other.csv")


def test_acro_bundle_cells_and_thresholds():
    ev = load_evidence(BUNDLE / "results.json", "output_1_0.csv")
    assert ev.output_class == "magnitude_table" and ev.producer.startswith("acro")
    assert ev.acro.config["safe_threshold"] == 10
    flagged = [(c.row, c.column) for c in ev.cells if c.acro_checks]
    assert flagged == [(0, "c")]  # F, c: 4 people


def test_acro_evidence_cannot_give_a_silent_pass(tmp_path):
    """A mean table ACRO did not flag is still review: ACRO never checks class disclosure."""
    data = json.loads((BUNDLE / "results.json").read_text())
    for record in data["results"].values():
        for f in record["files"]:
            for cells in f["sdc"].get("cells", {}).values():
                cells.clear()
    (tmp_path / "results.json").write_text(json.dumps(data))
    (tmp_path / "config.json").write_text((BUNDLE / "config.json").read_text())
    ev = load_evidence(tmp_path / "results.json", "output_1_0.csv")
    table = pl.read_csv(BUNDLE / "output_1_0.csv")
    _, findings = check_table(table, P, ev)
    assert worst([f.status for f in findings]) == Status.REVIEW
    assert any("never fires" in f.message for f in findings)


def test_acro_laxer_thresholds_are_named(tmp_path):
    config = json.loads((BUNDLE / "config.json").read_text())
    config["safe_threshold"] = 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "results.json").write_text((BUNDLE / "results.json").read_text())
    ev = load_evidence(tmp_path / "results.json", "output_1_0.csv")
    _, findings = check_table(pl.read_csv(BUNDLE / "output_1_0.csv"), P, ev)
    assert any("less strict" in f.message for f in findings)


def test_evidence_that_does_not_match_the_table_is_review():
    table = pl.DataFrame({"grp": ["a", "b"], "mean_x": [5.0, 6.0]})
    ev = parse_evidence(
        {
            "schema": "tre.evidence/1",
            "name": "t.csv",
            "cells": [
                {
                    "column": "mean_x",
                    "row": 0,
                    "value": 5.0,
                    "n": 50,
                    "largest": [0.1, 0.1],
                    "total": 1.0,
                    "n_distinct": 40,
                },
                {
                    "column": "mean_x",
                    "row": 1,
                    "value": 7.5,
                    "n": 50,
                    "largest": [0.1, 0.1],
                    "total": 1.0,
                    "n_distinct": 40,
                },
            ],
        }
    )
    _, findings = check_table(table, P, ev)
    mismatch = [f for f in findings if f.rule == rules.EVIDENCE_MISMATCH]
    assert mismatch and mismatch[0].cells[0]["row"] == 1


def test_evidence_cannot_move_a_frequency_table_to_a_laxer_class():
    table = pl.DataFrame({"grp": ["a", "b"], "n": [3, 40]})
    ev = parse_evidence(
        {
            "schema": "tre.evidence/1",
            "name": "t.csv",
            "output_class": "correlation_matrix",
            "correlation_n": 1000,
        }
    )
    output_class, findings = check_table(table, P, ev)
    assert output_class == "frequency_table"
    assert worst([f.status for f in findings]) == Status.FAIL


def test_evidence_matched_by_labels_when_rows_move():
    table = pl.DataFrame({"grp": ["b", "a"], "mean_x": [6.0, 5.0]})
    cells = [
        {
            "column": "mean_x",
            "row": i,
            "labels": {"grp": g},
            "value": v,
            "n": 50,
            "largest": [0.1, 0.1],
            "total": 1.0,
            "n_distinct": 40 if g == "a" else 1,
        }
        for i, (g, v) in enumerate([("a", 5.0), ("b", 6.0)])
    ]
    ev = parse_evidence({"schema": "tre.evidence/1", "name": "t.csv", "cells": cells})
    _, findings = check_table(table, P, ev)
    cls = [f for f in findings if f.rule == rules.CLASS_DISCLOSURE]
    assert [c["labels"]["grp"] for c in cls[0].cells] == ["b"]


def test_totals_declared_visible_only_reveal_nothing_but_must_add_up():
    table = pl.DataFrame(
        {
            "sex": ["F", "M", "Total"],
            "a": ["*", "30", "30"],
            "b": ["40", "50", "90"],
            "Total": ["40", "80", "120"],
        }
    )
    _, plain = check_table(table, P)
    assert any(f.rule == rules.SECONDARY_DISCLOSURE for f in plain)  # read as true totals
    declared = parse_evidence(
        {
            "schema": "tre.evidence/1",
            "name": "t.csv",
            "margins": "visible_only",
            "suppression_applied": True,
        }
    )
    _, findings = check_table(table, P, declared)
    assert not any(f.rule == rules.SECONDARY_DISCLOSURE for f in findings)
    assert worst([f.status for f in findings]) == Status.REVIEW
    wrong = table.with_columns(pl.Series("Total", ["41", "80", "121"]))
    _, findings = check_table(wrong, P, declared)
    assert any(f.rule == rules.MARGIN_INCONSISTENT for f in findings)


def test_evidence_cannot_turn_a_count_column_into_a_statistic():
    table = pl.DataFrame({"grp": ["a", "b"], "n": [3, 40]})
    ev = parse_evidence(
        {
            "schema": "tre.evidence/1",
            "name": "t.csv",
            "output_class": "magnitude_table",
            "cells": [
                {
                    "column": "n",
                    "row": i,
                    "statistic": "sum",
                    "value": v,
                    "n": 50,
                    "largest": [0.1, 0.1],
                    "total": 1.0,
                    "n_distinct": 40,
                }
                for i, v in enumerate([3, 40])
            ],
        }
    )
    _, findings = check_table(table, P, ev)
    assert any(f.rule == rules.MIN_CELL_COUNT and f.status == Status.FAIL for f in findings)
    # an integer column without a count name may be a statistic (e.g. a sum of days)
    days = table.rename({"n": "days_in_hospital"})
    ev2 = parse_evidence(
        {
            **ev.model_dump(by_alias=True, exclude_none=True),
            "cells": [
                {**c.model_dump(exclude_none=True), "column": "days_in_hospital"} for c in ev.cells
            ],
        }
    )
    output_class, findings = check_table(days, P, ev2)
    assert output_class == "magnitude_table"
    assert worst([f.status for f in findings]) == Status.PASS


def test_evidence_claiming_a_model_cannot_hide_counts():
    table = pl.DataFrame({"grp": ["a", "b"], "n": [3, 40]})
    ev = parse_evidence(
        {
            "schema": "tre.evidence/1",
            "name": "t.csv",
            "output_class": "model_summary",
            "model": {"nobs": 5000, "df_resid": 4990, "n_params": 10},
        }
    )
    output_class, findings = check_table(table, P, ev)
    assert output_class == "frequency_table"
    assert worst([f.status for f in findings]) == Status.FAIL

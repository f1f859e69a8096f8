"""Row-level data and leaks from the pooled data, against a real DuckDB extract built here."""

from __future__ import annotations

import hashlib
import json
import random

import duckdb
import polars as pl
import pytest

from airlock.checks.context import CheckContext
from airlock.checks.engine import check_file, check_files
from airlock.checks.findings import Status
from airlock.checks.leaks import (
    ExtractIndex,
    check_rows,
    find_identifiers,
    find_row_matches,
    find_small_classes,
    is_row_level,
)
from airlock.policy import load_policy

POLICY = load_policy()
N = 3000


def pid(i: int) -> str:
    return hashlib.sha256(f"p{i}".encode()).hexdigest()[:16]


@pytest.fixture(scope="module")
def extract(tmp_path_factory):
    """A small extract: patients and tumours with quasi-identifiers, pseudonymous ids."""
    rng = random.Random(7)
    path = tmp_path_factory.mktemp("extract") / "proj.duckdb"
    patients = pl.DataFrame(
        {
            "patient_id": [pid(i) for i in range(N)],
            "sex": [rng.choice(["Female", "Male"]) for _ in range(N)],
            "birth_year": [rng.randint(2000, 2015) for _ in range(N)],
            "country": [rng.choice(["DE", "FR", "GB", "US"]) for _ in range(N)],
            "site_id": [rng.choice(["de-gpoh", "fr-rnce", "uk-ccr"]) for _ in range(N)],
        }
    )
    tumours = pl.DataFrame(
        {
            "tumour_id": [f"T{pid(i)}" for i in range(N)],
            "patient_id": [pid(i) for i in range(N)],
            "diagnosis_year": [rng.randint(2005, 2020) for _ in range(N)],
            "age_at_diagnosis_days": [rng.randint(0, 5400) for _ in range(N)],
            "icdo3_morphology": [rng.choice(["9836/3", "8960/3", "9500/3"]) for _ in range(N)],
            "relapse": [rng.random() < 0.2 for _ in range(N)],
        }
    )
    con = duckdb.connect(str(path))
    con.register("p", patients.to_arrow())
    con.register("t", tumours.to_arrow())
    con.execute("CREATE TABLE patient AS SELECT * FROM p")
    con.execute("CREATE TABLE tumour AS SELECT * FROM t")
    con.close()
    return path, patients, tumours


@pytest.fixture
def index(extract):
    with ExtractIndex(extract[0]) as idx:
        yield idx


def test_the_extract_is_opened_read_only(extract, index):
    with pytest.raises(duckdb.Error):
        index.cursor().execute("CREATE TABLE x (a INT)")
    # and a second reader can open it at the same time
    with ExtractIndex(extract[0]) as other:
        assert set(other.tables) == {"patient", "tumour"}


def test_an_id_anywhere_in_a_table_fails_with_its_row(index):
    df = pl.DataFrame(
        {"group": ["a", "b", "c"], "note": ["fine", f"see {pid(5)}", pid(12)], "n": [11, 12, 13]}
    )
    finding = find_identifiers(df, index)
    # only the exact value is an id (a substring inside a note is a text matter)
    assert finding is not None and finding.status == Status.FAIL
    assert finding.evidence["rows"] == 1
    assert finding.cells == [{"row": 2, "column": "note"}]
    tumour = pl.DataFrame({"x": ["T" + pid(100), "nothing"]})
    assert find_identifiers(tumour, index).cells[0]["row"] == 0


def test_export_columns_named_like_the_checks_internals_are_ordinary_columns(
    tmp_path, extract, index
):
    """A table with a "value" (or "col", "__row") column was unreadable with an extract:
    the id search's long format used those names itself."""
    df = pl.DataFrame(
        {"value": ["fine", pid(5)], "col": ["a", "b"], "__row": ["x", "y"], "n": [11, 12]}
    )
    finding = find_identifiers(df, index)
    assert finding is not None and finding.cells == [{"row": 1, "column": "value"}]
    plain = tmp_path / "counts.csv"
    plain.write_text("group,value\n" + "".join(f"g{i},{20 + i}\n" for i in range(20)))
    report = check_file(plain, POLICY, extract_path=extract[0])
    assert report.status == Status.PASS, report.findings
    # copied rows with such a column are still matched against the extract
    path, patients, tumours = extract
    rows = tumours.join(patients, on="patient_id").head(15)
    export = rows.select("sex", "birth_year", "country", "diagnosis_year", "icdo3_morphology")
    copied = tmp_path / "copied.csv"
    export.with_columns(pl.lit("x").alias("__row"), pl.lit("y").alias("value")).write_csv(copied)
    rules = {f.rule for f in check_file(copied, POLICY, extract_path=path).findings}
    assert "leak.row_match" in rules and "file.unreadable" not in rules, rules


def test_numeric_ids_only_match_a_column_of_the_same_name(tmp_path):
    path = tmp_path / "num.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE patient AS SELECT range AS patient_id, 'F' AS sex FROM range(500)")
    con.close()
    with ExtractIndex(path) as idx:
        counts = pl.DataFrame({"group": ["a", "b"], "count": [12, 40]})
        assert find_identifiers(counts, idx) is None
        ids = pl.DataFrame({"patient_id": [3, 9999]})
        found = find_identifiers(ids, idx)
        assert found is not None and found.cells == [{"row": 0, "column": "patient_id"}]


def test_rows_copied_from_the_extract_fail_with_row_numbers(extract, index):
    _, patients, tumours = extract
    rows = (
        tumours.join(patients, on="patient_id")
        .select("sex", "birth_year", "diagnosis_year", "age_at_diagnosis_days", "icdo3_morphology")
        .head(30)
    )
    # shuffle the columns, add an aggregate-looking column, and one invented row at index 0
    invented = pl.DataFrame(
        {
            "icdo3_morphology": ["9999/3"],
            "age_at_diagnosis_days": [99999],
            "sex": ["Female"],
            "diagnosis_year": [1990],
            "birth_year": [1980],
        }
    )
    export = pl.concat([invented, rows.select(invented.columns)])
    findings = find_row_matches(export, index, POLICY)
    match = next(f for f in findings if f.rule == "leak.row_match")
    flagged = {c["row"] for c in match.cells}
    assert 0 not in flagged
    assert match.evidence["rows"] == 30
    assert match.evidence["unique_matches"] >= 25
    assert flagged <= set(range(1, 31))


def test_case_and_type_changes_do_not_hide_a_copied_row(extract, index):
    _, patients, tumours = extract
    rows = tumours.head(20).select(
        pl.col("age_at_diagnosis_days").cast(pl.String),
        pl.col("icdo3_morphology"),
        pl.col("diagnosis_year").cast(pl.Float64),
    )
    rows = rows.with_columns(pl.col("icdo3_morphology").str.to_lowercase())
    findings = find_row_matches(rows, index, POLICY)
    assert any(f.rule == "leak.row_match" and f.evidence["rows"] == 20 for f in findings)


def test_quasi_identifiers_alone_catch_rows_whose_other_columns_were_altered(extract, index):
    _, patients, _ = extract
    rows = patients.head(50).select("sex", "birth_year", "country", "site_id")
    # an extra shared column with altered values defeats the full-row match, not the QI match
    rows = rows.with_columns(pl.lit("not-a-real-id").alias("patient_id"))
    with_altered = rows.with_columns(pl.col("site_id").alias("site_id"))
    findings = {f.rule: f for f in find_row_matches(with_altered, index, POLICY)}
    assert "leak.row_match" in findings  # sex, birth_year, country, site_id are all shared
    # now alter a non-QI shared column on the tumour table
    _, _, tumours = extract
    t = tumours.head(40).select("diagnosis_year", "age_at_diagnosis_days", "relapse")
    t = t.with_columns(pl.col("relapse").not_())  # relapse altered: rows no longer match whole
    found = {f.rule: f for f in find_row_matches(t, index, POLICY)}
    assert "leak.qi_match" in found
    assert found["leak.qi_match"].evidence["rows"] >= 35


def test_an_aggregate_table_is_not_a_leak(extract, index):
    _, patients, _ = extract
    agg = patients.group_by("sex", "country").len("count").sort("sex", "country")
    ctx = CheckContext(policy=POLICY, extract=index)
    assert check_rows(agg, ctx) == []
    assert not is_row_level(agg, POLICY)


def test_a_small_group_in_an_aggregate_is_flagged_by_the_extract(extract, index):
    _, patients, tumours = extract
    one = tumours.join(patients, on="patient_id").row(0, named=True)
    agg = pl.DataFrame(
        {
            "sex": [one["sex"], "Male"],
            "birth_year": [one["birth_year"], 3000],
            "age_at_diagnosis_days": [one["age_at_diagnosis_days"], 1],
            "diagnosis_year": [one["diagnosis_year"], 1900],
            "mean_something": [1.5, 2.5],
        }
    )
    findings = find_row_matches(agg, index, POLICY)
    assert findings and all(f.status == Status.FAIL for f in findings)
    assert {c["row"] for f in findings for c in f.cells} == {0}


def test_k_anonymity_on_row_level_records_without_an_extract():
    rng = random.Random(1)
    common = [("Female", 2010, "FR")] * 25 + [("Male", 2011, "DE")] * 30
    rare = [("Male", 2003, "US"), ("Female", 2001, "GB"), ("Female", 2001, "GB")]
    records = common + rare
    rng.shuffle(records)
    df = pl.DataFrame(records, schema=["sex", "birth_year", "country"], orient="row")
    assert is_row_level(df, POLICY)
    finding = find_small_classes(df, POLICY)
    assert finding is not None and finding.status == Status.FAIL
    assert finding.evidence["rows"] == 3
    assert finding.evidence["smallest_class"] == 1
    rare_rows = {i for i, r in enumerate(records) if r in rare}
    assert {c["row"] for c in finding.cells} == rare_rows
    # with a lower k, classes of 2 pass and only the unique one fails
    lax = load_policy(overrides={"k_anonymity": 2})
    assert find_small_classes(df, lax).evidence["rows"] == 1


def test_k_anonymity_passes_when_every_class_is_large():
    df = pl.DataFrame(
        [("Female", 2010)] * 12 + [("Male", 2011)] * 15,
        schema=["sex", "birth_year"],
        orient="row",
    )
    assert find_small_classes(df, POLICY) is None


def test_a_list_of_subjects_with_an_id_column_is_row_level():
    df = pl.DataFrame({"subject_id": [f"s{i}" for i in range(20)], "sex": ["F", "M"] * 10})
    assert is_row_level(df, POLICY)
    freq = pl.DataFrame({"sex": ["F", "M"], "count": [120, 130]})
    assert not is_row_level(freq, POLICY)


def test_file_level_leaks_csv_notebook_and_text(tmp_path, extract):
    path, patients, tumours = extract
    rows = tumours.join(patients, on="patient_id").head(15)
    export = rows.select("sex", "birth_year", "country", "diagnosis_year", "icdo3_morphology")
    csv = tmp_path / "rows.csv"
    export.write_csv(csv)
    report = check_file(csv, POLICY, extract_path=path)
    rules = {f.rule for f in report.findings}
    assert report.status == Status.FAIL
    assert {"leak.row_match", "leak.k_anonymity"} <= rules
    log = tmp_path / "run.log"
    log.write_text(f"processing {pid(42)} ... done\n")
    assert "leak.identifier" in {
        f.rule for f in check_file(log, POLICY, extract_path=path).findings
    }
    nb = tmp_path / "nb.ipynb"
    nb.write_text(
        json.dumps(
            {
                "cells": [
                    {
                        "cell_type": "code",
                        "metadata": {},
                        "source": "print(x)",
                        "outputs": [{"output_type": "stream", "name": "stdout", "text": pid(7)}],
                    }
                ],
                "metadata": {},
                "nbformat": 4,
                "nbformat_minor": 5,
            }
        )
    )
    reports = check_files([nb, log], POLICY, extract_path=path)
    assert all("leak.identifier" in {f.rule for f in r.findings} for r in reports)
    # without the extract, the same log is only text
    assert "leak.identifier" not in {f.rule for f in check_file(log, POLICY).findings}


def test_a_missing_extract_is_a_finding(tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_text("region,count\nnorth,143\nsouth,121\n")
    report = check_file(csv, POLICY, extract_path=tmp_path / "nope.duckdb")
    assert report.status == Status.FAIL
    assert report.findings[0].rule == "file.unreadable"
    reports = check_files([csv], POLICY, extract_path=tmp_path / "nope.duckdb")
    assert reports[0].status == Status.FAIL


def test_any_table_names_and_columns(tmp_path):
    """Nothing is specific to the core model: another table with other QIs works the same."""
    path = tmp_path / "other.duckdb"
    con = duckdb.connect(str(path))
    con.execute(
        "CREATE TABLE cohort AS SELECT 'id' || range AS patient_id, "
        "range % 97 AS postcode_area, (range * 7) % 13 AS ethnicity_code, range AS visit "
        "FROM range(2000)"
    )
    con.close()
    policy = load_policy(overrides={"quasi_identifiers": ["postcode_area", "ethnicity_code"]})
    export = pl.DataFrame({"postcode_area": [5, 6], "ethnicity_code": [(5 * 7) % 13, 1]})
    with ExtractIndex(path) as idx:
        ctx = CheckContext(policy=policy, extract=idx)
        findings = check_rows(export, ctx)
    assert any(f.rule == "leak.row_match" for f in findings)


@pytest.mark.parametrize(
    "table",
    [
        {
            "sex": ["F", "M"] * 5,
            "year": [y for y in range(2010, 2015) for _ in (0, 1)],
            "count": [14, 15, 22, 18, 30, 12, 11, 19, 25, 16],
        },
        {"sex": ["F", "M"], "2010": [14, 15], "2011": [22, 18]},
        {
            "country": ["FR", "FR", "DE", "DE"],
            "sex": ["F", "M", "F", "M"],
            "mean_age_days": [1500.5, 1720.1, 1633.0, 1702.2],
        },
        {
            "sex": ["F", "F", "M", "M"],
            "measure": ["mean", "sd", "mean", "sd"],
            "value": [5.1, 2.2, 5.6, 2.4],
        },
        # count columns named by what they count (cases, patients), not n/count
        {"sex": ["F", "M"], "cases": [120, 140]},
        {"sex": ["F", "M"], "patients": [120, 140]},
        {
            "period": ["2010-2014", "2015-2019"] * 2,
            "sex": ["F", "F", "M", "M"],
            "deaths": [40, 52, 45, 50],
        },
    ],
)
def test_aggregates_are_not_row_level(table):
    df = pl.DataFrame(table)
    assert not is_row_level(df, POLICY)
    assert find_small_classes(df, POLICY) is None

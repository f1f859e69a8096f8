"""The dispatcher: the whole corpus gets its expected verdict and rule; bad input never raises."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from airlock.checks.engine import check_file, check_files
from airlock.checks.findings import Status
from airlock.policy import load_policy

sys.path.insert(0, str(Path(__file__).parent / "corpus" / "files"))
import corpus  # noqa: E402

POLICY = load_policy()


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    return d, {c.name: c for c in corpus.build(d)}


CASE_NAMES = [c.name for c in corpus.build(Path(__import__("tempfile").mkdtemp()))]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_corpus_verdict(corpus_dir, name):
    d, cases = corpus_dir
    case = cases[name]
    report = check_file(d / name, POLICY, companions=[d / c for c in case.companions])
    rules = [f.rule for f in report.findings]
    assert report.status.value == case.status, (case.why, [f.model_dump() for f in report.findings])
    if case.rule:
        assert case.rule in rules, (case.why, rules)
    # every finding records the policy in force; nothing unsafe passes
    assert all(f.policy_version == POLICY.label for f in report.findings)
    if case.status != "pass":
        assert report.status != Status.PASS


def test_every_class_has_safe_and_unsafe_cases():
    cases = corpus.build(Path(__import__("tempfile").mkdtemp()))
    for suffix in (".csv", ".png", ".jpg", ".svg", ".ipynb", ".html", ".xlsx", ".txt", ".json"):
        statuses = {c.status for c in cases if c.name.endswith(suffix)}
        assert "fail" in statuses, suffix
    assert {c.status for c in cases} == {"pass", "review", "fail"}


def test_missing_file_is_a_finding_not_an_exception(tmp_path):
    report = check_file(tmp_path / "nope.csv", POLICY)
    assert report.status == Status.FAIL
    assert report.findings[0].rule == "file.unreadable"
    assert "nope.csv" in report.findings[0].message


def test_directory_is_a_finding(tmp_path):
    report = check_file(tmp_path, POLICY)
    assert report.status == Status.FAIL and report.findings[0].rule == "file.unreadable"


def test_sparse_1gb_file_fails_on_size_without_being_read(tmp_path, monkeypatch):
    big = tmp_path / "big.csv"
    with open(big, "wb") as fh:
        fh.truncate(1 << 30)

    def no_read(*a, **k):
        raise AssertionError("the file was read")

    monkeypatch.setattr(Path, "read_bytes", no_read)
    import builtins

    real_open = builtins.open

    def guarded_open(file, mode="r", *a, **k):
        if str(file) == str(big):
            raise AssertionError("the file was opened")
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr(builtins, "open", guarded_open)
    report = check_file(big, POLICY)
    assert report.status == Status.FAIL
    assert report.findings[0].rule == "file.too_large"
    assert report.findings[0].evidence["bytes"] == 1 << 30


def test_size_limit_comes_from_the_policy(tmp_path):
    f = tmp_path / "t.csv"
    f.write_text(corpus.SAFE_CSV)
    small = load_policy(overrides={"max_file_bytes": 10})
    assert check_file(f, small).findings[0].rule == "file.too_large"
    assert check_file(f, POLICY).status == Status.PASS


def test_allowlist_comes_from_the_policy(tmp_path):
    f = tmp_path / "t.csv"
    f.write_text(corpus.SAFE_CSV)
    no_csv = load_policy(overrides={"allowed_file_types": ["png", "txt"]})
    report = check_file(f, no_csv)
    assert report.status == Status.FAIL
    assert report.findings[0].rule == "file.type_not_allowed"


def test_txt_holding_csv_is_not_a_mismatch_but_is_checked_as_a_table(tmp_path):
    f = tmp_path / "table.txt"
    f.write_text("region,count\nnorth,143\nsouth,4\n")
    report = check_file(f, POLICY)
    rules = [x.rule for x in report.findings]
    assert "file.type_mismatch" not in rules
    assert "frequency.min_cell_count" in rules


def test_sha256_is_of_the_bytes_checked(tmp_path):
    import hashlib

    f = tmp_path / "t.csv"
    f.write_text(corpus.SAFE_CSV)
    assert check_file(f, POLICY).sha256 == hashlib.sha256(f.read_bytes()).hexdigest()


def test_check_files_pairs_a_figure_with_its_table(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "fig.png").write_bytes(corpus.png_bytes())
    tables = tmp_path / "tables"
    tables.mkdir()
    (tables / "fig.csv").write_text("region,count\nnorth,143\nsouth,3\n")
    reports = check_files([src / "fig.png", tables / "fig.csv"], POLICY)
    fig = reports[0]
    assert fig.output_class == "figure"
    assert fig.status == Status.FAIL
    small = [f for f in fig.findings if f.rule == "frequency.min_cell_count"]
    assert small and small[0].cells[0]["companion"] == "fig.csv"
    alone = check_files([src / "fig.png"], POLICY)[0]
    assert alone.status == Status.REVIEW
    assert [f.rule for f in alone.findings] == ["figure.no_table"]


def test_evidence_file_is_passed_to_the_table_rules(tmp_path):
    f = tmp_path / "means.csv"
    f.write_text("group,mean_age\nA,5.2\nB,7.9\n")
    ev = tmp_path / "means.evidence.json"
    ev.write_text(
        json.dumps({"schema": "tre.evidence/1", "name": "means.csv", "suppression_applied": True})
    )
    with_ev = check_file(f, POLICY, evidence_path=ev)
    assert "evidence.mitigation_applied" in [x.rule for x in with_ev.findings]
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    report = check_file(f, POLICY, evidence_path=broken)
    assert "evidence.unreadable" in [x.rule for x in report.findings]
    assert report.status != Status.PASS


def test_public_dict_shape(tmp_path):
    f = tmp_path / "t.csv"
    f.write_text("region,count\nnorth,143\nsouth,3\n")
    d = check_file(f, POLICY).public_dict()
    assert set(d) == {"path", "status", "findings"}
    assert d["status"] == "fail"
    assert set(d["findings"][0]) == {"rule", "status", "message", "cells"}
    json.dumps(d)

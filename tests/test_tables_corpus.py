"""Run every table of tests/corpus/tables against its expected verdict and rule."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
import yaml

from airlock.checks.findings import Status, worst
from airlock.checks.tables import check_table
from airlock.evidence import load_evidence
from airlock.policy import policy_for_project

CORPUS = Path(__file__).parent / "corpus" / "tables"
MANIFEST = yaml.safe_load((CORPUS / "manifest.yaml").read_text())


def _id(entry: dict) -> str:
    return entry["file"] + (
        "+" + ",".join(f"{k}={v}" for k, v in entry["policy"].items())
        if entry.get("policy")
        else ""
    )


def read_table(path: Path) -> pl.DataFrame:
    # the way the file layer reads a CSV: every column's type inferred from all its rows
    return pl.read_csv(path, infer_schema_length=None)


def test_manifest_covers_every_corpus_table():
    listed = {e["file"] for e in MANIFEST}
    on_disk = {str(p.relative_to(CORPUS)) for p in CORPUS.rglob("*.csv")}
    assert on_disk == listed


@pytest.mark.parametrize("entry", MANIFEST, ids=_id)
def test_corpus_table(entry):
    path = CORPUS / entry["file"]
    policy = policy_for_project(entry.get("policy"))
    evidence = None
    ev_path = (
        CORPUS / entry["evidence"]
        if "evidence" in entry
        else path.with_name(f"{path.stem}.evidence.json")
    )
    if ev_path.exists():
        evidence = load_evidence(ev_path, table_name=path.name)
    output_class, findings = check_table(read_table(path), policy, evidence)
    status = worst([f.status for f in findings])
    summary = [(f.rule, f.status.value, f.message) for f in findings]
    assert output_class == entry["class"], summary
    assert status == Status(entry["status"]), summary
    if "rule" in entry:
        assert any(f.rule == entry["rule"] and f.status == status for f in findings), summary
    assert all(f.policy_version == policy.label for f in findings)


@pytest.mark.parametrize("entry", MANIFEST, ids=_id)
def test_corpus_table_through_the_file_layer(entry):
    """The same verdicts when the airlock's file dispatcher reads the file and the evidence
    (row-level leak rules belong to the file layer and are set aside here)."""
    from airlock.checks.engine import check_file

    path = CORPUS / entry["file"]
    ev_path = (
        CORPUS / entry["evidence"]
        if "evidence" in entry
        else path.with_name(f"{path.stem}.evidence.json")
    )
    report = check_file(
        path,
        policy_for_project(entry.get("policy")),
        evidence_path=ev_path if ev_path.exists() else None,
    )
    findings = [f for f in report.findings if not f.rule.startswith("leak.")]
    status = worst([f.status for f in findings])
    summary = [(f.rule, f.status.value, f.message) for f in findings]
    assert status == Status(entry["status"]), summary
    if "rule" in entry:
        assert any(f.rule == entry["rule"] and f.status == status for f in findings), summary

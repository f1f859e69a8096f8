"""The state diagram in docs/airlock.md is generated from the transition table."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from airlock.cli import app
from airlock.workflow import TRANSITIONS, doc_is_current, mermaid_diagram, render_doc

DOC = Path(__file__).resolve().parents[2] / "docs" / "airlock.md"


def test_doc_diagram_is_current():
    assert doc_is_current(DOC), "run `uv run airlock workflow diagram --write`"
    assert CliRunner().invoke(app, ["workflow", "diagram", "--check"]).exit_code == 0


def test_stale_doc_is_detected(tmp_path):
    stale = DOC.read_text().replace("withdrawn --> [*]", "")
    assert not doc_is_current_text(stale)


def doc_is_current_text(text: str) -> bool:
    return render_doc(text) == text


def test_diagram_has_every_transition():
    diagram = mermaid_diagram()
    for t in TRANSITIONS:
        for s in t.sources:
            assert f"{s.value} --> {t.target.value}: {t.action.value}" in diagram

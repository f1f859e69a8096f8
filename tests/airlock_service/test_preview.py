"""Previews: the cells the checks name are highlighted; notebooks render inert; HTML/SVG are
never rendered."""

from __future__ import annotations

import re

import nbformat

from airlock.policy import load_policy
from airlock.service import preview
from airlock.service.checking import run_checks


def test_failing_cell_is_highlighted_from_real_findings(tmp_path):
    path = tmp_path / "counts.csv"
    path.write_text("sex,count\nF,3\nM,30\n")
    report = run_checks(path, load_policy())
    findings = [f.model_dump(mode="json") for f in report.findings]
    table = preview.table_preview(path, path.name, findings)
    statuses = [[c["status"] for c in row] for row in table["rows"]]
    if report.status.value == "fail":  # the real engine flags the cell of 3
        assert statuses == [["", "fail"], ["", ""]]
    flagged = preview.table_preview(
        path, path.name, [{"status": "fail", "cells": [{"row": 1, "column": "count"}]}]
    )
    assert [[c["status"] for c in row] for row in flagged["rows"]] == [["", ""], ["", "fail"]]


def test_notebook_renders_without_scripts(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(
            "x",
            outputs=[
                nbformat.v4.new_output(
                    "display_data",
                    data={"text/html": "<img src=x onerror=alert(1)><script>alert(2)</script>"},
                )
            ],
        )
    ]
    path = tmp_path / "a.ipynb"
    nbformat.write(nb, path)
    html = preview.notebook_html(path)
    assert "<script" not in html
    assert re.search(r"<img[^>]*onerror", html) is None
    bad = tmp_path / "bad.ipynb"
    bad.write_text("{not a notebook")
    assert "cannot be rendered" in preview.notebook_html(bad)


def test_markup_is_shown_as_text_never_rendered():
    assert preview.kind_for("report.html") == "text"
    assert preview.kind_for("figure.svg") == "text"
    assert preview.image_media_type("figure.svg") is None
    assert preview.kind_for("x.png") == "image"

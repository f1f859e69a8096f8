"""Previews: the cells the checks name are highlighted; notebooks render inert; HTML/SVG are
never rendered."""

from __future__ import annotations

import re

import nbformat
import pytest

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
    assert report.status.value == "fail"  # the real engine flags the cell of 3
    assert statuses == [["", "fail"], ["", ""]]
    flagged = preview.table_preview(
        path, path.name, [{"status": "fail", "cells": [{"row": 1, "column": "count"}]}]
    )
    assert [[c["status"] for c in row] for row in flagged["rows"]] == [["", ""], ["", "fail"]]


@pytest.mark.parametrize(
    ("text", "header", "flagged_value"),
    [
        # several header rows (pandas multi-level columns): the rule names "F / 1", data row 0
        (
            "sex,F,F,M,M\ndead,0,1,0,1\nstage,,,,\nI,32,5,26,17\nII,39,16,21,14\n",
            ["stage", "F / 0", "F / 1", "M / 0", "M / 1"],
            "5",
        ),
        # comment lines above the header, semicolons: values shown as written
        ("# source: extract v3\ngroup;n\nI;4\nII;40\n", ["group", "n"], "4"),
    ],
)
def test_preview_reads_the_table_as_the_rules_do(tmp_path, text, header, flagged_value):
    path = tmp_path / "t.csv"
    path.write_text(text)
    report = run_checks(path, load_policy())
    findings = [f.model_dump(mode="json") for f in report.findings]
    table = preview.table_preview(path, path.name, findings)
    assert [h["value"] for h in table["header"]] == header
    failing = [c["value"] for row in table["rows"] for c in row if c["status"] == "fail"]
    assert failing == [flagged_value]


def test_preview_of_an_unparseable_table_still_shows_its_rows(tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text('a,b\n1,2,3,4\n"open quote\n')
    table = preview.table_preview(path, path.name, [])
    assert [h["value"] for h in table["header"]] == ["a", "b"]
    assert table["rows"][0][0]["value"] == "1"


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


def test_notebook_preview_keeps_what_a_checker_must_see_and_nothing_active(tmp_path):
    """Headings, paragraphs, pandas tables (<thead>/<th>) and embedded images render; links
    out, remote images, handlers, styles that fetch, scripts and forms do not."""
    import base64
    import io

    import pandas as pd
    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (20, 10), (200, 0, 0)).save(png, format="PNG")
    hostile = (
        '<a href="https://example.org/x">out</a><img src="https://example.org/p.png">'
        '<img src=x onerror="alert(1)"><script>alert(2)</script>'
        '<p style="background:url(https://example.org/y)">styled</p>'
        '<form action="https://example.org"><input name=a></form>'
    )
    cell = nbformat.v4.new_code_cell("df")
    cell.outputs = [
        nbformat.v4.new_output(
            "execute_result",
            data={"text/html": pd.DataFrame({"n": [12, 30]}, index=["a", "b"]).to_html()},
            execution_count=1,
        ),
        nbformat.v4.new_output(
            "display_data", data={"image/png": base64.b64encode(png.getvalue()).decode()}
        ),
        nbformat.v4.new_output("display_data", data={"text/html": hostile}),
    ]
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# Relapse by era\n\nSome *text*."), cell]
    path = tmp_path / "n.ipynb"
    nbformat.write(nb, path)
    html = preview.notebook_html(path)
    body = html[html.index("<main") :]
    assert re.search(r'<h1 id="Relapse-by-era">Relapse by era', body)
    assert "<p>Some <em>text</em>.</p>" in body
    assert "<thead>" in body and "<th>n</th>" in body and "<td>12</td>" in body
    assert re.search(r'<img [^>]*src="data:image/png;base64,', body)
    assert "example.org" not in body.replace('&lt;form action="https://example.org"', "")
    assert "<script" not in body and "onerror" not in body and "<form" not in body
    assert "&lt;script&gt;" in body  # shown to the checker as text, never run


def test_markup_is_shown_as_text_never_rendered():
    assert preview.kind_for("report.html") == "text"
    assert preview.kind_for("figure.svg") == "text"
    assert preview.image_media_type("figure.svg") is None
    assert preview.kind_for("x.png") == "image"

"""Notebooks and HTML: every output is checked where it is; checkers see a script-free render."""

from __future__ import annotations

import base64
import json
import re
import sys
from pathlib import Path

import lxml.html
import polars as pl
import pytest

from airlock.checks.context import CheckContext
from airlock.checks.engine import check_file
from airlock.checks.findings import Status
from airlock.checks.html import sanitize_html, tables_from_html
from airlock.checks.notebooks import check_notebook, render_notebook_html, tables_from_text
from airlock.policy import load_policy

sys.path.insert(0, str(Path(__file__).parent / "corpus" / "files"))
import file_corpus as corpus  # noqa: E402
from file_corpus import code_cell, notebook, result, stream  # noqa: E402

POLICY = load_policy()
CTX = CheckContext(policy=POLICY)


def test_polars_repr_is_parsed():
    df = pl.DataFrame({"site": ["north", "south"], "count": [140, 5]})
    ((parsed, _),) = tables_from_text(repr(df))
    assert parsed.columns == ["site", "count"]
    assert parsed.get_column("count").to_list() == [140, 5]


def test_series_repr_is_parsed():
    text = "site\nnorth    140\nsouth      3\nName: count, dtype: int64"
    ((parsed, _),) = tables_from_text(text)
    assert parsed.columns == ["site", "count"]
    assert parsed.get_column("count").to_list() == [140, 3]


@pytest.mark.parametrize(
    ("text", "columns", "rows"),
    [
        ("   site  count\n0  north    140\n1  south      3", ["site", "count"], 2),
        ("   site  count\n3  north    140\n7  south      3", ["index", "site", "count"], 2),
        ("       count\nsite       \nnorth    140\nsouth      3", ["site", "count"], 2),
        ("site  count\nnorth    140\nsouth      3", ["site", "count"], 2),
        (
            "   site  count\n0  north    140\n..    ...    ...\n9  south      3\n\n"
            "[10 rows x 2 columns]",
            ["index", "site", "count"],
            2,
        ),
    ],
)
def test_pandas_reprs_are_parsed(text, columns, rows):
    ((parsed, _),) = tables_from_text(text)
    assert parsed.columns == columns
    assert parsed.height == rows


def _cohort():
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(3)
    n = 400
    return pd.DataFrame(
        {
            "sex": rng.choice(["F", "M"], n),
            "g": rng.choice(["I", "II", "IV"], n, p=[0.6, 0.35, 0.05]),
            "y": rng.choice([2001, 2002], n),
            "dead": rng.integers(0, 2, n),
        }
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda pd, d: pd.crosstab(d.g, d.sex),
        lambda pd, d: pd.crosstab(d.g, d.sex, margins=True),
        lambda pd, d: pd.crosstab(d.g, [d.sex, d.dead]),
        lambda pd, d: pd.crosstab([d.g, d.y], d.sex),
        lambda pd, d: pd.crosstab([d.g, d.y], [d.sex, d.dead]),
        lambda pd, d: d.groupby(["g", "sex"]).y.agg(["count", "mean"]),
        lambda pd, d: d.groupby(["g", "sex"]).y.agg(["count", "mean"]).unstack(),
    ],
)
def test_printed_pandas_frames_with_named_axes_are_read_cell_for_cell(make):
    """``print(pd.crosstab(...))``: every cell parsed, index labels carried down, column
    levels joined, compared with what pandas itself holds."""
    import pandas as pd

    frame = make(pd, _cohort())
    ((parsed, _),) = tables_from_text(str(frame))
    flat = frame.reset_index()
    assert parsed.height == len(flat)
    names = [" / ".join(map(str, c)) if isinstance(c, tuple) else str(c) for c in frame.columns]
    assert parsed.columns[-len(names) :] == names
    for i, name in enumerate(names):
        got = parsed.get_column(name).to_list()
        want = frame.iloc[:, i].tolist()
        assert got == pytest.approx(want, rel=1e-6), name
    index_names = [n for n in frame.index.names]
    assert parsed.columns[: len(index_names)] == index_names
    for level, name in enumerate(index_names):
        want = [str(v) for v in frame.index.get_level_values(level)]
        assert [str(v) for v in parsed.get_column(name).to_list()] == want


def test_printed_crosstab_with_a_small_cell_fails_in_a_notebook():
    import pandas as pd

    d = _cohort()
    text = str(pd.crosstab([d.g, d.y], [d.sex, d.dead]))
    nb = json.loads(notebook([code_cell("print(ct)", [stream(text + "\n")])]))
    small = [f for f in check_notebook(nb, CTX) if f.rule == "frequency.min_cell_count"]
    assert small and small[0].status.value == "fail"
    assert {c.get("labels", {}).get("g") for c in small[0].cells} >= {"IV"}


@pytest.mark.parametrize(
    "text",
    [
        "sex    F    M\ng\nI    122  125\nII    73   60  999\n",  # a value under no label
        "Results\nModel  fit\nthe fit converged after 12 iterations",
    ],
)
def test_text_that_only_resembles_a_named_axis_frame_is_not_read_as_one(text):
    from airlock.checks.notebooks import _pandas_axis_repr

    assert _pandas_axis_repr(text.splitlines()) is None


def test_prose_is_not_a_table():
    assert tables_from_text("Model converged after 12 iterations.\nDone.") == []


def test_printed_csv_rows_are_a_table():
    text = "site,age,sex\n" + "".join(f"s{i},{i % 15},F\n" for i in range(30))
    ((parsed, _),) = tables_from_text(text)
    assert parsed.shape == (30, 3)


def test_findings_are_located_by_cell_and_output():
    nb = json.loads(
        notebook(
            [
                {"cell_type": "markdown", "metadata": {}, "source": "# Title"},
                code_cell("print('ok')", [stream("ok\n")]),
                code_cell(
                    "df",
                    [
                        stream("computing\n"),
                        result({"text/html": corpus.HTML_SMALL_TABLE, "text/plain": "x"}),
                    ],
                ),
            ]
        )
    )
    findings = check_notebook(nb, CTX)
    small = [f for f in findings if f.rule == "frequency.min_cell_count"]
    assert small and all(c["cell"] == 2 and c["output"] == 1 for c in small[0].cells)


def test_markdown_data_uri_that_is_not_an_image_fails():
    blob = base64.b64encode(b"id,age\n" * 30).decode()
    nb = json.loads(
        notebook(
            [
                {
                    "cell_type": "markdown",
                    "metadata": {},
                    "source": f'<a href="data:text/csv;base64,{blob}">data</a>',
                }
            ]
        )
    )
    assert "encoded.blob" in {f.rule for f in check_notebook(nb, CTX)}


def test_markdown_attachment_image_is_a_figure():
    png64 = base64.b64encode(corpus.png_bytes() + b"tail").decode()
    nb = json.loads(
        notebook(
            [
                {
                    "cell_type": "markdown",
                    "metadata": {},
                    "source": "![x](attachment:x.png)",
                    "attachments": {"x.png": {"image/png": png64}},
                }
            ]
        )
    )
    rules = {f.rule for f in check_notebook(nb, CTX)}
    assert {"figure.appended_data", "figure.no_table"} <= rules


def test_error_output_and_javascript_output():
    nb = json.loads(
        notebook(
            [
                code_cell(
                    "x",
                    [
                        {
                            "output_type": "error",
                            "ename": "KeyError",
                            "evalue": "'P1'",
                            "traceback": ["\x1b[0;31mKeyError\x1b[0m: 4 patients"],
                        },
                        {
                            "output_type": "display_data",
                            "metadata": {},
                            "data": {"application/javascript": "fetch('/x')"},
                        },
                    ],
                )
            ]
        )
    )
    rules = {f.rule for f in check_notebook(nb, CTX)}
    assert "text.small_count" in rules and "notebook.script_output" in rules


def test_a_malformed_notebook_is_unreadable(tmp_path):
    for text in ['{"cells": [1], "nbformat": 4}', '{"cells": [], "nbformat": 3}', "[]"]:
        f = tmp_path / "bad.ipynb"
        f.write_text(text)
        report = check_file(f, POLICY)
        assert report.status == Status.FAIL, text


def test_render_notebook_html_has_no_scripts_and_no_remote_resources(tmp_path):
    png64 = base64.b64encode(corpus.png_bytes()).decode()
    f = tmp_path / "nb.ipynb"
    f.write_text(
        notebook(
            [
                {"cell_type": "markdown", "metadata": {}, "source": "# Incidence $x^2$"},
                code_cell(
                    "df",
                    [
                        result(
                            {
                                "text/html": "<table><tr><td>MARKER-42</td></tr></table>"
                                "<script>alert('x')</script><img src=x onerror=alert(1)>",
                                "text/plain": "x",
                            }
                        ),
                        {
                            "output_type": "display_data",
                            "metadata": {},
                            "data": {"image/png": png64, "text/plain": "<Figure>"},
                        },
                    ],
                ),
            ]
        )
    )
    html = render_notebook_html(f)
    assert "MARKER-42" in html and "Incidence" in html
    doc = lxml.html.document_fromstring(html)
    assert not doc.xpath("//script|//iframe|//object|//embed|//link[@href]")
    for el in doc.iter():
        if not isinstance(el.tag, str):
            continue
        for attr, value in el.attrib.items():
            assert not attr.lower().startswith("on"), (el.tag, attr)
            if attr in {"src", "href"}:
                assert not value.startswith(("http:", "https:", "//")), value
    for style in doc.iter("style"):
        assert "@import" not in (style.text or "")
        assert not re.search(r"url\(\s*['\"]?(https?:|//)", style.text or "")
    assert "data:image/png;base64" in html


def test_sanitize_html_removes_active_content():
    page = (
        '<html><head><link rel="stylesheet" href="https://cdn.example/x.css">'
        '<meta http-equiv="refresh" content="0;url=http://x"></head><body>'
        '<iframe src="http://x"></iframe><a href="javascript:x()">a</a>'
        '<img src="http://x.example/t.png"><p style="background:url(http://x)">t</p>'
        "<style>@import 'http://x/y.css'; p { background: url(http://x/b.png) }</style>"
        "</body></html>"
    )
    clean = sanitize_html(page).lower()
    for bad in ("<link", "refresh", "<iframe", "javascript:", "x.example", "@import", "url(http"):
        assert bad not in clean, bad


def test_html_tables_with_header_spans_and_index():
    doc = __import__("lxml.html").html.document_fromstring(
        "<table><thead><tr><th></th><th>count</th></tr><tr><th>site</th><th></th></tr></thead>"
        "<tbody><tr><th>north</th><td>1,234</td></tr><tr><th>south</th><td>12</td></tr></tbody>"
        "</table>"
    )
    ((df, raw),) = tables_from_html(doc)
    assert df.get_column("count").to_list() == [1234, 12]
    assert df.columns[0] == "site"


def test_polars_html_repr_drops_the_dtype_row_and_quotes():
    df = pl.DataFrame({"site": ["north", "south"], "count": [140, 3]})
    ((parsed, _),) = tables_from_html(lxml.html.document_fromstring(df._repr_html_()))
    assert parsed.columns == ["site", "count"]
    assert parsed.get_column("site").to_list() == ["north", "south"]
    assert parsed.get_column("count").to_list() == [140, 3]
    ((parsed, _),) = tables_from_text(repr(df))
    assert parsed.get_column("site").to_list() == ["north", "south"]


def test_records_printed_with_spaces_are_row_level_data():
    import random

    rng = random.Random(2)
    lines = ["sex birth_year country"] + [
        f"{rng.choice('FM')} {rng.randint(2000, 2015)} {rng.choice(['FR', 'DE', 'GB'])}"
        for _ in range(40)
    ]
    nb = json.loads(notebook([code_cell("for r in rows: print(*r)", [stream("\n".join(lines))])]))
    found = {f.rule: f for f in check_notebook(nb, CTX)}
    assert "leak.k_anonymity" in found
    assert all(c["cell"] == 0 and c["output"] == 0 for c in found["leak.k_anonymity"].cells)


def test_one_broken_output_is_located_and_the_rest_still_checked():
    nb = json.loads(
        notebook(
            [
                code_cell(
                    "x",
                    [
                        {
                            "output_type": "display_data",
                            "metadata": {},
                            "data": {"image/png": "bm90IGFuIGltYWdl"},
                        },
                        result({"text/html": corpus.HTML_SMALL_TABLE}),
                    ],
                )
            ]
        )
    )
    findings = check_notebook(nb, CTX)
    broken = next(f for f in findings if f.rule == "file.unreadable")
    assert broken.cells == [{"cell": 0, "output": 0}] and broken.status == Status.FAIL
    assert any(f.rule == "frequency.min_cell_count" for f in findings)


def test_a_default_pandas_index_is_not_a_count_column():
    # what DataFrame._repr_html_ writes for df.groupby('site').size().reset_index(name='n')
    html = (
        '<table border="1" class="dataframe"><thead><tr style="text-align: right;"><th></th>'
        "<th>site</th><th>n</th></tr></thead><tbody><tr><th>0</th><td>north</td><td>143</td></tr>"
        "<tr><th>1</th><td>south</td><td>121</td></tr></tbody></table>"
    )
    ((df, _),) = tables_from_html(lxml.html.document_fromstring(html))
    assert df.columns == ["site", "n"]
    ((df, _),) = tables_from_text("    site    n\n0  north  143\n1  south  121")
    assert df.columns == ["site", "n"]
    nb = json.loads(
        notebook([code_cell("df", [result({"text/html": "<small>shape: (2, 2)</small>" + html})])])
    )
    assert check_notebook(nb, CTX) == []


def _summary(kind: str, n: int) -> str:
    import numpy as np
    import pandas as pd
    import statsmodels.formula.api as smf

    rng = np.random.default_rng(5)
    d = pd.DataFrame(
        {
            "age": rng.integers(0, 15, n),
            "sex": rng.choice(["F", "M"], n),
            "y": rng.normal(size=n),
            "dead": np.tile([0, 1], n // 2 + 1)[:n],
        }
    )
    if kind == "ols":
        return str(smf.ols("y ~ age + sex", d).fit().summary())
    if kind == "glm":
        return str(smf.glm("y ~ age + sex", d).fit().summary())
    return str(smf.logit("dead ~ age + sex", d).fit(disp=0).summary())


@pytest.mark.parametrize("kind", ["ols", "glm", "logit"])
@pytest.mark.parametrize(("n", "verdict"), [(60, "review"), (12, "fail")])
def test_printed_statsmodels_summary_is_checked_as_a_model(tmp_path, kind, n, verdict):
    """The residual degrees of freedom come from the summary itself (3 parameters: n - 3);
    the counts behind `sex[T.M]` do not, so without evidence it is for the checkers."""
    from airlock.checks.engine import check_file

    text = _summary(kind, n)
    path = tmp_path / "model.txt"
    path.write_text(text)
    report = check_file(path, POLICY)
    assert report.output_class == "model_summary"
    assert report.status.value == verdict, report.findings
    rules_found = {f.rule: f.status.value for f in report.findings}
    assert rules_found["model.categorical_unverified"] == "review"
    if verdict == "fail":
        assert rules_found["model.residual_dof"] == "fail"
    nb = json.loads(notebook([code_cell("print(m.summary())", [stream(text)])]))
    statuses = {f.status.value for f in check_notebook(nb, CTX)}
    assert max(statuses, key=["pass", "review", "fail"].index) == verdict


def test_a_level_held_by_one_child_is_not_passed_on_the_models_dof(tmp_path):
    """Red team: 60 children, one of them at site 'MT': the dummy for MT is fitted to that
    child alone (residual 0), so its coefficient is the child's outcome. The summary's dof (56)
    passes; only the counts per level show the breach, and they are not in the summary."""
    import numpy as np
    import pandas as pd
    import statsmodels.formula.api as smf

    from airlock.checks.engine import check_file

    rng = np.random.default_rng(3)
    d = pd.DataFrame(
        {
            "age": rng.integers(0, 15, 60),
            "site": ["UK"] * 30 + ["FR"] * 29 + ["MT"],
            "y": rng.normal(size=60),
        }
    )
    fit = smf.ols("y ~ age + C(site)", d).fit()
    assert abs(fit.resid.iloc[-1]) < 1e-9  # the MT child is fitted exactly
    path = tmp_path / "model.txt"
    path.write_text(str(fit.summary()))
    report = check_file(path, POLICY)
    assert report.status.value == "review", report.findings
    (finding,) = [f for f in report.findings if f.rule == "model.categorical_unverified"]
    assert "MT" in finding.message and finding.cells[0]["variable"] == "site"


def test_prose_about_a_model_is_still_prose(tmp_path):
    from airlock.checks.engine import check_file

    path = tmp_path / "notes.txt"
    path.write_text("The coef of age was small.\nNo. Observations: 7 children in the pilot.\n")
    report = check_file(path, POLICY)
    assert report.output_class == "text"
    assert "text.small_count" in {f.rule for f in report.findings}


@pytest.mark.parametrize(
    "make",
    [
        lambda d: d[["g", "sex"]].value_counts(),
        lambda d: d.groupby(["g", "sex"]).size(),
        lambda d: d.groupby(["g", "sex", "y"]).size(),
        lambda d: d.groupby(["g", "sex"]).y.mean(),
    ],
)
def test_printed_series_with_several_index_levels_is_read_cell_for_cell(make):
    series = make(_cohort())
    ((parsed, _),) = tables_from_text(str(series))
    names = list(series.index.names)
    assert parsed.columns[: len(names)] == names
    assert parsed.height == len(series)
    values = parsed.get_column(parsed.columns[-1]).to_list()
    assert values == pytest.approx(series.tolist(), rel=1e-5)
    for level, name in enumerate(names):
        want = [str(v) for v in series.index.get_level_values(level)]
        assert [str(v) for v in parsed.get_column(name).to_list()] == want


def test_small_group_in_a_printed_groupby_size_fails():
    d = _cohort()
    text = str(d.groupby(["g", "sex", "y"]).size()) + "\n"
    nb = json.loads(notebook([code_cell("print(sizes)", [stream(text)])]))
    rules_hit = {f.rule: f.status.value for f in check_notebook(nb, CTX)}
    assert rules_hit.get("frequency.min_cell_count") == "fail"

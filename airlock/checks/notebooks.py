"""Notebooks (.ipynb): every output cell is an output.

Tables printed as text (pandas and polars reprs, a Series such as ``value_counts()``, CSV-like
printed rows) or as HTML (``<table>``) become DataFrames and go through the table rules with their
location ``{"cell": i, "output": j}``; images go through the figure rules; other text through the
text rules; base64 blobs that are not images, in outputs or in source, fail. The notebook is read
as JSON here (no nbformat validation: its jsonschema pass costs more than the whole check).

``render_notebook_html`` renders a notebook for checkers with nbconvert, scripts stripped.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import polars as pl

from airlock.checks.blobs import decode_base64, encoded_blobs
from airlock.checks.findings import Finding, Status
from airlock.checks.jsondoc import check_json_value
from airlock.checks.layout import parse_number

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_SERIES_FOOTER = re.compile(r"^(?:Name: (.*?), )?(?:Length: \d+, )?dtype: [\w\[\], ]+$")
_IMAGE_MIMES = {"image/png": "png", "image/jpeg": "jpeg"}
_SCRIPT_MIMES = {"application/javascript", "text/javascript", "application/ecmascript"}


def _joined(value: Any) -> str:
    if isinstance(value, list):
        return "".join(v if isinstance(v, str) else str(v) for v in value)
    return value if isinstance(value, str) else ("" if value is None else str(value))


# ---------------------------------------------------------------------------------- base64


# --------------------------------------------------------------------------- text tables


def _frame(header: list[str], rows: list[list[str]]) -> tuple[pl.DataFrame, pl.DataFrame]:
    from airlock.checks.cells import coerce_numbers, unique_names

    names = unique_names(header)
    raw = pl.DataFrame(
        {
            n: [r[i] if r[i] not in {"", "NaN", "None", "null"} else None for r in rows]
            for i, n in enumerate(names)
        },
        schema={n: pl.String for n in names},
    )
    return coerce_numbers(raw), raw


def _unquote(value: str) -> str:
    from airlock.checks.html import _unquote as unquote

    return unquote(value)


def _polars_repr(lines: list[str]) -> tuple[list[str], list[list[str]]] | None:
    boxed = [ln.strip() for ln in lines if ln.strip()[:1] in "│╞"]
    if not boxed or not any(ln.startswith("╞") for ln in boxed):
        return None
    split = boxed.index(next(ln for ln in boxed if ln.startswith("╞")))
    head = [[c.strip() for c in re.split("[┆│]", ln)[1:-1]] for ln in boxed[:split]]
    body = [[c.strip() for c in re.split("[┆│]", ln)[1:-1]] for ln in boxed[split + 1 :]]
    if not head:
        return None
    header = head[0]
    body = [r for r in body if len(r) == len(header) and not all(c in {"…", "..."} for c in r)]
    body = [[_unquote(c) for c in r] for r in body]
    keep = [i for i, h in enumerate(header) if h not in {"…", "..."}]
    return [header[i] for i in keep], [[r[i] for i in keep] for r in body]


def _series_repr(lines: list[str]) -> tuple[list[str], list[list[str]]] | None:
    m = _SERIES_FOOTER.match(lines[-1].strip())
    if not m:
        return None
    body = lines[:-1]
    value_name = m.group(1) or "value"
    if len(body) > 1 and len(_fields(body[0])) > 1 and body[0][:1] != " ":
        return _multi_index_series(body, value_name)
    index_name = "index"
    if body and len(re.split(r"\s{2,}", body[0].strip())) == 1:
        index_name = body[0].strip()
        body = body[1:]
    rows = []
    for ln in body:
        parts = re.split(r"\s{2,}", ln.strip())
        if parts == ["..."]:
            continue
        if len(parts) != 2:
            return None
        rows.append(parts)
    if not rows:
        return None
    return [index_name, value_name], rows


def _index_labels(head: str, cuts: list[int], previous: list[str]) -> list[str] | None:
    """The row labels printed left of the values, cut at the index names' columns; outer
    levels that pandas prints once for their group of rows are carried down from ``previous``.
    None when the line holds no label at all."""
    labels = [
        head[cut : (cuts[i + 1] if i + 1 < len(cuts) else len(head))].strip()
        for i, cut in enumerate(cuts)
    ]
    given = next((i for i, label in enumerate(labels) if label), None)
    if given is None:
        return None
    labels[:given] = previous[:given]
    return labels


def _multi_index_series(
    body: list[str], value_name: str
) -> tuple[list[str], list[list[str]]] | None:
    """A Series with several index levels (``groupby([a, b]).size()``, ``value_counts()`` of
    two columns): the level names on the first line, outer labels printed once per group::

        g   sex
        I   F      122
            M      125
    """
    names = _fields(body[0])
    cuts = [start for start, _, _ in names]
    rows: list[list[str]] = []
    previous = [""] * len(names)
    for line in body[1:]:
        fields = _fields(line)
        if not fields or fields[-1][2] in {"...", "…"}:
            continue
        value_start, _, value = fields[-1]
        if parse_number(value) is None and value not in {"NaN", "<NA>"}:
            return None
        index = _index_labels(line[:value_start], cuts, previous)
        if index is None or "" in index:
            return None
        rows.append([*index, value])
        previous = index
    if not rows:
        return None
    return [n for _, _, n in names] + [value_name], rows


def _pandas_repr(lines: list[str]) -> tuple[list[str], list[list[str]]] | None:
    if lines and re.match(r"^\[\d+ rows x \d+ columns\]$", lines[-1].strip()):
        lines = lines[:-1]
    if len(lines) < 2:
        return None
    has_index = lines[0][:1] == " "
    header = re.split(r"\s{2,}", lines[0].strip())
    body = lines[1:]
    index_name = ""
    want = len(header) + (1 if has_index else 0)
    if (
        has_index
        and len(body) > 1
        and len(re.split(r"\s{2,}", body[0].strip())) == 1
        and body[0][:1] != " "
        and len(re.split(r"\s{2,}", body[1].strip())) == want
        and want > 1
    ):
        index_name = body[0].strip()  # pandas prints the index name on a line of its own
        body = body[1:]
    rows = []
    for ln in body:
        parts = re.split(r"\s{2,}|(?<=\.\.)\s+(?=\.\.)", ln.strip())
        if all(p in {"...", "…", ".."} for p in parts):
            continue
        if len(parts) != want:
            return None
        rows.append(parts)
    if not rows or (len(header) == 1 and not has_index):
        return None
    if has_index:
        header = [index_name or "index"] + header
    keep = [i for i, h in enumerate(header) if h not in {"...", "…"}]
    from airlock.checks.cells import drop_range_index

    return drop_range_index([header[i] for i in keep], [[r[i] for i in keep] for r in rows])


_FIELD = re.compile(r"\S+(?: \S+)*")  # a printed field: words joined by single spaces


def _fields(line: str) -> list[tuple[int, int, str]]:
    return [(m.start(), m.end(), m.group()) for m in _FIELD.finditer(line)]


def _pandas_axis_repr(lines: list[str]) -> tuple[list[str], list[list[str]]] | None:
    """A pandas frame printed with named axes, as ``print(pd.crosstab(...))`` gives::

        sex    F       M            <- one line per column level: level name, labels
        dead   0   1   0   1           (an upper level printed once over the columns it spans)
        g  y                        <- the index names, nothing else
        I  2001  27  26  26  27
           2002  34  27  19  31     <- an outer index label printed once for its rows

    Read by position: pandas right-aligns every value under the right edge of its column
    label, and left-aligns index labels under their names. Returns None for anything else."""
    for p in range(1, min(4, len(lines) - 1)):
        levels, names_line = lines[:p], lines[p]
        if names_line[:1] == " ":
            continue
        names = _fields(names_line)
        # the column-axis name opens each level line; an unnamed axis leaves it blank
        named_axis = levels[-1][:1] != " "
        last = _fields(levels[-1])
        labels_last = last[1:] if named_axis else last
        if not labels_last or not names:
            continue
        ends = [end for _, end, _ in labels_last]
        first_label = labels_last[0][0]
        if names[-1][1] >= first_label:
            continue  # the index names must sit left of the first column label
        rows: list[list[str]] = []
        previous = [""] * len(names)
        cuts = [n[0] for n in names]
        for line in lines[p + 1 :]:
            values = [""] * len(ends)
            first_value = len(line)
            for start, end, text in _fields(line):
                if end in ends:
                    values[ends.index(end)] = text
                    first_value = min(first_value, start)
                elif start >= first_label:
                    return None  # a field under no column label
            if not any(values) or any(
                e not in ends and s >= first_value for s, e, _ in _fields(line)
            ):
                return None
            # every level sparsified: the same labels as the row above
            index = _index_labels(line[:first_value], cuts, previous) or list(previous)
            rows.append(index + values)
            previous = index
        if not rows or any("" in r[: len(names)] for r in rows):
            return None
        columns: list[list[str]] = [[] for _ in ends]
        span_start = last[0][1] if named_axis else names[-1][1]
        for level_line in levels:
            fields = _fields(level_line)
            labels = fields[1:] if level_line[:1] != " " else fields
            for j, end in enumerate(ends):
                start = ends[j - 1] if j else span_start
                label = [t for s, _, t in labels if start <= s < end]
                columns[j].append(label[0] if label else (columns[j - 1][-1] if j else ""))
        header = [n[2] for n in names] + [" / ".join(c) for c in columns]
        return header, rows
    return None


_RULE_LINE = re.compile(r"^\s*(={10,}|-{10,})\s*$")


def _statsmodels_summary(lines: list[str]) -> tuple[list[str], list[list[str]]] | None:
    """``print(result.summary())`` of statsmodels (OLS, GLM, Logit...): the coefficient rows,
    then the model information as key/value rows ("Df Residuals:", "294"), so the model rules
    read the residual degrees of freedom and observations from the summary itself::

        Dep. Variable:        dead   No. Observations:       300
        Model:               Logit   Df Residuals:           294
        ======================================================
                   coef    std err      z    P>|z|   [0.025   0.975]
        ------------------------------------------------------
        Intercept -1.2865    0.403  -3.190   0.001   -2.077   -0.496
    """
    header_at = next(
        (
            i
            for i, ln in enumerate(lines[:-2])
            if re.match(r"^\s+coef\s{2,}std err\b", ln) and _RULE_LINE.match(lines[i + 1])
        ),
        None,
    )
    if header_at is None:
        return None
    info: list[list[str]] = []
    for line in lines[:header_at]:
        parts = re.split(r"\s{2,}", line.strip())
        info += [[k, v] for k, v in zip(parts[::2], parts[1::2], strict=False) if k.endswith(":")]
    keys = {re.sub(r"[^a-z]+", " ", k.lower()).strip() for k, _ in info}
    if not keys & {"df residuals", "no observations"}:
        return None
    columns = re.split(r"\s{2,}", lines[header_at].strip())
    rows = []
    for line in lines[header_at + 2 :]:
        if _RULE_LINE.match(line):
            break
        parts = re.split(r"\s{2,}", line.strip())
        if len(parts) != len(columns) + 1:
            return None
        rows.append(parts)
    if not rows:
        return None
    width = len(columns) + 1
    rows += [[k, v] + [""] * (width - 2) for k, v in info]
    return ["variable", *columns], rows


def _csv_like(text: str) -> tuple[pl.DataFrame, pl.DataFrame] | None:
    from airlock.checks.filetype import _text_kind

    kind = _text_kind(text, "")
    if kind not in {"csv", "tsv"}:
        return None
    from airlock.checks.spreadsheets import read_delimited

    try:
        return read_delimited(text, "\t" if kind == "tsv" else None)
    except ValueError:
        return None


_PIPE_SEPARATOR = re.compile(r"^\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?$")


def _pipe_cells(line: str) -> list[str]:
    inner = line.strip()
    inner = inner[1:] if inner.startswith("|") else inner
    inner = inner[:-1] if inner.endswith("|") else inner
    return [c.strip() for c in inner.split("|")]


def markdown_tables(text: str) -> list[tuple[tuple[int, int], pl.DataFrame, pl.DataFrame]]:
    """Pipe tables of a markdown text: ((first line, last line) 0-based, typed, all-text)."""
    lines = text.splitlines()
    found = []
    i = 0
    while i + 1 < len(lines):
        if "|" in lines[i] and _PIPE_SEPARATOR.match(lines[i + 1].strip()):
            header = _pipe_cells(lines[i])
            j = i + 2
            rows = []
            while j < len(lines) and "|" in lines[j] and lines[j].strip():
                cells = _pipe_cells(lines[j])
                rows.append((cells + [""] * len(header))[: len(header)])
                j += 1
            if rows:
                typed, raw = _frame(header, rows)
                found.append(((i, j - 1), typed, raw))
            i = j
        else:
            i += 1
    return found


_LATEX_TABLE = re.compile(
    r"\\begin\{(tabular\*?|array|longtable|tabularx)\}(?:\{[^}]*\})*(.*?)\\end\{\1\}", re.DOTALL
)
_LATEX_RULE = re.compile(r"\\(?:hline|toprule|midrule|bottomrule|cline\{[^}]*\}|endhead|endfoot)")
_LATEX_WRAP = re.compile(
    r"\\(?:textbf|textit|emph|mathrm|text|multicolumn\{\d+\}\{[^}]*\})\{([^{}]*)\}"
)


def latex_tables(text: str) -> list[tuple[tuple[int, int], pl.DataFrame, pl.DataFrame]]:
    """LaTeX tabular/array environments (``df.to_latex()``, ``text/latex`` outputs): rows end
    with a double backslash, cells split on '&', the first row is the header."""
    found = []
    for m in _LATEX_TABLE.finditer(text):
        body = _LATEX_RULE.sub("", m.group(2))
        rows = []
        for line in re.split(r"\\\\(?:\[[^\]]*\])?", body):
            if not line.strip():
                continue
            cells = [_LATEX_WRAP.sub(r"\1", c).replace("\\%", "%").strip() for c in line.split("&")]
            rows.append([c.strip("{}$ ") for c in cells])
        if not rows:
            continue
        width = len(rows[0])
        rows = [(r + [""] * width)[:width] for r in rows]
        first = text.count("\n", 0, m.start())
        if any(parse_number(c) is not None for c in rows[0]):  # no header row
            rows.insert(0, [f"column_{i + 1}" for i in range(width)])
        typed, raw = _frame(rows[0], rows[1:])
        found.append(((first, text.count("\n", 0, m.end())), typed, raw))
    return found


def check_prose(text: str, ctx: Any, location: dict[str, Any] | None = None) -> list[Finding]:
    """Markdown/plain text: its pipe tables go to the table rules, the rest to the text rules."""
    from airlock.checks.context import check_dataframe
    from airlock.checks.text import check_text

    location = location or {}
    findings: list[Finding] = []
    lines = text.splitlines()
    for (first, last), df, raw in markdown_tables(text) + latex_tables(text):
        where = {**location, "lines": f"{first + 1}-{last + 1}"}
        findings += check_dataframe(df, ctx, where, raw=raw)[1]
        lines[first : last + 1] = [""] * (last + 1 - first)
    return findings + check_text("\n".join(lines), ctx.policy, location)


def tables_from_text(text: str) -> list[tuple[pl.DataFrame, pl.DataFrame]]:
    """A table printed as text (polars/pandas repr, a Series, CSV-like rows), or nothing."""
    lines = [ln.rstrip() for ln in _ANSI.sub("", text).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not re.match(r"^shape: \(\d+, \d+\)$", ln.strip())]
    if not lines:
        return []
    for parser in (
        _statsmodels_summary,
        _polars_repr,
        _series_repr,
        _pandas_repr,
        _pandas_axis_repr,
    ):
        try:
            parsed = parser(lines)
        except (IndexError, ValueError):
            parsed = None
        if parsed and parsed[0] and parsed[1]:
            return [_frame(*parsed)]
    if len(lines) >= 3:  # a header and two rows: print(df.to_csv()) of a small table
        csv = _csv_like("\n".join(lines))
        if csv is not None and any(dtype.is_numeric() for dtype in csv[0].schema.values()):
            return [csv]
    if len(lines) >= 10:
        csv = _csv_like("\n".join(lines))
        if csv is not None:
            return [csv]
        spaced = _whitespace_table(lines)
        if spaced is not None:
            return [_frame(*spaced)]
    return []


def _whitespace_table(lines: list[str]) -> tuple[list[str], list[list[str]]] | None:
    """Records printed one per line with single spaces (``print(*row)``): same token count on
    every line; the first line is the header when it holds no number."""
    rows = [ln.split() for ln in lines]
    width = len(rows[0])
    if width < 2 or any(len(r) != width for r in rows):
        return None
    if any(re.fullmatch(r"[-+]?\d[\d.,]*", t) for t in rows[0]):
        return [f"column_{i + 1}" for i in range(width)], rows
    return rows[0], rows[1:]


# -------------------------------------------------------------------------------- notebook


def _check_plain_text(text: str, ctx: Any, where: dict[str, Any]) -> list[Finding]:
    from airlock.checks.context import check_dataframe
    from airlock.checks.text import check_text

    findings: list[Finding] = []
    tables = tables_from_text(text)
    for df, raw in tables:
        findings += check_dataframe(df, ctx, where, raw=raw)[1]
    if not tables:
        lines = text.count("\n") + 1
        if lines > ctx.policy.max_rows:
            findings.append(
                Finding(
                    rule="notebook.long_output",
                    status=Status.FAIL,
                    message=f"an output of {lines} lines, more than {ctx.policy.max_rows}: "
                    "printed data this long is row-level data",
                    cells=[where],
                    evidence={"lines": lines},
                )
            )
        findings += check_text(_ANSI.sub("", text), ctx.policy, where)
    return findings


def _check_output(output: dict[str, Any], ctx: Any, where: dict[str, Any]) -> list[Finding]:
    from airlock.checks import figures
    from airlock.checks.html import check_html

    kind = output.get("output_type")
    if kind == "stream":
        text = _joined(output.get("text"))
        return encoded_blobs(text, where) + _check_plain_text(text, ctx, where)
    if kind == "error":
        text = "\n".join(_joined(t) for t in output.get("traceback") or [])
        text = _ANSI.sub("", text + "\n" + _joined(output.get("evalue")))
        return encoded_blobs(text, where) + _check_plain_text(text, ctx, where)
    data = output.get("data")
    if not isinstance(data, dict):
        return []
    findings: list[Finding] = []
    if "text/html" in data:
        html_text = _joined(data["text/html"])
        findings += check_html(html_text, ctx, where)
    if "text/plain" in data:
        # the file carries every representation, whichever one a front end shows: a harmless
        # text/html beside a text/plain table must not hide the table
        text = _joined(data["text/plain"])
        seen = {(f.rule, f.message) for f in findings}
        findings += [
            f
            for f in encoded_blobs(text, where) + _check_plain_text(text, ctx, where)
            if (f.rule, f.message) not in seen
        ]
    for mime, value in data.items():
        if mime in _IMAGE_MIMES:
            blob = decode_base64(re.sub(r"\s+", "", _joined(value))) or b""
            findings += figures.check_raster(blob, _IMAGE_MIMES[mime], where)
            findings.append(_no_table(where))
        elif mime == "image/svg+xml":
            findings += figures.check_svg(_joined(value), where, policy=ctx.policy)
            findings.append(_no_table(where))
        elif mime in _SCRIPT_MIMES:
            findings.append(
                Finding(
                    rule="notebook.script_output",
                    status=Status.REVIEW,
                    message=f"an output of type {mime}: checkers see the notebook with scripts "
                    "removed, so what the script shows is unreviewed",
                    cells=[where],
                )
            )
        elif mime in {"text/markdown", "text/latex"}:
            text = _joined(value)
            findings += encoded_blobs(text, where) + check_prose(text, ctx, where)
        elif mime == "application/json" or mime.endswith("+json"):
            findings += _check_json_output(value, ctx, where)
        elif mime not in {"text/plain", "text/html"}:
            findings += encoded_blobs(_joined(value), where)
            findings += _check_plain_text(_joined(value), ctx, where)
    return findings


def _check_json_output(value: Any, ctx: Any, where: dict[str, Any]) -> list[Finding]:
    """A JSON output (application/json, a vendor's +json such as a data resource): the tables
    it holds go to the table rules, the rest of its leaves to the text rules."""
    import json

    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return encoded_blobs(value, where) + _check_plain_text(value, ctx, where)
    text = json.dumps(value)
    return encoded_blobs(text, where) + check_json_value(value, ctx, where)


def _merged_streams(outputs: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    """(index, output) with consecutive stream outputs of the same stream joined, as Jupyter
    shows them: a table printed one line per output is one table."""
    merged: list[tuple[int, dict[str, Any]]] = []
    for j, output in enumerate(outputs):
        if merged and output.get("output_type") == "stream":
            first, previous = merged[-1]
            if previous.get("output_type") == "stream" and previous.get("name") == output.get(
                "name"
            ):
                text = _joined(previous.get("text")) + _joined(output.get("text"))
                merged[-1] = (first, {**previous, "text": text})
                continue
        merged.append((j, output))
    return merged


def _check_raw(source: str, ctx: Any, where: dict[str, Any]) -> list[Finding]:
    """A raw cell is text pasted as is: a table in it (CSV, a printed frame) is a table."""
    from airlock.checks.context import check_dataframe

    tables = tables_from_text(source)
    if not tables:
        return check_prose(source, ctx, where)
    findings: list[Finding] = []
    for df, raw in tables:
        findings += check_dataframe(df, ctx, where, raw=raw)[1]
    return findings


# Metadata a notebook, a cell or an output carries for its tools; anything else is data a
# checker never sees in the rendered notebook.
_NOTEBOOK_METADATA = {"kernelspec", "language_info", "vscode", "jupytext", "toc", "title"}
_CELL_METADATA = {
    *("tags", "collapsed", "scrolled", "jupyter", "execution", "editable", "deletable"),
    *("slideshow", "trusted", "vscode", "ExecuteTime", "id", "name", "papermill", "pycharm"),
}
_OUTPUT_METADATA = {"needs_background", "isolated", "filenames", *_IMAGE_MIMES, "image/svg+xml"}


def hidden_metadata(nb: dict[str, Any]) -> Finding | None:
    """Notebook, cell and output metadata outside the keys tools write (widget state, data
    stored by an extension or by hand): review, fail beyond the figures' metadata limit."""
    import json

    from airlock.checks.figures import HIDDEN_BYTES_FAIL

    places: list[dict[str, Any]] = []

    def unknown(meta: Any, known: set[str], where: dict[str, Any]) -> None:
        if not isinstance(meta, dict):
            return
        extra = {k: v for k, v in meta.items() if k not in known}
        if extra:
            size = len(json.dumps(extra, default=str))
            places.append({**where, "keys": sorted(extra)[:10], "bytes": size})

    unknown(nb.get("metadata"), _NOTEBOOK_METADATA, {"notebook": True})
    for i, cell in enumerate(nb["cells"]):
        unknown(cell.get("metadata"), _CELL_METADATA, {"cell": i})
        for j, output in enumerate(cell.get("outputs") or []):
            if isinstance(output, dict):
                unknown(output.get("metadata"), _OUTPUT_METADATA, {"cell": i, "output": j})
    if not places:
        return None
    total = sum(p["bytes"] for p in places)
    return Finding(
        rule="notebook.hidden_metadata",
        status=Status.FAIL if total > HIDDEN_BYTES_FAIL else Status.REVIEW,
        message=f"{total} byte(s) of metadata (notebook, cell or output: widget state, stored "
        "values) that the rendered notebook does not show; clear it (Edit > Clear outputs, "
        "or nbstripout) or keep only what the tools need",
        cells=places[:20],
        evidence={"bytes": total, "places": len(places)},
    )


def _no_table(where: dict[str, Any]) -> Finding:
    return Finding(
        rule="figure.no_table",
        status=Status.REVIEW,
        message="a figure without its underlying table: a checker must judge it from the "
        "picture (supply the table to have it checked)",
        cells=[where],
    )


def check_notebook(nb: Any, ctx: Any) -> list[Finding]:
    """Findings for a notebook already parsed from JSON (a dict with a 'cells' list)."""
    from airlock.checks import figures
    from airlock.checks.html import check_html

    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
        raise ValueError("not a Jupyter notebook: no 'cells' list")
    if nb.get("nbformat") not in (4, None):
        raise ValueError(f"notebook format {nb.get('nbformat')!r} is not supported (need 4)")
    findings: list[Finding] = []
    for i, cell in enumerate(nb["cells"]):
        if not isinstance(cell, dict):
            raise ValueError(f"cell {i} is not an object")
        where = {"cell": i}
        source = _joined(cell.get("source"))
        ctype = cell.get("cell_type")
        findings += encoded_blobs(source, {**where, "source": True})
        if ctype == "markdown":
            if "<" in source:
                findings += check_html(f"<div>{source}</div>", ctx, where)
            else:
                findings += check_prose(source, ctx, where)
            for name, bundle in (cell.get("attachments") or {}).items():
                for mime, value in (bundle or {}).items():
                    blob = decode_base64(re.sub(r"\s+", "", _joined(value))) or b""
                    loc = {**where, "attachment": name}
                    if mime in _IMAGE_MIMES:
                        findings += figures.check_raster(blob, _IMAGE_MIMES[mime], loc)
                        findings.append(_no_table(loc))
                    else:
                        findings += encoded_blobs(_joined(value), loc)
        elif ctype == "raw":
            findings += _check_raw(source, ctx, where)
        outputs = cell.get("outputs") or []
        if not isinstance(outputs, list):
            raise ValueError(f"cell {i}: 'outputs' is not a list")
        for j, output in enumerate(outputs):
            if not isinstance(output, dict):
                raise ValueError(f"cell {i} output {j} is not an object")
        for j, output in _merged_streams(outputs):
            loc = {"cell": i, "output": j}
            try:
                findings += _check_output(output, ctx, loc)
            except (ValueError, TypeError, KeyError) as exc:  # one bad output, not the notebook
                findings.append(
                    Finding(
                        rule="file.unreadable",
                        status=Status.FAIL,
                        message=f"cell {i} output {j} cannot be checked: {exc}",
                        cells=[loc],
                    )
                )
    hidden = hidden_metadata(nb)
    findings += [hidden] if hidden else []
    # ids of the extract anywhere in the notebook (metadata too) are searched by the engine
    return findings


# What a checker must see of markdown and HTML outputs: text structure, tables (pandas puts its
# column labels in <thead>/<th>) and inline images. nbconvert's own clean_html allows only a
# dozen inline tags and escapes the rest, so headings, paragraphs and table headers arrived as
# literal markup. Anything else is still escaped (shown, never rendered) by bleach.
_NOTEBOOK_TAGS = frozenset(
    {
        *("a", "abbr", "b", "blockquote", "br", "caption", "code", "col", "colgroup", "dd"),
        *("del", "details", "div", "dl", "dt", "em", "figcaption", "figure", "h1", "h2", "h3"),
        *("h4", "h5", "h6", "hr", "i", "img", "ins", "kbd", "li", "mark", "ol", "p", "pre", "q"),
        *("s", "samp", "small", "span", "strong", "sub", "summary", "sup", "table", "tbody"),
        *("td", "tfoot", "th", "thead", "tr", "u", "ul", "var"),
    }
)
_NOTEBOOK_ATTRIBUTES = {
    "*": ["class", "id", "title", "style"],
    "a": ["href"],
    "img": ["src", "alt", "width", "height"],
    "td": ["colspan", "rowspan", "align"],
    "th": ["colspan", "rowspan", "align", "scope"],
    "col": ["span"],
    "colgroup": ["span"],
    "ol": ["start"],
}


def clean_notebook_html(element: Any) -> str:
    """nbconvert's ``clean_html`` filter with an allowlist fit for reviewing outputs: links
    only to anchors in the page, images only as data: URIs (embedded), styles through bleach's
    CSS sanitizer; every other tag escaped, every other attribute dropped."""
    import bleach
    from bleach.css_sanitizer import CSSSanitizer

    text = element.decode() if isinstance(element, bytes) else str(element)
    cleaned = bleach.clean(
        text,
        tags=_NOTEBOOK_TAGS,
        attributes=_NOTEBOOK_ATTRIBUTES,
        protocols=["data"],
        css_sanitizer=CSSSanitizer(),
    )
    # bleach keeps a relative href (no protocol): only in-page anchors may stay
    return re.sub(r'\shref="(?!#)[^"]*"', "", cleaned)


def render_notebook_html(path: Any) -> str:
    """The notebook as a checker sees it: nbconvert's HTML, in-process, scripts stripped.

    Nothing in the page can run or fetch: scripts (including the MathJax and require.js loaders
    nbconvert adds from a CDN), event handlers and external resources are removed after
    rendering, and outputs are sanitised by nbconvert itself first.
    """
    import nbformat
    from nbconvert import HTMLExporter

    from airlock.checks.html import sanitize_html

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # old notebooks without cell ids: render them anyway
        if hasattr(path, "read"):  # a file the caller opened (bytes)
            nb = nbformat.reads(path.read().decode("utf-8"), as_version=4)
        else:
            nb = nbformat.read(str(path), as_version=4)
    exporter = HTMLExporter(
        sanitize_html=True, embed_images=True, filters={"clean_html": clean_notebook_html}
    )
    exporter.mathjax_url = ""
    exporter.require_js_url = ""
    body, _ = exporter.from_notebook_node(nb)
    return sanitize_html(body)

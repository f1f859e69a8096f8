"""What a checker sees of a snapshot: tables with the flagged cells highlighted, images inline,
notebooks rendered by nbconvert into an inert document (shown in an ``<iframe sandbox="">`` with a
CSP that forbids scripts and every request), anything else as escaped text."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, BinaryIO

TABLE_SUFFIXES = {"csv": ",", "tsv": "\t"}
IMAGE_TYPES = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg"}
TEXT_SUFFIXES = {"txt", "md", "log", "json", "html", "svg", "tex"}
MAX_ROWS, MAX_COLS, MAX_TEXT = 200, 50, 64 * 1024
_SEVERITY = {"pass": 0, "review": 1, "fail": 2}


def _suffix(name: str) -> str:
    return name.rsplit(".", 1)[-1].lower() if "." in name else ""


def _head(source: Path | BinaryIO, limit: int) -> bytes:
    """The first ``limit`` bytes of a path or of a file the service opened (it reads from the
    open file: the blob may be deleted meanwhile)."""
    if isinstance(source, Path):
        with open(source, "rb") as fh:
            return fh.read(limit)
    return source.read(limit)


def kind_for(name: str) -> str:
    s = _suffix(name)
    if s in TABLE_SUFFIXES:
        return "table"
    if s in IMAGE_TYPES:
        return "image"
    if s == "ipynb":
        return "notebook"
    if s in TEXT_SUFFIXES:
        return "text"  # html and svg too: shown as source, never rendered
    return "none"


def image_media_type(name: str) -> str | None:
    return IMAGE_TYPES.get(_suffix(name))


def flagged_cells(findings: list[dict[str, Any]]) -> dict[tuple[int | None, str], str]:
    """(data row index from 0, column name) -> worst status; row None flags a whole column."""
    marks: dict[tuple[int | None, str], str] = {}
    for finding in findings:
        status = str(finding.get("status", "pass"))
        if status == "pass":
            continue
        for cell in finding.get("cells") or []:
            if not isinstance(cell, dict) or "column" not in cell:
                continue
            row = cell.get("row")
            key = (int(row) if isinstance(row, int) else None, str(cell["column"]))
            if _SEVERITY.get(status, 0) > _SEVERITY.get(marks.get(key, "pass"), 0):
                marks[key] = status
    return marks


def table_preview(
    source: Path | BinaryIO, name: str, findings: list[dict[str, Any]]
) -> dict[str, Any]:
    """The table as the checks read it (same reader: sniffed separator, comment lines above the
    header set aside, several header rows joined), so flagged cells land where the rule saw
    them; a file the reader refuses is shown row by row as plain CSV."""
    from airlock.checks.spreadsheets import delimited_cells, split_preamble

    delimiter = TABLE_SUFFIXES[_suffix(name)]
    text = _head(source, 4 * 1024 * 1024).decode("utf-8", errors="replace")
    try:
        frame, _ = delimited_cells(split_preamble(text)[1], "\t" if delimiter == "\t" else None)
        header = frame.columns[:MAX_COLS]
        records = (["" if v is None else v for v in row] for row in frame.iter_rows())
    except ValueError:
        reader = csv.reader(io.StringIO(text), delimiter=delimiter)
        header = next(reader, [])[:MAX_COLS]
        records = reader
    marks = flagged_cells(findings)
    rows, truncated = [], False
    for i, raw in enumerate(records):
        if i >= MAX_ROWS:
            truncated = True
            break
        cells = []
        for j, value in enumerate(raw[:MAX_COLS]):
            col = header[j] if j < len(header) else str(j)
            status = marks.get((i, col)) or marks.get((i, str(j))) or marks.get((None, col))
            cells.append({"value": value, "status": status or ""})
        rows.append(cells)
    flagged_columns = {c for (r, c), _ in marks.items() if r is None}
    return {
        "header": [{"value": h, "status": "flag" if h in flagged_columns else ""} for h in header],
        "rows": rows,
        "truncated": truncated,
        "flagged": len(marks),
    }


def text_preview(source: Path | BinaryIO) -> str:
    data = _head(source, MAX_TEXT + 1)
    text = data[:MAX_TEXT].decode("utf-8", errors="replace")
    return text + ("\n[... truncated ...]" if len(data) > MAX_TEXT else "")


def notebook_html(source: Path | BinaryIO) -> str:
    """The notebook as checkers see it: the checks engine's nbconvert rendering (one renderer
    for the whole airlock), with scripts, event handlers and remote references stripped."""
    from airlock.checks.notebooks import render_notebook_html

    try:
        return render_notebook_html(source)
    except Exception as exc:  # noqa: BLE001 - any parse failure is shown, never executed
        return f"<p>This notebook cannot be rendered: {type(exc).__name__}</p>"

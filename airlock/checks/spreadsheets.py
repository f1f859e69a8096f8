"""Delimited text (CSV/TSV) and XLSX workbooks, read into DataFrames for the table rules.

XLSX: what a checker would not see in a spreadsheet is what fails: hidden sheets, macros, external
links and embedded objects; formulas and hidden rows/columns give ``review``. The ZIP container
is measured before openpyxl opens it, so a zip bomb is refused without being inflated (openpyxl
itself parses the XML through defusedxml when it is installed, as it is here).
"""

from __future__ import annotations

import io
import re
import zipfile
from typing import Any

import polars as pl

from airlock.checks.cells import unique_names
from airlock.checks.figures import HIDDEN_BYTES_FAIL
from airlock.checks.findings import Finding, Status

MAX_INFLATED_BYTES = 256 * 1024 * 1024  # a workbook inflating beyond this is a zip bomb
MAX_RATIO = 200  # compression ratio of a single part beyond which it is a zip bomb
_EXTERNAL_FORMULA = re.compile(
    r"\[[^\]]+\]|\b(?:WEBSERVICE|FILTERXML|HYPERLINK|RTD|CALL|REGISTER|EXEC|DDE)\s*\(|"
    r"(?:https?|file|ftp)://|\w+\|'",
    re.IGNORECASE,
)


def split_preamble(text: str) -> tuple[str, str]:
    """(comment lines starting with '#' above the header, the table below them)."""
    lines = text.splitlines(keepends=True)
    n = 0
    while n < len(lines) and (lines[n].lstrip().startswith("#") or not lines[n].strip()):
        n += 1
    if n == len(lines):
        return "", text
    return "".join(lines[:n]), "".join(lines[n:])


def split_blocks(text: str) -> list[str]:
    """The tables of a delimited text, separated by blank lines (a second table written below
    the first). One block when there is no blank line between non-blank lines."""
    blocks: list[list[str]] = [[]]
    for line in text.splitlines(keepends=True):
        if line.strip():
            blocks[-1].append(line)
        elif blocks[-1]:
            blocks.append([])
    return ["".join(b) for b in blocks if b]


# A number written with a decimal comma (and optional thousands dots): "7,61", "1.234,5", "12,5 %".
_DECIMAL_COMMA = r"^\s*[+-]?(?:\d+|\d{1,3}(?:\.\d{3})+),\d+\s*%?\s*$"
_MAX_HEADER_ROWS = 4


def _decimal_commas(raw: pl.DataFrame) -> pl.DataFrame:
    """Semicolon-separated files come from locales whose decimal mark is the comma (Excel in
    France or Germany writes "7,61"): read those numbers as 7.61, not as 761."""
    return raw.with_columns(
        pl.when(pl.col(c).str.contains(_DECIMAL_COMMA))
        .then(pl.col(c).str.replace_all(".", "", literal=True).str.replace(",", ".", literal=True))
        .otherwise(pl.col(c))
        for c in raw.columns
    )


def _header_levels(rows: list[tuple[Any, ...]]) -> tuple[list[str], int]:
    """(column names, rows they take) for a table with several header rows, as pandas writes a
    table whose columns have several levels (``crosstab(a, [b, c]).to_csv()``):

        sex,,F,F,M,M        <- one row per column level: level name, then the labels
        dead,,0,1,0,1
        g,y,,,,             <- the row-index names, the rest empty
        I,2001,27,26,26,27

    Read naively, the level rows become data ("0" and "1" look like counts). Here they are
    joined into one name per column ("F / 0"). pandas writes the row of index names only when
    the columns have two levels or more, so one level row followed by a mostly empty row (a
    section label) stays data. Anything else: the first row is the header."""
    if len(rows) < 4:
        return list(rows[0]), 1
    width = len(rows[0])
    filled = [[v is not None and str(v).strip() != "" for v in row] for row in rows]
    for k in range(2, min(_MAX_HEADER_ROWS, len(rows) - 1)):
        names = filled[k]
        m = names.index(False) if False in names else width
        if not 1 <= m < width or any(names[m:]) or not all(names[:m]):
            continue
        if not all(all(filled[j][m:]) for j in range(k)):
            continue  # every level row labels every data column
        if not any(filled[k + 1][m:]):
            continue  # the row after the names must hold data
        top = [str(v).strip() for v in rows[0][m:]]
        if len(set(top)) == len(top):
            continue  # an upper level spans several columns: its labels repeat
        header = [str(rows[k][i]).strip() for i in range(m)]
        header += [" / ".join(str(rows[j][i]).strip() for j in range(k)) for i in range(m, width)]
        return header, k + 1
    return list(rows[0]), 1


def delimited_cells(text: str, separator: str | None = None) -> tuple[pl.DataFrame, str]:
    """(all-text frame as the rules see it, separator): the separator sniffed when not given,
    header levels resolved; values exactly as written. ValueError with a clear message if the
    rows do not parse (ragged rows, unbalanced quotes). The checker's preview uses this too, so
    that a flagged (row, column) points at the cell the rule saw."""
    if separator is None:
        first = next((ln for ln in text.splitlines() if ln.strip()), "")
        counts = {sep: first.count(sep) for sep in (",", "\t", ";", "|")}
        separator = max(counts, key=lambda s: counts[s]) if any(counts.values()) else ","
    try:
        cells = pl.read_csv(
            io.StringIO(text),
            separator=separator,
            infer_schema=False,
            has_header=False,
            truncate_ragged_lines=False,
            raise_if_empty=True,
        )
    except Exception as exc:  # noqa: BLE001 (polars raises ComputeError, NoDataError, ...)
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"the rows cannot be read as a table: {message}") from None
    header, taken = _header_levels(cells.head(_MAX_HEADER_ROWS + 1).rows())
    raw = cells.slice(taken)
    raw.columns = unique_names(header)
    return raw, separator


def read_delimited(text: str, separator: str | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(typed frame, all-text frame) of CSV/TSV text (see ``delimited_cells``)."""
    from airlock.checks.cells import coerce_numbers

    raw, separator = delimited_cells(text, separator)
    if separator == ";":
        raw = _decimal_commas(raw)
    return coerce_numbers(raw), raw


def _zip_findings(data: bytes) -> tuple[list[Finding], set[str]]:
    findings: list[Finding] = []
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        infos = zf.infolist()
    names = {i.filename for i in infos}
    inflated = sum(i.file_size for i in infos)
    worst_ratio = max((i.file_size / max(i.compress_size, 1) for i in infos), default=0)
    if inflated > MAX_INFLATED_BYTES or worst_ratio > MAX_RATIO:
        raise ValueError(
            f"the workbook inflates to {inflated} bytes (ratio up to {worst_ratio:.0f}:1): "
            "refused as a zip bomb"
        )

    def fail(rule: str, message: str, parts: list[str]) -> None:
        findings.append(
            Finding(
                rule=rule,
                status=Status.FAIL,
                message=message,
                cells=[{"part": p} for p in parts[:20]],
                evidence={"parts": len(parts)},
            )
        )

    macros = [n for n in names if n.lower().endswith("vbaproject.bin") or "macrosheets/" in n]
    if macros:
        fail("spreadsheet.macros", "the workbook contains macros (VBA/XLM)", macros)
    links = [n for n in names if n.startswith("xl/externalLinks/") or n == "xl/connections.xml"]
    if links:
        fail(
            "spreadsheet.external_links",
            "the workbook links to external workbooks or data connections",
            links,
        )
    pivot_records = [n for n in names if n.startswith("xl/pivotCache/pivotCacheRecords")]
    if pivot_records:
        fail(
            "spreadsheet.pivot_cache",
            "the workbook stores the records behind a pivot table (pivotCacheRecords): a copy "
            "of the source rows; paste the pivot table as values",
            pivot_records,
        )
    unexpected = [i for i in infos if not i.is_dir() and not i.filename.startswith(_KNOWN_PARTS)]
    if unexpected:
        size = sum(i.file_size for i in unexpected)
        findings.append(
            Finding(
                rule="spreadsheet.unexpected_part",
                status=Status.FAIL if size > HIDDEN_BYTES_FAIL else Status.REVIEW,
                message=f"{len(unexpected)} part(s) of the workbook ({size} bytes) that no sheet "
                "shows (custom XML, files added to the archive): save the sheets as a new "
                "workbook",
                cells=[{"part": i.filename, "bytes": i.file_size} for i in unexpected[:20]],
                evidence={"parts": len(unexpected), "bytes": size},
            )
        )
    embedded = [n for n in names if n.startswith(("xl/embeddings/", "xl/activeX/"))]
    if embedded:
        fail(
            "spreadsheet.embedded_objects",
            "the workbook embeds objects (OLE/ActiveX) a checker cannot review",
            embedded,
        )
    return findings, names


# Parts an XLSX written by Excel, LibreOffice or openpyxl holds; the pivot caches, macros,
# links and embeddings among them have their own rules.
_KNOWN_PARTS = (
    *("[Content_Types].xml", "_rels/", "docProps/core.xml", "docProps/app.xml"),
    *("docProps/custom.xml", "docProps/thumbnail.", "xl/workbook.xml", "xl/_rels/"),
    *("xl/styles.xml", "xl/theme/", "xl/worksheets/", "xl/sharedStrings.xml", "xl/comments"),
    *("xl/threadedComments/", "xl/persons/", "xl/drawings/", "xl/charts/", "xl/media/"),
    *("xl/printerSettings/", "xl/calcChain.xml", "xl/tables/", "xl/metadata.xml"),
    *("xl/pivotTables/", "xl/pivotCache/", "xl/externalLinks/", "xl/connections.xml"),
    *("xl/embeddings/", "xl/activeX/", "xl/vbaProject.bin", "xl/macrosheets/"),
    *("xl/chartsheets/", "xl/queryTables/", "xl/volatileDependencies.xml", "xl/ctrlProps/"),
)
# Text a workbook carries outside its cells: document properties, constant defined names,
# data-validation lists, page headers and footers.
_HIDDEN_TEXT = re.compile(
    r"<(?:dc:title|dc:subject|dc:description|cp:keywords|cp:category)\b[^>]*>([^<]*)<"
    r"|<vt:lpwstr>([^<]*)<"
    r"|<definedName[^>]*>\s*([\"{][^<]*)<"
    r"|<formula1>\s*(&quot;[^<]*|\"[^<]*)<"
    r"|<(?:oddHeader|oddFooter|evenHeader|evenFooter|firstHeader|firstFooter)\b[^>]*>([^<]*)<"
)


def hidden_text(data: bytes) -> str:
    """Text of a workbook that no cell shows (see ``_HIDDEN_TEXT``), entities decoded and
    header/footer codes (&P, &"font") removed."""
    import html

    parts: list[str] = []
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for name in zf.namelist():
            if not name.endswith(".xml"):
                continue
            xml = zf.read(name).decode("utf-8", "replace")
            for m in _HIDDEN_TEXT.finditer(xml):
                value = html.unescape(next(g for g in m.groups() if g is not None))
                value = re.sub(r'&(?:"[^"]*"|[A-Za-z]|\d+)', " ", value).strip('"{} ')
                if value.strip():
                    parts.append(value.strip())
    return "\n".join(parts)


def _spread_merged_headers(ws: Any, rows: list[list[Any]]) -> None:
    """A label merged across columns in the top rows (pandas ``to_excel`` of multi-level
    columns) belongs to every column under it: copy it into each, for reading the header."""
    for merged in ws.merged_cells.ranges:
        top, left = merged.min_row - 1, merged.min_col - 1
        if top > _MAX_HEADER_ROWS or top >= len(rows) or merged.min_row != merged.max_row:
            continue
        row = rows[top]
        if left >= len(row):
            continue
        for col in range(left + 1, min(merged.max_col, len(row))):
            if row[col] is None:
                row[col] = row[left]


def check_xlsx(data: bytes, ctx: Any) -> tuple[list[Finding], list[str]]:
    """Findings for a workbook, and the classes of the tables found on its visible sheets."""
    import openpyxl

    from airlock.checks.cells import coerce_numbers
    from airlock.checks.context import MAX_CELLS_LISTED, check_dataframe
    from airlock.checks.text import check_text

    findings, _ = _zip_findings(data)
    try:
        wb = openpyxl.load_workbook(io.BytesIO(data), data_only=False, keep_links=True)
    except Exception as exc:  # noqa: BLE001 (openpyxl raises many types on corrupt parts)
        raise ValueError(f"the workbook cannot be opened: {exc}") from None
    classes: list[str] = []
    formulas: list[dict[str, Any]] = []
    external: list[dict[str, Any]] = []
    hidden_lines: list[dict[str, Any]] = []
    comments: list[dict[str, Any]] = []
    for ws in wb.worksheets:
        if ws.sheet_state != "visible":
            findings.append(
                Finding(
                    rule="spreadsheet.hidden_sheet",
                    status=Status.FAIL,
                    message=f"sheet {ws.title!r} is {ws.sheet_state}: a checker would not see it",
                    cells=[{"sheet": ws.title}],
                )
            )
        for key, dim in ws.row_dimensions.items():
            if dim.hidden:
                hidden_lines.append({"sheet": ws.title, "row": key})
        for key, dim in ws.column_dimensions.items():
            if dim.hidden:
                hidden_lines.append({"sheet": ws.title, "column": key})
        rows: list[list[Any]] = []
        for row in ws.iter_rows():
            values = []
            for cell in row:
                value = cell.value
                if cell.data_type == "f" or (isinstance(value, str) and value.startswith("=")):
                    where = {"sheet": ws.title, "cell": cell.coordinate, "value": str(value)[:80]}
                    (external if _EXTERNAL_FORMULA.search(str(value)) else formulas).append(where)
                    value = None  # the stored formula is not the value a reader would see
                if cell.comment is not None:
                    comments.append({"sheet": ws.title, "cell": cell.coordinate})
                    findings += check_text(cell.comment.text or "", ctx.policy, {"sheet": ws.title})
                values.append(value)
            rows.append(values)
        while rows and all(v is None for v in rows[-1]):
            rows.pop()
        rows = [r for r in rows if any(v is not None for v in r)]
        if not rows:
            continue
        _spread_merged_headers(ws, rows)
        names, taken = _header_levels([tuple(r) for r in rows[: _MAX_HEADER_ROWS + 1]])
        header, body = unique_names(names), rows[taken:]
        raw = pl.DataFrame(
            {n: [None if r[i] is None else str(r[i]) for r in body] for i, n in enumerate(header)},
            schema={n: pl.String for n in header},
        )
        output_class, found = check_dataframe(
            coerce_numbers(raw), ctx, {"sheet": ws.title}, raw=raw
        )
        classes.append(output_class)
        findings += found
    if external:
        findings.append(
            Finding(
                rule="spreadsheet.external_links",
                status=Status.FAIL,
                message=f"{len(external)} formula(s) refer to other files, URLs or programs",
                cells=external[:MAX_CELLS_LISTED],
                evidence={"formulas": len(external)},
            )
        )
    if formulas:
        findings.append(
            Finding(
                rule="spreadsheet.formula",
                status=Status.REVIEW,
                message=f"{len(formulas)} formula cell(s): their values are computed when opened, "
                "not stored; replace formulas with values",
                cells=formulas[:MAX_CELLS_LISTED],
                evidence={"formulas": len(formulas)},
            )
        )
    if hidden_lines:
        findings.append(
            Finding(
                rule="spreadsheet.hidden_cells",
                status=Status.REVIEW,
                message=f"{len(hidden_lines)} hidden row(s)/column(s): unhide them so a checker "
                "sees every cell",
                cells=hidden_lines[:MAX_CELLS_LISTED],
            )
        )
    hidden = hidden_text(data)
    if hidden:
        findings += check_text(hidden, ctx.policy, {"hidden": True})
    if comments:
        findings.append(
            Finding(
                rule="spreadsheet.comments",
                status=Status.REVIEW,
                message=f"{len(comments)} cell comment(s) a checker may not see",
                cells=comments[:MAX_CELLS_LISTED],
            )
        )
    return findings, classes

"""CSV and XLSX: what a spreadsheet hides fails; every visible sheet is a table."""

from __future__ import annotations

import io
import sys
import zipfile
from pathlib import Path

import openpyxl
import pytest

from airlock.checks.context import CheckContext, formula_injection
from airlock.checks.engine import check_file
from airlock.checks.findings import Status
from airlock.checks.spreadsheets import check_xlsx, read_delimited
from airlock.policy import load_policy

sys.path.insert(0, str(Path(__file__).parent / "corpus" / "files"))
import corpus  # noqa: E402

POLICY = load_policy()
CTX = CheckContext(policy=POLICY)


@pytest.mark.parametrize(
    ("cell", "flagged"),
    [
        ("=1+1", True),
        ("@SUM(A1)", True),
        ("+cmd|' /C calc'!A0", True),
        ("-2+3", True),
        ("\t=1", True),
        ("-5", False),
        ("+3.5", False),
        ("-1,234", False),
        ("-", False),
        ("--", False),
        ("north", False),
        ("", False),
    ],
)
def test_formula_injection(cell, flagged):
    _, raw = read_delimited(f'label,x\n"{cell}",1\n')
    assert bool(formula_injection(raw)) is flagged


def test_negative_numbers_are_numbers():
    df, _ = read_delimited("group,change\nA,-5\nB,12\n")
    assert df.get_column("change").to_list() == [-5, 12]


def test_semicolon_and_tab_separators():
    df, _ = read_delimited("a;b\n1;2\n")
    assert df.columns == ["a", "b"]
    df, _ = read_delimited("a\tb\n1\t2\n")
    assert df.columns == ["a", "b"]


def test_duplicate_and_empty_headers_get_names():
    df, _ = read_delimited("a,a,\n1,2,3\n")
    assert len(set(df.columns)) == 3


def test_ragged_csv_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot be read as a table"):
        read_delimited('a,b\n1,2,3,4\n"open quote\n')


def test_each_visible_sheet_is_checked_with_its_name():
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.title = "by site"
    ws.append(["site", "count"])
    ws.append(["north", 143])
    ws.append(["south", 3])
    buf = io.BytesIO()
    wb.save(buf)
    findings, classes = check_xlsx(buf.getvalue(), CTX)
    small = next(f for f in findings if f.rule == "frequency.min_cell_count")
    assert small.cells[0]["sheet"] == "by site"
    assert classes == ["frequency_table"]


def test_very_hidden_sheet_and_hidden_rows():
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(["site", "count"])
    ws.append(["north", 143])
    ws.append(["south", 121])
    ws.row_dimensions[3].hidden = True
    ws2 = wb.create_sheet("secret")
    ws2.sheet_state = "veryHidden"
    ws.cell(row=2, column=2).comment = openpyxl.comments.Comment("3 children", "me")
    buf = io.BytesIO()
    wb.save(buf)
    rules = {f.rule for f in check_xlsx(buf.getvalue(), CTX)[0]}
    assert {"spreadsheet.hidden_sheet", "spreadsheet.hidden_cells", "spreadsheet.comments"} <= rules
    assert "text.small_count" in rules


def test_zip_bomb_workbook_is_refused(tmp_path):
    data = corpus.xlsx_bytes("safe")
    out = io.BytesIO()
    with (
        zipfile.ZipFile(io.BytesIO(data)) as src,
        zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst,
    ):
        for item in src.infolist():
            dst.writestr(item, src.read(item.filename))
        dst.writestr("xl/media/pad.bin", b"\x00" * (50 * 1024 * 1024))
    f = tmp_path / "bomb.xlsx"
    f.write_bytes(out.getvalue())
    report = check_file(f, POLICY)
    assert report.status == Status.FAIL
    assert "zip bomb" in report.findings[0].message


def test_truncated_workbook_is_unreadable(tmp_path):
    f = tmp_path / "cut.xlsx"
    f.write_bytes(corpus.xlsx_bytes("safe")[:500])
    report = check_file(f, POLICY)
    assert report.status == Status.FAIL


def test_external_link_parts(tmp_path):
    data = corpus.xlsx_bytes("safe")
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.infolist():
            dst.writestr(item, src.read(item.filename))
        dst.writestr("xl/externalLinks/externalLink1.xml", b"<externalLink/>")
    rules = {f.rule for f in check_xlsx(out.getvalue(), CTX)[0]}
    assert "spreadsheet.external_links" in rules

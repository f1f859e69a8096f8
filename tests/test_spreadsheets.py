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
import file_corpus as corpus  # noqa: E402

POLICY = load_policy()
CTX = CheckContext(policy=POLICY)


@pytest.mark.parametrize(
    ("cell", "flagged"),
    [
        ("=1+1", True),
        ("@SUM(A1)", True),
        ("+cmd|' /C calc'!A0", True),
        ("-2+3+cmd|' /C calc'!A0", True),
        ("-SUM(A1:A3)", True),
        ("-0.52 (-0.81 to -0.23)", False),
        ("+/-", False),
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


def test_semicolon_files_read_decimal_commas_as_decimals():
    df, raw = read_delimited("group;mean;share\nI;7,61;12,5 %\nII;1.234,5;3,0 %\nIII;8;4 %\n")
    assert df.get_column("mean").to_list() == [7.61, 1234.5, 8.0]
    assert raw.get_column("share").to_list() == ["12.5 %", "3.0 %", "4 %"]
    # with commas as separators, a comma inside a quoted number is a thousands separator
    df, _ = read_delimited('group,n\nI,"1,234"\nII,12\n')
    assert df.get_column("n").to_list() == [1234, 12]


def test_pandas_multi_level_column_headers_become_one_name_per_column():
    import pandas as pd

    frame = pd.DataFrame(
        {
            "g": ["I", "I", "II", "II", "I"],
            "y": [2001, 2002, 2001, 2002, 2001],
            "sex": ["F", "M", "F", "M", "M"],
            "dead": [0, 1, 1, 0, 0],
        }
    )
    text = pd.crosstab([frame.g, frame.y], [frame.sex, frame.dead]).to_csv()
    assert text.splitlines()[2].startswith("g,y,,")  # the layout this reader must undo
    df, _ = read_delimited(text)
    assert df.columns == ["g", "y", "F / 0", "F / 1", "M / 0", "M / 1"]
    assert df.height == 4 and df.get_column("F / 0").to_list() == [1, 0, 0, 0]
    assert df.get_column("F / 1").to_list() == [0, 0, 1, 0]
    # unnamed upper level (groupby().agg().unstack())
    text = frame.groupby(["g", "sex"]).y.agg(["count", "mean"]).unstack().to_csv()
    df, _ = read_delimited(text)
    assert df.columns == ["g", "count / F", "count / M", "mean / F", "mean / M"]
    assert df.get_column("g").to_list() == ["I", "II"]


@pytest.mark.parametrize(
    "text",
    [
        "group,n\nBoys,\nI,12\nII,15\n",  # a section label row is data, not a header level
        "a,b,c\nx,1,2\ny,,\nz,3,4\n",  # a row with gaps further down
        "a,b\n1,2\n",
    ],
)
def test_ordinary_tables_keep_their_first_row_as_the_header(text):
    df, raw = read_delimited(text)
    assert df.columns == text.splitlines()[0].split(",")
    assert raw.height == len(text.splitlines()) - 1


def test_multi_level_header_table_is_checked_on_its_real_cells(tmp_path):
    from airlock.checks.engine import check_file
    from airlock.policy import load_policy

    text = "sex,F,F,M,M\ndead,0,1,0,1\ngroup,,,,\nI,38,50,35,47\nII,17,17,25,18\nIV,7,10,11,9\n"
    path = tmp_path / "t.csv"
    path.write_text(text)
    result = check_file(path, load_policy())
    rules_hit = {f.rule: f for f in result.findings}
    assert set(rules_hit) == {"frequency.min_cell_count"}
    cells = rules_hit["frequency.min_cell_count"].cells
    assert {(c["column"], c["value"]) for c in cells} == {("F / 0", 7), ("M / 1", 9)}


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


def test_comment_lines_above_the_header_are_prose(tmp_path):
    f = tmp_path / "t.csv"
    f.write_text(
        "# Table 1: counts by site, 2 sites\n# 3 children excluded\nsite,count\nnorth,143\n"
        "south,121\n"
    )
    report = check_file(f, POLICY)
    rules = {x.rule for x in report.findings}
    assert "text.small_count" in rules and "file.unreadable" not in rules


def test_xlsx_with_merged_multi_level_headers_is_checked_on_its_real_cells(tmp_path):
    """pandas ``to_excel`` of multi-level columns merges the upper labels across columns."""
    import pandas as pd

    from airlock.checks.engine import check_file
    from airlock.policy import load_policy

    frame = pd.DataFrame(
        [[32, 5, 26, 17], [39, 16, 21, 14]],
        index=pd.Index(["I", "II"], name="stage"),
        columns=pd.MultiIndex.from_product([["F", "M"], [0, 1]], names=["sex", "dead"]),
    )
    path = tmp_path / "t.xlsx"
    frame.to_excel(path)
    report = check_file(path, load_policy())
    by_rule = {f.rule: f for f in report.findings}
    assert set(by_rule) == {"frequency.min_cell_count"}, report.findings
    cells = by_rule["frequency.min_cell_count"].cells
    assert [(c["column"], c["value"]) for c in cells] == [("F / 1", 5)]

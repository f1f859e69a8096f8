"""Fuzzing: no input makes a parser crash, and broken or hostile inputs never pass."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from airlock.checks.engine import check_file
from airlock.checks.findings import Status
from airlock.policy import load_policy

sys.path.insert(0, str(Path(__file__).parent / "corpus" / "files"))
import corpus  # noqa: E402

POLICY = load_policy()
FUZZ = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
NAMES = ["x.csv", "x.png", "x.jpg", "x.svg", "x.ipynb", "x.html", "x.xlsx", "x.txt", "x.json"]
SEEDS = {
    "x.png": corpus.png_bytes(),
    "x.jpg": corpus.jpeg_bytes(),
    "x.svg": corpus.SAFE_SVG.encode(),
    "x.ipynb": corpus.notebook(
        [corpus.code_cell("df", [corpus.result({"text/html": corpus.HTML_SAFE})])]
    ).encode(),
    "x.html": corpus.HTML_SAFE.encode(),
    "x.xlsx": corpus.xlsx_bytes("safe"),
    "x.csv": corpus.SAFE_CSV.encode(),
    "x.json": json.dumps([{"region": "north", "count": 143}]).encode(),
}


def run(tmp_path: Path, name: str, data: bytes):
    f = tmp_path / name
    f.write_bytes(data)
    report = check_file(f, POLICY)  # must not raise
    assert report.status in set(Status)
    for finding in report.findings:
        assert finding.message
    json.dumps(report.public_dict())
    return report


@FUZZ
@given(data=st.binary(max_size=2048), name=st.sampled_from(NAMES))
def test_random_bytes_never_crash(tmp_path, data, name):
    report = run(tmp_path, name, data)
    if b"\x00" in data:
        assert report.status != Status.PASS


@FUZZ
@given(
    name=st.sampled_from(sorted(SEEDS)),
    cut=st.floats(min_value=0.0, max_value=1.0),
    flips=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)), max_size=4),
)
def test_mutated_valid_files_never_crash(tmp_path, name, cut, flips):
    data = bytearray(SEEDS[name])
    for where, xor in flips:
        i = min(int(where * len(data)), len(data) - 1)
        data[i] ^= xor
    data = bytes(data[: max(1, int(cut * len(data)))]) if cut < 0.999 else bytes(data)
    report = run(tmp_path, name, data)
    if name in {"x.png", "x.jpg", "x.xlsx"} and data != SEEDS[name]:
        # checksummed or structured binaries: a damaged copy never passes
        if name == "x.png" or len(data) < len(SEEDS[name]):
            assert report.status != Status.PASS


@FUZZ
@given(text=st.text(max_size=400), name=st.sampled_from(["x.txt", "x.md", "x.log", "x.csv"]))
def test_random_text_never_crashes(tmp_path, text, name):
    run(tmp_path, name, text.encode("utf-8", "surrogatepass"))


@FUZZ
@given(
    doc=st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.text(max_size=8), children, max_size=4)
        ),
        max_leaves=30,
    )
)
def test_arbitrary_json_and_notebook_shapes(tmp_path, doc):
    run(tmp_path, "x.json", json.dumps(doc).encode())
    run(tmp_path, "x.ipynb", json.dumps({"cells": [doc], "nbformat": 4}).encode())
    run(
        tmp_path,
        "y.ipynb",
        json.dumps({"cells": [{"cell_type": "code", "outputs": [doc]}], "nbformat": 4}).encode(),
    )


@FUZZ
@given(
    cells=st.lists(st.lists(st.text(max_size=12), min_size=2, max_size=2), max_size=8),
)
def test_arbitrary_csv_cells(tmp_path, cells):
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["label", "count"])
    w.writerows(cells)
    run(tmp_path, "x.csv", buf.getvalue().encode("utf-8", "surrogatepass"))


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("deep.json", b"[" * 100_000 + b"]" * 100_000),
        ("deep.ipynb", b'{"cells": [' + b"[" * 100_000 + b"]" * 100_000 + b'], "nbformat": 4}'),
        ("deep.html", b"<div>" * 100_000 + b"x" + b"</div>" * 100_000),
        ("deep.svg", corpus.SVG_HEAD.encode() + b">" + b"<g>" * 100_000 + b"</svg>"),
        (
            "wide.csv",
            b",".join(b"c%d" % i for i in range(20_000)) + b"\n" + b"1," * 19_999 + b"1\n",
        ),
        ("nul.csv", b"a,b\n1,\x002\n"),
        ("bom.csv", b"\xef\xbb\xbfregion,count\nnorth,3\n"),
        ("crlf.csv", b"region,count\r\nnorth,3\r\n"),
    ],
)
def test_hostile_shapes(tmp_path, name, data):
    report = run(tmp_path, name, data)
    assert report.status != Status.PASS

"""A released file keeps its workspace name, which the sandbox chose: the download's
Content-Disposition header must carry it without letting it end the header or add one."""

from __future__ import annotations

from pathlib import Path

import pytest

from airlock.service.app import _attachment
from airlock.storage import clean_relative_path


@pytest.mark.parametrize(
    "name",
    [
        'a"b.csv',
        "a\r\nSet-Cookie: airlock=x.csv",
        "a\nb.csv",
        "a;filename=evil.exe",
        "tabl\u00e9 \u2014 \u4e2d.csv",
        "..\u2215etc\u2215passwd",  # a Unicode division slash, not '/'
        "x\x01y\x7f.csv",
    ],
)
def test_hostile_names_stay_inside_one_header(tmp_path: Path, name: str) -> None:
    rel = clean_relative_path(f"outputs/{name}")  # what the workspace path check lets through
    assert rel.name == name
    (tmp_path / "f").write_bytes(b"x")
    with open(tmp_path / "f", "rb") as fh:
        headers = _attachment(fh, rel.name).headers
    value = headers["content-disposition"]
    assert value.isascii() and value.isprintable()  # no CR/LF, no control bytes, no raw Unicode
    assert value.startswith("attachment; filename")
    assert value.count(";") == 1 and '"' not in value.split("filename", 1)[1].strip('="')
    assert [k for k in headers if k.lower() == "set-cookie"] == []

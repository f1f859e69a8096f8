"""Figures: hidden metadata, appended data, hostile SVG; strip_metadata writes a clean copy."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
from PIL import Image

from airlock.checks.engine import check_file
from airlock.checks.figures import (
    FigureError,
    check_raster,
    check_svg,
    jpeg_metadata,
    png_metadata,
    strip_metadata,
)
from airlock.checks.findings import Status
from airlock.policy import load_policy

sys.path.insert(0, str(Path(__file__).parent / "corpus" / "files"))
import corpus  # noqa: E402

POLICY = load_policy()


def pixels(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB").tobytes()


def test_png_text_chunks_are_read_and_reported():
    data = corpus.png_bytes(text={"Comment": "north 3", "Software": "matplotlib 3.9"})
    meta = png_metadata(data)
    keys = {i.get("key"): i for i in meta.items}
    assert keys["Comment"]["text"] == "north 3" and not keys["Comment"]["benign"]
    assert keys["Software"]["benign"]
    findings = check_raster(data, "png")
    assert [f.rule for f in findings] == ["figure.metadata"]
    assert findings[0].status == Status.REVIEW
    assert findings[0].cells[0]["value"] == "north 3"


def test_a_long_benign_key_is_not_benign():
    data = corpus.png_bytes(text={"Software": "x" * 5000})
    findings = check_raster(data, "png")
    assert findings[0].status == Status.FAIL


@pytest.mark.parametrize("ctype", [b"zTXt", b"iTXt"])
def test_compressed_text_is_decompressed(ctype):
    import zlib

    text = b"age,site\n" + b"3,north\n" * 300
    if ctype == b"zTXt":
        body = b"data\x00\x00" + zlib.compress(text)
    else:
        body = b"data\x00\x01\x00en\x00\x00" + zlib.compress(text)
    meta = png_metadata(corpus.png_with_chunk(ctype, body))
    assert meta.items[0]["bytes"] == len(text)
    assert check_raster(corpus.png_with_chunk(ctype, body), "png")[0].status == Status.FAIL


def test_jpeg_segments():
    meta = jpeg_metadata(corpus.jpeg_bytes(exif=True, comment=b"3 deaths"))
    kinds = {i["kind"] for i in meta.items}
    assert {"EXIF", "COM"} <= kinds
    assert meta.appended == 0
    assert jpeg_metadata(corpus.jpeg_bytes() + b"tail").appended == 4


@pytest.mark.parametrize(
    "data",
    [
        corpus.png_bytes(text={"Comment": "x"}) + b"APPENDED",
        corpus.png_with_chunk(b"eXIf", b"MM\x00*" + b"\x00" * 30),
        corpus.png_with_chunk(b"prVt", b"private data"),
    ],
)
def test_strip_metadata_png_keeps_pixels_and_drops_the_rest(tmp_path, data):
    src, dst = tmp_path / "in.png", tmp_path / "out.png"
    src.write_bytes(data)
    removed = strip_metadata(src, dst)
    assert removed
    clean = dst.read_bytes()
    assert pixels(clean) == pixels(corpus.png_bytes())
    assert png_metadata(clean).items == [] and png_metadata(clean).appended == 0
    assert check_raster(clean, "png") == []


def test_strip_metadata_jpeg_is_lossless(tmp_path):
    src, dst = tmp_path / "in.jpg", tmp_path / "out.jpg"
    src.write_bytes(corpus.jpeg_bytes(exif=True, comment=b"note") + b"trailing")
    removed = strip_metadata(src, dst)
    assert {"APP1", "COM"} <= set(removed)
    assert pixels(dst.read_bytes()) == pixels(src.read_bytes())
    assert check_raster(dst.read_bytes(), "jpeg") == []


def test_strip_metadata_svg(tmp_path):
    src, dst = tmp_path / "in.svg", tmp_path / "out.svg"
    src.write_text(f"{corpus.SVG_HEAD}><metadata>who</metadata><rect width='3'/></svg>")
    assert strip_metadata(src, dst) == ["metadata"]
    assert check_svg(dst.read_text()) == []


def test_strip_metadata_refuses_what_is_not_a_figure(tmp_path):
    src = tmp_path / "x.png"
    src.write_text("a,b\n1,2\n")
    with pytest.raises(FigureError):
        strip_metadata(src, tmp_path / "y.png")


def test_decompression_bomb_is_refused():
    im = Image.new("1", (12000, 12000))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    with pytest.raises(FigureError, match="pixels|bomb"):
        check_raster(buf.getvalue(), "png")


@pytest.mark.parametrize(
    ("svg", "rule"),
    [
        ("<script href='x.js'/>", "svg.script"),
        ("<a href='javascript:alert(1)'><rect/></a>", "svg.external_reference"),
        ("<set attributeName='href' to='javascript:alert(1)'/>", "svg.script"),
        ("<rect onclick='x()'/>", "svg.event_handler"),
        ("<g><g><g><foreignObject/></g></g></g>", "svg.foreign_object"),
        ("<style>@import url(http://x.example/a.css);</style>", "svg.external_reference"),
        ("<use xlink:href='other.svg#a'/>", "svg.external_reference"),
        ("<image href='  data:image/png;base64,AAAA'/>", "svg.external_reference"),
    ],
)
def test_hostile_svg_fails(svg, rule):
    findings = check_svg(f"{corpus.SVG_HEAD}>{svg}</svg>")
    assert rule in {f.rule for f in findings}
    assert all(f.status == Status.FAIL for f in findings if f.rule == rule)


def test_in_document_references_are_fine():
    svg = (
        f"{corpus.SVG_HEAD}><defs><clipPath id='c'><rect/></clipPath></defs>"
        "<rect clip-path='url(#c)' style='fill: url(#g)'/><use xlink:href='#c'/></svg>"
    )
    assert check_svg(svg) == []


def test_deeply_nested_svg_does_not_crash(tmp_path):
    f = tmp_path / "deep.svg"
    f.write_text(corpus.SVG_HEAD + ">" + "<g>" * 50_000 + "</g>" * 50_000 + "</svg>")
    report = check_file(f, POLICY)
    assert report.status != Status.PASS


def test_a_figure_inside_its_table_directory_is_checked_with_the_table(tmp_path):
    (tmp_path / "km.png").write_bytes(corpus.png_bytes())
    (tmp_path / "km.csv").write_text(corpus.SAFE_CSV)
    report = check_file(tmp_path / "km.png", POLICY)
    assert report.status == Status.PASS
    assert [f.rule for f in report.findings] == ["figure.table_checked"]

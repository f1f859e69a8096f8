"""Figures: PNG, JPEG and SVG.

What a checker cannot see in a picture is what this module looks for: metadata and embedded text
(PNG tEXt/zTXt/iTXt/eXIf, JPEG EXIF/XMP/COM/APPn), data hidden after the end of the image, and,
in SVG, scripts, event handlers, foreignObject and references to anything outside the file.
``strip_metadata`` writes a clean copy of a figure and says what it removed.

PNG chunks and JPEG segments are walked here rather than through Pillow because Pillow hides
what matters (it ignores bytes after IEND/EOI and unknown chunks); Pillow still decodes the
pixels to prove the image is whole, with a pixel limit against decompression bombs.
"""

from __future__ import annotations

import struct
import warnings
import zlib
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException

from airlock.checks.findings import Finding, Status

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PIXELS = 50_000_000  # larger images are refused: a decompression bomb or not a figure
HIDDEN_BYTES_FAIL = 1024  # metadata text beyond this is a payload, not a caption: fail
_TEXT_CHUNKS = {b"tEXt", b"zTXt", b"iTXt"}
# Ancillary PNG chunks that only describe how to display the pixels.
_DISPLAY_CHUNKS = {
    b"PLTE",
    b"tRNS",
    b"gAMA",
    b"cHRM",
    b"sRGB",
    b"sBIT",
    b"bKGD",
    b"pHYs",
    b"hIST",
}
_CRITICAL = {b"IHDR", b"PLTE", b"IDAT", b"IEND"}
# Text keys that image libraries write on their own (matplotlib: Software); short values only.
_BENIGN_KEYS = {"software", "creation time", "dpi"}
_BENIGN_MAX = 200


class FigureError(ValueError):
    """The figure is malformed (truncated, corrupt, not what it claims)."""


@dataclass
class Metadata:
    """What a figure carries beside its pixels."""

    items: list[dict[str, Any]] = field(default_factory=list)  # {'kind', 'key', 'bytes', 'text'}
    appended: int = 0  # bytes after the end of the image

    @property
    def hidden_bytes(self) -> int:
        return sum(i["bytes"] for i in self.items if not i.get("benign")) + self.appended


def _zdecompress(data: bytes, limit: int = 1 << 20) -> bytes:
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, limit)
    except zlib.error as exc:
        raise FigureError(f"corrupt compressed text chunk: {exc}") from None
    return out


def png_chunks(data: bytes) -> tuple[list[tuple[bytes, bytes, int]], int]:
    """The chunks (type, data, offset) of a PNG, and the offset just after IEND."""
    if not data.startswith(PNG_SIGNATURE):
        raise FigureError("not a PNG (bad signature)")
    pos = len(PNG_SIGNATURE)
    chunks = []
    while True:
        if pos + 8 > len(data):
            raise FigureError("truncated PNG: no IEND chunk")
        length, ctype = struct.unpack(">I4s", data[pos : pos + 8])
        end = pos + 12 + length
        if end > len(data):
            raise FigureError(f"truncated PNG: chunk {ctype!r} at byte {pos} runs past the end")
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[end - 4 : end])
        if zlib.crc32(ctype + body) & 0xFFFFFFFF != crc:
            raise FigureError(f"corrupt PNG: bad checksum on chunk {ctype!r} at byte {pos}")
        chunks.append((ctype, body, pos))
        pos = end
        if ctype == b"IEND":
            return chunks, pos


def _png_text(ctype: bytes, body: bytes) -> tuple[str, str]:
    key, _, rest = body.partition(b"\x00")
    if ctype == b"tEXt":
        text = rest
    elif ctype == b"zTXt":
        text = _zdecompress(rest[1:])
    else:  # iTXt: compression flag, method, language\0, translated keyword\0, text
        flag = rest[:1]
        parts = rest[2:].split(b"\x00", 2)
        text = parts[2] if len(parts) == 3 else b""
        if flag == b"\x01":
            text = _zdecompress(text)
    return key.decode("latin-1"), text.decode("utf-8", "replace")


def png_metadata(data: bytes) -> Metadata:
    chunks, end = png_chunks(data)
    meta = Metadata(appended=len(data) - end)
    for ctype, body, pos in chunks:
        if ctype in _CRITICAL or ctype in _DISPLAY_CHUNKS or ctype == b"tIME":
            continue
        item: dict[str, Any] = {"kind": ctype.decode("latin-1"), "bytes": len(body), "at": pos}
        if ctype in _TEXT_CHUNKS:
            key, text = _png_text(ctype, body)
            item.update(key=key, text=text[:200], bytes=len(text.encode()))
            item["benign"] = key.lower() in _BENIGN_KEYS and len(text) <= _BENIGN_MAX
        elif ctype[0:1].isupper():
            raise FigureError(f"PNG has an unknown critical chunk {ctype!r}")
        meta.items.append(item)
    return meta


def _jpeg_segments(data: bytes) -> tuple[list[tuple[int, bytes, int]], int]:
    """(marker, payload, offset) of each JPEG segment, and the offset just after EOI."""
    if not data.startswith(b"\xff\xd8"):
        raise FigureError("not a JPEG (no SOI marker)")
    pos = 2
    segments = []
    n = len(data)
    while True:
        if pos + 2 > n:
            raise FigureError("truncated JPEG: no EOI marker")
        if data[pos] != 0xFF:
            raise FigureError(f"corrupt JPEG: expected a marker at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:
            return segments, pos + 2
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            pos += 2
            continue
        if pos + 4 > n:
            raise FigureError("truncated JPEG segment header")
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if length < 2 or pos + 2 + length > n:
            raise FigureError(f"truncated JPEG: segment at byte {pos} runs past the end")
        segments.append((marker, data[pos + 4 : pos + 2 + length], pos))
        pos += 2 + length
        if marker == 0xDA:  # start of scan: entropy-coded data until the next real marker
            while True:
                nxt = data.find(b"\xff", pos)
                if nxt < 0 or nxt + 1 >= n:
                    raise FigureError("truncated JPEG: scan data without EOI")
                follow = data[nxt + 1]
                if follow == 0x00 or 0xD0 <= follow <= 0xD7 or follow == 0xFF:
                    pos = nxt + (2 if follow != 0xFF else 1)
                    continue
                pos = nxt
                break


def jpeg_metadata(data: bytes) -> Metadata:
    segments, end = _jpeg_segments(data)
    meta = Metadata(appended=len(data) - end)
    for marker, body, pos in segments:
        if marker == 0xE0 and body.startswith((b"JFIF\x00", b"JFXX\x00")):
            continue
        if marker == 0xEE and body.startswith(b"Adobe"):
            continue  # colour transform flag written by encoders
        if 0xE0 <= marker <= 0xEF or marker == 0xFE:
            if marker == 0xFE:
                kind = "COM"
            elif body.startswith(b"Exif\x00"):
                kind = "EXIF"
            elif body.startswith(b"http://ns.adobe.com/xap/"):
                kind = "XMP"
            elif body.startswith(b"ICC_PROFILE"):
                kind = "ICC"
            else:
                kind = f"APP{marker - 0xE0}"
            text = body.decode("utf-8", "replace")[:200] if kind in {"COM", "XMP"} else ""
            item = {"kind": kind, "bytes": len(body), "at": pos, "text": text}
            item["benign"] = kind == "ICC"
            meta.items.append(item)
    return meta


def hidden_texts(data: bytes, kind: str) -> list[str]:
    """Everything a PNG/JPEG carries beside its pixels, as text (for the identifier search):
    text chunks decompressed, other ancillary chunks and APPn/COM segments, trailing bytes."""
    texts: list[str] = []
    if kind == "png":
        chunks, end = png_chunks(data)
        for ctype, body, _ in chunks:
            if ctype in _CRITICAL:
                continue
            if ctype in _TEXT_CHUNKS:
                texts.append("\n".join(_png_text(ctype, body)))
            else:
                texts.append(body.decode("latin-1"))
    else:
        segments, end = _jpeg_segments(data)
        texts += [body.decode("latin-1") for marker, body, _ in segments if marker >= 0xE0]
    texts.append(data[end:].decode("latin-1"))
    return texts


def _decode_pixels(data: bytes, kind: str) -> tuple[int, int]:
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(BytesIO(data)) as im:
                width, height = im.size
                if width * height > MAX_PIXELS:
                    raise FigureError(f"{width}x{height} pixels is more than {MAX_PIXELS}")
                im.load()
    except FigureError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise FigureError(f"decompression bomb: {exc}") from None
    except Exception as exc:  # noqa: BLE001 (Pillow raises many types for corrupt images)
        raise FigureError(f"the {kind.upper()} image cannot be decoded: {exc}") from None
    return width, height


def metadata_findings(meta: Metadata, location: dict[str, Any] | None = None) -> list[Finding]:
    location = location or {}
    findings = []
    if meta.appended:
        findings.append(
            Finding(
                rule="figure.appended_data",
                status=Status.FAIL,
                message=f"{meta.appended} byte(s) of data are hidden after the end of the image; "
                "export the figure again (or use strip_metadata)",
                cells=[dict(location)] if location else [],
                evidence={"bytes": meta.appended},
            )
        )
    flagged = [i for i in meta.items if not i.get("benign")]
    if flagged:
        hidden = sum(i["bytes"] for i in flagged)
        status = Status.FAIL if hidden > HIDDEN_BYTES_FAIL else Status.REVIEW
        kinds = sorted({i["kind"] for i in flagged})
        findings.append(
            Finding(
                rule="figure.metadata",
                status=status,
                message=f"the figure carries {hidden} byte(s) of metadata/embedded text "
                f"({', '.join(kinds)}) that a checker does not see; strip it (strip_metadata)"
                + (" — too much to be a caption" if status == Status.FAIL else ""),
                cells=[
                    {
                        **location,
                        "kind": i["kind"],
                        **({"key": i["key"]} if "key" in i else {}),
                        "value": i.get("text", "")[:120],
                    }
                    for i in flagged[:20]
                ],
                evidence={"bytes": hidden, "items": len(flagged)},
            )
        )
    return findings


def check_raster(data: bytes, kind: str, location: dict[str, Any] | None = None) -> list[Finding]:
    """A PNG or JPEG: it must decode whole, and carry nothing but pixels."""
    meta = png_metadata(data) if kind == "png" else jpeg_metadata(data)
    _decode_pixels(data, kind)
    return metadata_findings(meta, location)


# ------------------------------------------------------------------------------------------ SVG

_SVG_FORBIDDEN_ELEMENTS = {
    "script": "svg.script",
    "foreignobject": "svg.foreign_object",
    "iframe": "svg.foreign_object",
    "object": "svg.foreign_object",
    "embed": "svg.foreign_object",
    "handler": "svg.script",
    "listener": "svg.script",
}


def _local(name: str) -> str:
    return name.rsplit("}", 1)[-1].lower() if isinstance(name, str) else ""


def _parse_svg(text: str) -> Any:
    try:
        return SafeET.fromstring(text, forbid_dtd=False, forbid_entities=True, forbid_external=True)
    except DefusedXmlException as exc:
        raise FigureError(
            f"SVG declares entities or external resources ({type(exc).__name__}): refused "
            "(entity expansion such as 'billion laughs' could exhaust the checker)"
        ) from None
    except SafeET.ParseError as exc:
        raise FigureError(f"SVG is not well-formed XML: {exc}") from None


def check_svg(
    text: str, location: dict[str, Any] | None = None, policy: Any = None
) -> list[Finding]:
    """Scripts, handlers, foreignObject, external references fail; metadata is flagged."""
    import re

    location = location or {}
    root = _parse_svg(text)
    if _local(root.tag) != "svg":
        raise FigureError(f"the root element is <{_local(root.tag)}>, not <svg>")
    hits: dict[str, list[dict[str, Any]]] = {}

    def hit(rule: str, **cell: Any) -> None:
        hits.setdefault(rule, []).append({**location, **cell})

    external_url = re.compile(r"url\(\s*['\"]?\s*(?!#)[^)]*\)|@import", re.IGNORECASE)
    metadata = 0
    for el in root.iter():
        tag = _local(el.tag)
        if tag in _SVG_FORBIDDEN_ELEMENTS:
            hit(_SVG_FORBIDDEN_ELEMENTS[tag], element=tag)
        if tag == "metadata":
            metadata += 1
        if tag == "style" and el.text and external_url.search(el.text):
            hit("svg.external_reference", element="style", value=el.text[:120])
        for attr, value in el.attrib.items():
            name = _local(attr)
            val = (value or "").strip()
            if name.startswith("on"):
                hit("svg.event_handler", element=tag, attribute=name, value=val[:120])
            elif name in {"href", "src"} and val and not val.startswith("#"):
                hit("svg.external_reference", element=tag, attribute=name, value=val[:120])
            elif name == "style" and external_url.search(val):
                hit("svg.external_reference", element=tag, attribute=name, value=val[:120])
            elif "javascript:" in val.lower().replace(" ", ""):
                hit("svg.script", element=tag, attribute=name, value=val[:120])
    messages = {
        "svg.script": "the SVG contains script",
        "svg.event_handler": "the SVG has event-handler attributes (on...) that run script",
        "svg.foreign_object": "the SVG embeds foreign content (foreignObject/iframe/object)",
        "svg.external_reference": "the SVG refers to something outside itself (href to a URL, "
        "a file or a data: URI, CSS url()); only in-document #references are allowed",
    }
    findings = [
        Finding(
            rule=rule,
            status=Status.FAIL,
            message=f"{messages[rule]} ({len(cells)} place(s))",
            cells=cells[:20],
            evidence={"places": len(cells)},
        )
        for rule, cells in hits.items()
    ]
    # <text> is drawn; <title> and <desc> are shown on hover or read out: all are text
    labels = "\n".join(
        "".join(el.itertext()) for el in root.iter() if _local(el.tag) in {"text", "title", "desc"}
    )
    if labels.strip() and policy is not None:
        from airlock.checks.text import check_text

        # axis ticks are numbers too: only counts of people below the threshold are findings
        findings += [
            f for f in check_text(labels, policy, location) if f.rule == "text.small_count"
        ]
    if metadata:
        findings.append(
            Finding(
                rule="figure.metadata",
                status=Status.REVIEW,
                message="the SVG has <metadata> a checker does not see; strip it (strip_metadata)",
                cells=[dict(location)] if location else [],
                evidence={"elements": metadata},
            )
        )
    return findings


# ------------------------------------------------------------------------------ strip_metadata


def strip_metadata(src: Path | str, dst: Path | str) -> list[str]:
    """Write a copy of the figure ``src`` to ``dst`` with its pixels/drawing only.

    PNG and JPEG are rewritten losslessly (metadata chunks/segments and trailing data dropped,
    pixel data untouched); SVG loses <metadata> elements. Returns what was removed.
    """
    from airlock.checks.filetype import detect_bytes

    data = Path(src).read_bytes()
    kind = detect_bytes(data, str(src)).kind
    removed: list[str] = []
    out = bytearray()
    if kind == "png":
        chunks, end = png_chunks(data)
        out += PNG_SIGNATURE
        for ctype, body, _ in chunks:
            if ctype in _CRITICAL or ctype in _DISPLAY_CHUNKS:
                out += struct.pack(">I", len(body)) + ctype + body
                out += struct.pack(">I", zlib.crc32(ctype + body) & 0xFFFFFFFF)
            else:
                removed.append(ctype.decode("latin-1"))
        if end < len(data):
            removed.append(f"{len(data) - end} appended bytes")
    elif kind == "jpeg":
        segments, end = _jpeg_segments(data)
        out += b"\xff\xd8"
        cursor = 2
        for marker, body, pos in segments:
            seg_end = pos + 4 + len(body)
            drop = (0xE1 <= marker <= 0xEF and marker != 0xEE) or marker == 0xFE
            if marker == 0xE0 and not body.startswith((b"JFIF\x00", b"JFXX\x00")):
                drop = True
            if drop:
                out += data[cursor:pos]
                removed.append("COM" if marker == 0xFE else f"APP{marker - 0xE0}")
                cursor = seg_end
        out += data[cursor:end]
        if end < len(data):
            removed.append(f"{len(data) - end} appended bytes")
    elif kind == "svg":
        root = _parse_svg(data.decode("utf-8"))
        for parent in list(root.iter()):
            for child in list(parent):
                if _local(child.tag) == "metadata":
                    parent.remove(child)
                    removed.append("metadata")
        import xml.etree.ElementTree as ET  # serialising only: parsing went through defusedxml

        ET.register_namespace("", "http://www.w3.org/2000/svg")
        ET.register_namespace("xlink", "http://www.w3.org/1999/xlink")
        out += ET.tostring(root, encoding="utf-8", xml_declaration=True)
    else:
        raise FigureError(f"strip_metadata handles PNG, JPEG and SVG, not {kind}")
    Path(dst).write_bytes(bytes(out))
    return removed

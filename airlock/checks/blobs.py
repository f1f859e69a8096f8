"""Encoded blobs (base64 or hex runs) in any text a checker cannot read: outputs, sources,
cells, data: URIs. An image is the one encoded thing that may pass, through the figure rules."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from airlock.checks.findings import Finding, Status

_BASE64_RUN = re.compile(r"[A-Za-z0-9+/\-_]{100,}={0,2}")
_HEX_RUN = re.compile(r"\b[0-9a-fA-F]{128,}\b")


def decode_base64(run: str) -> bytes | None:
    """The bytes of a base64 (or URL-safe base64) run, or None for text that only looks like
    one (a run needs at least two of upper case, lower case and digits)."""
    classes = sum(bool(re.search(p, run)) for p in ("[A-Z]", "[a-z]", "[0-9]"))
    if classes < 2:
        return None
    body = run.rstrip("=")
    try:
        if "-" in body or "_" in body:
            return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        return base64.b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError):
        return None


def encoded_blobs(text: str, location: dict[str, Any], allow_images: bool = False) -> list[Finding]:
    """Long base64 (or hex) runs in ``text``: fail unless they decode to an image and images
    are allowed here (then the image gets the figure rules)."""
    from airlock.checks import figures
    from airlock.checks.filetype import detect_bytes

    findings: list[Finding] = []
    blobs: list[dict[str, Any]] = []
    for m in _BASE64_RUN.finditer(text):
        blob = decode_base64(m.group(0))
        if blob is None:
            continue
        kind = detect_bytes(blob[:65536]).kind
        if allow_images and kind in {"png", "jpeg"}:
            findings += figures.check_raster(blob, kind, location)
            continue
        blobs.append({**location, "offset": m.start(), "chars": len(m.group(0)), "kind": kind})
    for m in _HEX_RUN.finditer(text):
        blobs.append({**location, "offset": m.start(), "chars": len(m.group(0)), "kind": "hex"})
    if blobs:
        findings.append(
            Finding(
                rule="encoded.blob",
                status=Status.FAIL,
                message=f"{len(blobs)} encoded blob(s) (base64/hex, decoding to "
                f"{', '.join(sorted({b['kind'] for b in blobs}))}) that a checker cannot read: "
                "encoded data never leaves",
                cells=blobs[:20],
                evidence={"blobs": len(blobs), "chars": sum(b["chars"] for b in blobs)},
            )
        )
    return findings

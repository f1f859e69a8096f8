"""HTML: its tables are tables, its images are figures, its text is text, its scripts are hidden.

Used for .html outputs and for ``text/html`` outputs in notebooks. Also provides
``sanitize_html`` (scripts, event handlers, external resources removed), which the airlock UI
applies to everything it shows a checker.
"""

from __future__ import annotations

import base64
import re
from typing import Any

import lxml.html
import polars as pl
from lxml import etree

from airlock.checks.findings import Finding, Status

_DATA_URI = re.compile(r"^data:([\w/+.-]+)?((?:;[\w=.-]+)*);base64,(.*)$", re.DOTALL)
# CSS url() to anything but an in-page #fragment or an embedded data: URI
_CSS_EXTERNAL = re.compile(r"url\(\s*['\"]?\s*(?!data:|#)[^)]*\)", re.IGNORECASE)
_SHAPE = re.compile(r"\bshape: \(\d+, \d+\)")
_EXTERNAL_ATTRS = ("src", "href", "action", "formaction", "data", "poster", "background")


def parse_html(text: str) -> Any:
    """An lxml document for ``text``; raises ValueError for what cannot be parsed."""
    if not text.strip():
        raise ValueError("empty HTML document")
    parser = lxml.html.HTMLParser()
    try:
        doc = lxml.html.document_fromstring(text, parser=parser)
    except (etree.ParserError, ValueError) as exc:
        raise ValueError(f"HTML cannot be parsed: {exc}") from None
    # libxml2 stops reading at its limits (nesting depth 256...) and drops the rest silently:
    # what it did not read was not checked, so the page is refused
    for error in parser.error_log:
        if error.type_name == "ERR_RESOURCE_LIMIT" or "depth" in error.message.lower():
            raise ValueError(f"HTML too deeply nested to be checked ({error.message})")
    return doc


# polars dtype names (its HTML and text reprs print them under the column names)
_DTYPE = re.compile(
    r"^(?:[iu](?:8|16|32|64|128)|f(?:32|64)|str|bool|date|time|null|cat|enum|binary|object|"
    r"decimal(?:\[.*\])?|datetime\[.*\]|duration\[.*\]|list\[.*\]|array\[.*\]|struct\[.*\])$"
)


def _unquote(value: str) -> str:
    """polars shows text cells in double quotes: the value is what is inside."""
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def _cell_text(el: Any) -> str:
    return " ".join(el.text_content().split())


def tables_from_html(doc: Any) -> list[tuple[pl.DataFrame, pl.DataFrame]]:
    """Every <table> as (typed frame, all-text frame). Header: <thead> rows, else the first row
    when it is all <th>. Cells spanning several columns are repeated, as a reader sees them."""
    from airlock.checks.cells import coerce_numbers, drop_range_index, unique_names

    out = []
    for table in doc.iter("table"):
        if table.xpath("ancestor::table"):
            continue  # a nested table is read as part of its cell
        rows: list[list[str]] = []
        header_rows = 0
        for tr in table.xpath("./tr|./thead/tr|./tbody/tr|./tfoot/tr"):
            cells = []
            for td in tr.xpath("./td|./th"):
                span = td.get("colspan", "1")
                span_n = int(span) if span.isdigit() and 0 < int(span) <= 100 else 1
                cells += [_cell_text(td)] * span_n
            if not cells:
                continue
            in_head = tr.getparent().tag == "thead" or all(
                c.tag == "th" for c in tr.xpath("./td|./th")
            )
            if in_head and header_rows == len(rows):
                if rows and all(_DTYPE.match(c) for c in cells):
                    continue  # polars prints the column types under the names
                header_rows += 1
            rows.append([_unquote(c) for c in cells] if not in_head else cells)
        if not rows:
            continue
        width = max(len(r) for r in rows)
        rows = [r + [""] * (width - len(r)) for r in rows]
        if header_rows:
            header = [
                " ".join(p for p in parts if p).strip()
                for parts in zip(*rows[:header_rows], strict=True)
            ]
            body = rows[header_rows:]
        else:
            header, body = [f"column_{i + 1}" for i in range(width)], rows
        # pandas puts the index name on a row of its own under the header: fold it in
        if body and header_rows and all(not c for c in body[0][1:]) and body[0][0]:
            if not header[0]:
                header[0] = body[0][0]
                body = body[1:]
        header, body = drop_range_index(header, body)
        names = unique_names(header)
        raw = pl.DataFrame(
            {n: [r[i] or None for r in body] for i, n in enumerate(names)},
            schema={n: pl.String for n in names},
        )
        out.append((coerce_numbers(raw), raw))
    return out


def data_uris(doc: Any) -> list[tuple[str, bytes, str]]:
    """(mime type, decoded bytes, element) of every base64 data: URI in src/href attributes."""
    found = []
    for el in doc.iter():
        if not isinstance(el.tag, str):
            continue
        for attr in ("src", "href", "data"):
            value = (el.get(attr) or "").strip()
            m = _DATA_URI.match(value)
            if m:
                try:
                    blob = base64.b64decode(re.sub(r"\s+", "", m.group(3)), validate=True)
                except ValueError:
                    blob = b""
                found.append((m.group(1) or "", blob, el.tag))
    return found


def scripts_and_externals(doc: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    scripts, externals = [], []
    for el in doc.iter():
        if not isinstance(el.tag, str):
            continue
        if el.tag in {"script", "iframe", "object", "embed", "applet"}:
            scripts.append({"element": el.tag, "value": (el.get("src") or el.text or "")[:120]})
        for attr, value in el.attrib.items():
            if attr.lower().startswith("on"):
                scripts.append({"element": el.tag, "attribute": attr, "value": value[:120]})
            elif attr in _EXTERNAL_ATTRS and re.match(r"^\s*(https?:|//|file:|ftp:)", value):
                externals.append({"element": el.tag, "attribute": attr, "value": value[:120]})
            elif "javascript:" in value.lower().replace(" ", ""):
                scripts.append({"element": el.tag, "attribute": attr, "value": value[:120]})
    return scripts, externals


_BLOCKS = (
    *("p", "div", "h1", "h2", "h3", "h4", "h5", "h6", "li", "dt", "dd", "br", "hr", "pre"),
    *("section", "article", "header", "footer", "main", "nav", "aside", "blockquote"),
    *("template", "noscript", "figcaption", "caption", "summary", "details", "ul", "ol", "dl"),
)


def visible_text(doc: Any) -> str:
    """The prose of a page, without its tables, scripts and styles."""
    copy = lxml.html.fromstring(lxml.html.tostring(doc))
    for el in copy.xpath("//table|//script|//style|//head"):
        el.drop_tree()
    # a block ends a line: without this "<h1>Results</h1><p>3 children</p>" reads
    # "Results3 children", where no number is seen
    for el in copy.iter(*_BLOCKS):
        el.tail = "\n" + (el.tail or "")
        if len(el):
            el[-1].tail = (el[-1].tail or "") + "\n"
        else:
            el.text = (el.text or "") + "\n"
    return "\n".join(line.strip() for line in copy.text_content().splitlines() if line.strip())


# attributes whose text a reader sees only on hover or with a screen reader (and data-*)
_TEXT_ATTRS = ("title", "alt", "aria-label", "aria-description", "placeholder")
_CSS_CONTENT = re.compile(r"content\s*:\s*(['\"])(.*?)\1", re.DOTALL)


def hidden_text(doc: Any) -> tuple[str, str]:
    """Text of a page that the rendered page does not show: (comments, <title> and CSS
    ``content:`` strings; text attributes: title, alt, aria-*, data-*)."""
    texts: list[str] = []
    attrs: list[str] = []
    for el in doc.iter():
        if isinstance(el, etree._Comment):
            texts.append(el.text or "")
            continue
        if not isinstance(el.tag, str):
            continue
        if el.tag == "title":
            texts.append(el.text or "")
        elif el.tag == "style":
            texts += [m.group(2) for m in _CSS_CONTENT.finditer(el.text or "")]
        for attr, value in el.attrib.items():
            if attr in _TEXT_ATTRS or (attr.startswith("data-") and not value.startswith("data:")):
                attrs.append(value)
            elif attr == "style":
                texts += [m.group(2) for m in _CSS_CONTENT.finditer(value)]

    def joined(parts: list[str]) -> str:
        return "\n".join(p.strip() for p in parts if p and p.strip())

    return joined(texts), joined(attrs)


def check_html(text: str, ctx: Any, location: dict[str, Any] | None = None) -> list[Finding]:
    """Tables -> table rules; data: images -> figure rules; prose -> text rules; scripts and
    external resources -> review (the checker cannot see what they do); non-image blobs -> fail."""
    from airlock.checks import figures
    from airlock.checks.context import check_dataframe
    from airlock.checks.filetype import detect_bytes
    from airlock.checks.text import check_text

    location = location or {}
    doc = parse_html(text)
    findings: list[Finding] = []
    for i, (df, raw) in enumerate(tables_from_html(doc)):
        _, found = check_dataframe(df, ctx, {**location, "table": i}, raw=raw)
        findings += found
    for j, (mime, blob, tag) in enumerate(data_uris(doc)):
        kind = detect_bytes(blob).kind
        where = {**location, "embedded": j, "element": tag}
        if kind in {"png", "jpeg"}:
            findings += figures.check_raster(blob, kind, where)
        elif kind == "svg":
            findings += figures.check_svg(blob.decode("utf-8"), where, policy=ctx.policy)
        else:
            findings.append(
                Finding(
                    rule="encoded.blob",
                    status=Status.FAIL,
                    message=f"a base64 data: URI ({mime or 'no type'}, {len(blob)} bytes) that is "
                    "not an image: encoded data cannot be reviewed",
                    cells=[where],
                    evidence={"bytes": len(blob), "kind": kind},
                )
            )
    scripts, externals = scripts_and_externals(doc)
    if scripts:
        findings.append(
            Finding(
                rule="html.script",
                status=Status.REVIEW,
                message=f"{len(scripts)} script(s) or active element(s): checkers see the page "
                "with scripts removed, so whatever a script shows or holds is unreviewed",
                cells=[{**location, **s} for s in scripts[:20]],
                evidence={"scripts": len(scripts)},
            )
        )
    if externals:
        findings.append(
            Finding(
                rule="html.external_reference",
                status=Status.REVIEW,
                message=f"{len(externals)} reference(s) to resources outside the file",
                cells=[{**location, **e} for e in externals[:20]],
                evidence={"references": len(externals)},
            )
        )
    # blobs anywhere in the page's text (tables, prose, <pre>, scripts); tables' cells were
    # already searched cell by cell, so only the text outside them is searched here
    outside_tables = "\n".join(
        [visible_text(doc)] + [script.text or "" for script in doc.iter("script")]
    )
    findings += _blobs_in(outside_tables, location)
    prose = _SHAPE.sub(" ", visible_text(doc))  # polars prints "shape: (2, 2)" above a table
    findings += check_text(prose, ctx.policy, location)
    hidden, attributes = hidden_text(doc)
    if hidden:
        findings += check_text(hidden, ctx.policy, {**location, "hidden": True})
    if attributes:  # ids, sizes and states live in attributes: only counts of people count
        findings += [
            f
            for f in check_text(attributes, ctx.policy, {**location, "attributes": True})
            if f.rule in {"text.small_count", "text.zero_count"}
        ]
    return findings


def _blobs_in(text: str, location: dict[str, Any]) -> list[Finding]:
    from airlock.checks.blobs import encoded_blobs

    return encoded_blobs(text, location)


def sanitize_html(text: str) -> str:
    """The page with scripts, active elements, event handlers and external resources removed
    (data: images kept), safe to show a checker and unable to fetch anything."""
    doc = parse_html(text)
    for el in list(doc.iter()):
        if not isinstance(el.tag, str):
            continue
        if el.tag in {"script", "iframe", "object", "embed", "applet", "base", "frame"}:
            el.drop_tree()
            continue
        if el.tag == "link" and el.get("href") and not el.get("href", "").startswith("data:"):
            el.drop_tree()
            continue
        if el.tag == "meta" and (el.get("http-equiv") or "").lower() == "refresh":
            el.drop_tree()
            continue
        for attr in list(el.attrib):
            value = el.get(attr) or ""
            if attr.lower().startswith("on") or "javascript:" in value.lower().replace(" ", ""):
                del el.attrib[attr]
            elif attr == "style":
                el.set(attr, _CSS_EXTERNAL.sub("none", value))
            elif attr in _EXTERNAL_ATTRS and not value.startswith(("data:image/", "#")):
                if re.match(r"^\s*(https?:|//|file:|ftp:)", value) or attr != "href":
                    del el.attrib[attr]
    for style in doc.iter("style"):
        if style.text:
            style.text = _CSS_EXTERNAL.sub("none", re.sub(r"@import[^;]*;?", "", style.text))
    return lxml.html.tostring(doc, encoding="unicode", doctype="<!DOCTYPE html>")

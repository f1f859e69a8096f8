"""The dispatcher: one FileReport per file, whatever the file.

``check_file`` never raises on bad input: a file it cannot read, parse or understand gets a
``fail`` finding saying why (rule ``file.unreadable``), never ``pass``. The order of the gates
matters: the size is checked from ``stat`` before a byte is read, the type from the content
before any parser sees it, and only the allow-listed types reach a parser.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import polars as pl

from airlock.checks import filetype as ft
from airlock.checks.context import CheckContext, check_dataframe
from airlock.checks.findings import FileReport, Finding, Status, worst
from airlock.checks.jsondoc import MAX_JSON_DEPTH, check_json_value, json_records, json_text
from airlock.checks.notebooks import check_notebook, check_prose, encoded_blobs, tables_from_text
from airlock.policy import Policy

FIGURE_KINDS = {"png", "jpeg", "svg"}
TABLE_KINDS = {"csv", "tsv", "xlsx", "json"}
_TABLE_EXTENSIONS = (".csv", ".tsv", ".xlsx", ".json")


def _finding(rule: str, status: Status, message: str, **evidence: Any) -> Finding:
    return Finding(rule=rule, status=status, message=message, evidence=evidence)


def _unreadable(message: str) -> Finding:
    return _finding("file.unreadable", Status.FAIL, message)


def _check_json(text: str, ctx: CheckContext) -> tuple[str, list[Finding]]:
    value = ft.loads_json(text, max_depth=MAX_JSON_DEPTH)
    df = json_records(value)
    findings = encoded_blobs(text, {})
    if df is not None:
        raw = df.select(pl.all().cast(pl.String, strict=False))
        output_class, found = check_dataframe(df, ctx, raw=raw)
        return output_class, findings + found
    if isinstance(value, dict) and isinstance(value.get("cells"), list):
        return "notebook", findings + check_notebook(value, ctx)
    return "json", findings + check_json_value(value, ctx)


def _check_text_file(text: str, ctx: CheckContext, kind: str) -> tuple[str, list[Finding]]:
    from airlock.checks.models import looks_like_model
    from airlock.checks.spreadsheets import read_delimited

    findings = encoded_blobs(text, {})
    tables = []
    if kind in {"csv", "tsv"}:  # a .txt/.log holding a table is checked as the table it is
        try:
            tables = [read_delimited(text, "\t" if kind == "tsv" else None)]
        except ValueError:
            tables = tables_from_text(text)
    elif "coef" in text and ("Df Residuals" in text or "No. Observations" in text):
        tables = [t for t in tables_from_text(text) if looks_like_model(t[0])]
    output_class = "text"
    for df, raw in tables:
        output_class, found = check_dataframe(df, ctx, raw=raw)
        findings += found
    if not tables:
        findings += check_prose(text, ctx)
    lines = text.count("\n") + 1
    if not tables and lines > ctx.policy.max_rows:
        findings.append(
            _finding(
                "text.long_output",
                Status.REVIEW,
                f"{lines} lines: a text this long may hold row-level data",
                lines=lines,
            )
        )
    return output_class, findings


def _companion_tables(path: Path, companions: Sequence[Path]) -> list[Path]:
    chosen = [Path(c) for c in companions]
    for ext in _TABLE_EXTENSIONS:
        beside = path.with_suffix(ext)
        if beside.is_file() and beside not in chosen:
            chosen.append(beside)
    return chosen


def _check_figure(
    data: bytes, kind: str, path: Path, ctx: CheckContext, companions: Sequence[Path]
) -> list[Finding]:
    from airlock.checks import figures

    if kind == "svg":
        findings = figures.check_svg(ft.decode_text(data), policy=ctx.policy)
    else:
        findings = figures.check_raster(data, kind)
    tables = _companion_tables(path, companions)
    if not tables:
        findings.append(
            _finding(
                "figure.no_table",
                Status.REVIEW,
                "a figure without its underlying table: supply the table (e.g. "
                f"{path.stem}.csv beside it) so that its numbers are checked",
            )
        )
    for table in tables:
        report = check_file(table, ctx.policy, context=ctx)
        for f in report.findings:
            cells = [{"companion": table.name, **c} for c in f.cells] or [{"companion": table.name}]
            findings.append(f.model_copy(update={"cells": cells}))
        if not report.findings:
            findings.append(
                _finding(
                    "figure.table_checked",
                    Status.PASS,
                    f"underlying table {table.name} checked: nothing found",
                    table=table.name,
                )
            )
    return findings


def _dispatch(
    data: bytes, detected: ft.DetectedType, path: Path, ctx: CheckContext, companions: Sequence
) -> tuple[str, list[Finding]]:
    from airlock.checks.html import check_html
    from airlock.checks.spreadsheets import (
        check_xlsx,
        read_delimited,
        split_blocks,
        split_preamble,
    )
    from airlock.checks.text import check_text

    kind = detected.kind
    if kind in FIGURE_KINDS:
        return "figure", _check_figure(data, kind, path, ctx, companions)
    if kind == "xlsx":
        findings, classes = check_xlsx(data, ctx)
        return (classes[0] if len(classes) == 1 else "spreadsheet"), findings
    text = ft.decode_text(data)
    if kind == "ipynb":
        return "notebook", check_notebook(ft.loads_json(text, max_depth=MAX_JSON_DEPTH), ctx)
    if kind == "json":
        return _check_json(text, ctx)
    if kind == "html":
        return "html", check_html(text, ctx)
    if kind in {"csv", "tsv"} and detected.declared in {"csv", "tsv", None}:
        preamble, body = split_preamble(text)
        blocks = split_blocks(body)
        df, raw = read_delimited(blocks[0], "\t" if kind == "tsv" else None)
        output_class, findings = check_dataframe(df, ctx, raw=raw)
        # a second table below a blank line is a table of its own, not rows of the first
        for k, block in enumerate(blocks[1:], start=1):
            notes, block = split_preamble(block)
            if notes:
                findings += check_text(notes, ctx.policy, {"block": k})
            df, raw = read_delimited(block, "\t" if kind == "tsv" else None)
            findings += check_dataframe(df, ctx, {"block": k}, raw=raw)[1]
        if preamble:  # a title or notes above the header are prose
            findings += check_text(preamble, ctx.policy, {"preamble": True})
        return output_class, findings
    return _check_text_file(text, ctx, kind)


def check_file(
    path: Path | str,
    policy: Policy,
    evidence_path: Path | str | None = None,
    extract_path: Path | str | None = None,
    companions: Iterable[Path | str] = (),
    *,
    context: CheckContext | None = None,
) -> FileReport:
    """Check one file; never raises on bad input (the report says what was wrong)."""
    path = Path(path)
    ctx = context
    owned_extract = None
    findings: list[Finding] = []
    output_class = "unknown"
    sha256 = None
    try:
        if ctx is None:
            ctx = CheckContext(policy=policy)
            ctx.evidence_path = Path(evidence_path) if evidence_path is not None else None
            if extract_path is not None:
                from airlock.checks.leaks import ExtractIndex

                owned_extract = ctx.extract = ExtractIndex(extract_path)
        if ctx.evidence_path is not None:
            ctx.evidence, problem = _load_evidence(ctx.evidence_path, path.name)
            findings += [problem] if problem else []
        output_class, more, sha256 = _check_path(path, ctx, [Path(c) for c in companions])
        findings += more
    except Exception as exc:  # noqa: BLE001 (the contract: bad input never raises)
        findings.append(_unreadable(_describe(exc, path)))
    finally:
        if owned_extract is not None:
            owned_extract.close()
    label = policy.label
    findings = [
        f if f.policy_version else f.model_copy(update={"policy_version": label}) for f in findings
    ]
    return FileReport(
        path=str(path),
        output_class=output_class,
        status=worst([f.status for f in findings]),
        findings=findings,
        sha256=sha256,
    )


def _describe(exc: BaseException, path: Path) -> str:
    if isinstance(exc, RecursionError):
        return f"{path.name}: nested too deeply to be checked"
    if isinstance(exc, MemoryError):
        return f"{path.name}: too large to be checked in memory"
    text = str(exc).strip() or type(exc).__name__
    return f"{path.name} cannot be checked: {text}"


def _load_evidence(evidence_path: Path, name: str) -> tuple[Any, Finding | None]:
    """The evidence for the file ``name``: from an ACRO bundle, its entry for that file (or its
    only entry); from an evidence file, the file itself."""
    from airlock.evidence import EvidenceError, load_evidence

    try:
        try:
            return load_evidence(evidence_path, table_name=name), None
        except EvidenceError:
            return load_evidence(evidence_path), None
    except Exception as exc:  # noqa: BLE001
        return None, _finding(
            "evidence.unreadable",
            Status.REVIEW,
            f"the evidence file {Path(evidence_path).name} cannot be used for this file "
            f"(checked without it): {exc}",
        )


def _check_path(
    path: Path, ctx: CheckContext, companions: list[Path]
) -> tuple[str, list[Finding], str | None]:
    policy = ctx.policy
    try:
        st = path.stat()
    except OSError as exc:
        return "unknown", [_unreadable(f"{path}: {exc.strerror or exc}")], None
    if not path.is_file():
        return "unknown", [_unreadable(f"{path} is not a regular file")], None
    if st.st_size > policy.max_file_bytes:
        return (
            "unknown",
            [
                _finding(
                    "file.too_large",
                    Status.FAIL,
                    f"{st.st_size} bytes is over the limit of {policy.max_file_bytes} bytes",
                    bytes=st.st_size,
                    max_file_bytes=policy.max_file_bytes,
                )
            ],
            None,
        )
    with open(path, "rb") as fh:
        data = fh.read(policy.max_file_bytes + 1)
    if len(data) > policy.max_file_bytes:  # grew since stat
        return (
            "unknown",
            [_finding("file.too_large", Status.FAIL, "file grew over the limit")],
            None,
        )
    sha256 = hashlib.sha256(data).hexdigest()
    detected = ft.detect_bytes(data, path.name)
    findings: list[Finding] = []
    if detected.kind == "empty":
        return "unknown", [_finding("file.empty", Status.REVIEW, "the file is empty")], sha256
    if detected.kind == "invalid_utf8":
        return (
            "unknown",
            [_finding("file.encoding", Status.FAIL, f"text {detected.detail}; save it as UTF-8")],
            sha256,
        )
    if detected.kind not in ft.CHECKABLE_KINDS:
        return (
            "unknown",
            [
                _finding(
                    "file.type_not_allowed",
                    Status.FAIL,
                    f"the content is {detected.reason()}"
                    + (f" ({detected.detail})" if detected.detail else "")
                    + ": this type is never released",
                    detected=detected.kind,
                    extension=detected.extension,
                )
            ],
            sha256,
        )
    if detected.policy_name not in policy.allowed_file_types:
        findings.append(
            _finding(
                "file.type_not_allowed",
                Status.FAIL,
                f"{detected.policy_name} files are not allowed by the policy "
                f"(allowed: {', '.join(policy.allowed_file_types)})",
                detected=detected.policy_name,
            )
        )
        return "unknown", findings, sha256
    if detected.mismatch or detected.declared is None:
        # a plain-text name holding other text is a naming slip a checker can see through;
        # anything else (a .ipynb that is not a notebook, a picture named .csv) is a disguise
        benign = detected.is_text and detected.declared in {None, "text", "csv", "tsv"}
        said = f".{detected.extension}" if detected.extension else "no extension"
        findings.append(
            _finding(
                "file.type_mismatch",
                Status.REVIEW if benign else Status.FAIL,
                f"the name says {said} but the content is {detected.kind.upper()}: "
                "rename the file to what it is",
                detected=detected.kind,
                extension=detected.extension,
            )
        )
    output_class, more = _dispatch(data, detected, path, ctx, companions)
    if ctx.extract is not None:
        from airlock.checks.leaks import find_identifiers_in_text

        # everywhere in the file, not only where a reader looks: comments, attributes,
        # metadata, workbook parts no sheet shows, decoded escapes
        ident = find_identifiers_in_text("\n".join(_file_texts(data, detected.kind)), ctx.extract)
        more += [ident] if ident else []
    return output_class, findings + more, sha256


def _file_texts(data: bytes, kind: str) -> list[str]:
    """Every text a file holds, for the identifier search: the text itself and with its
    escapes decoded (HTML/XML entities, JSON strings); each part of a workbook; the metadata
    and trailing bytes of a figure."""
    import html

    if kind == "xlsx":
        import io
        import zipfile

        texts = []
        with zipfile.ZipFile(io.BytesIO(data)) as zf:  # measured by check_xlsx already
            for name in zf.namelist():
                part = zf.read(name).decode("utf-8", "replace")
                texts += [name, html.unescape(part)]
        return texts
    if kind in {"png", "jpeg"}:
        from airlock.checks.figures import hidden_texts

        return hidden_texts(data, kind)
    text = ft.decode_text(data)
    texts = [text]
    if "&" in text:
        texts.append(html.unescape(text))
    if kind in {"json", "ipynb"} and "\\" in text:
        texts.append(json_text(ft.loads_json(text, max_depth=MAX_JSON_DEPTH)))
    return texts


def check_files(
    paths: Iterable[Path | str],
    policy: Policy,
    evidence_path: Path | str | None = None,
    extract_path: Path | str | None = None,
    companions: Iterable[Path | str] = (),
) -> list[FileReport]:
    """Check several files with one extract connection; a figure is paired with a table of the
    same name among ``paths`` (fig.png + fig.csv) or beside it on disk."""
    paths = [Path(p) for p in paths]
    extra = [Path(c) for c in companions]
    ctx = CheckContext(policy=policy)
    setup: list[Finding] = []
    index = None
    try:
        ctx.evidence_path = Path(evidence_path) if evidence_path is not None else None
        if extract_path is not None:
            from airlock.checks.leaks import ExtractIndex

            try:
                index = ctx.extract = ExtractIndex(extract_path)
            except Exception as exc:  # noqa: BLE001
                setup.append(_unreadable(f"the extract cannot be opened: {exc}"))
        reports = []
        for path in paths:
            mates = [p for p in paths if p != path and p.stem == path.stem]
            mates = [p for p in mates if p.suffix.lower() in _TABLE_EXTENSIONS] + extra
            is_figure = path.suffix.lower() in {".png", ".jpg", ".jpeg", ".svg"}
            report = check_file(path, policy, companions=mates if is_figure else (), context=ctx)
            if setup:
                findings = setup + report.findings
                report = report.model_copy(
                    update={"findings": findings, "status": worst([f.status for f in findings])}
                )
            reports.append(report)
        return reports
    finally:
        if index is not None:
            index.close()


def extract_for_project(project: str, extracts_dir: Path | None) -> Path | None:
    """The project's extract file when it exists (Settings.extracts_dir/<project>.duckdb)."""
    if extracts_dir is None:
        return None
    candidate = Path(extracts_dir) / f"{project}.duckdb"
    return candidate if candidate.is_file() and os.access(candidate, os.R_OK) else None

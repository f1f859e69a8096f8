"""Per-batch data-quality report: ``notebooks/data_quality.ipynb`` run by papermill, rendered
to self-contained HTML by nbconvert.

The notebook opens the pooled DuckDB file read-only and reports, for one ``load_batch``:
rows added, the ingest's batch record and quarantined rules, completeness per column, code
distributions per site, the ICCC-3 mix against published shares, implausible values and the
age at diagnosis per group. The HTML uses nbconvert's ``basic`` template wrapped in a page with
inline CSS, so opening it fetches nothing from the internet.
"""

from __future__ import annotations

import html
import os
import tempfile
from pathlib import Path

from tre.dictionary import DICTIONARY_FILE
from tre.settings import REPO_ROOT

NOTEBOOK = REPO_ROOT / "notebooks" / "data_quality.ipynb"
EXPECTED_SHARES = REPO_ROOT / "policies" / "iccc3" / "expected_shares.csv"
KERNEL = "python3"
_CSS = """
body { font-family: system-ui, sans-serif; max-width: 70rem; margin: 2rem auto; color: #222; }
table.dq { border-collapse: collapse; margin: 0.5rem 0 1.5rem; font-size: 0.9rem; }
table.dq caption { text-align: left; font-weight: 600; padding: 0.3rem 0; }
table.dq th, table.dq td { border: 1px solid #ccc; padding: 0.2rem 0.5rem; text-align: left; }
table.dq th { background: #f2f2f2; }
img { max-width: 100%; }
"""


class QualityReportError(RuntimeError):
    """The report could not be built; the message says why."""


def _check_batch(pooled_db: Path, batch_id: str) -> None:
    """Fail fast, before starting a kernel, when the database or the batch is not there."""
    import duckdb

    if not pooled_db.is_file():
        raise QualityReportError(f"pooled database {pooled_db} does not exist")
    con = duckdb.connect(str(pooled_db), read_only=True)
    try:
        names = {
            r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()
        }
        with_batch = [
            t
            for t in sorted(names)  # every pooled table (the dictionary's, whatever they are)
            if "load_batch" in {r[0] for r in con.execute(f'DESCRIBE "{t}"').fetchall()}  # noqa: S608
        ]
        if not with_batch:
            raise QualityReportError(f"{pooled_db} has no pooled tables with a load_batch column")
        found = sum(
            con.execute(f'SELECT count(*) FROM "{t}" WHERE load_batch = ?', [batch_id]).fetchone()[
                0
            ]
            for t in with_batch
        )
        if not found:
            raise QualityReportError(f"batch {batch_id!r} has no rows in {pooled_db}")
    finally:
        con.close()


def build_quality_report(
    pooled_db: Path,
    batch_id: str,
    out_html: Path,
    *,
    dictionary_path: Path = DICTIONARY_FILE,
    timeout_seconds: int = 600,
) -> Path:
    """Execute the data-quality notebook for one batch and write it as HTML to ``out_html``.

    The executed notebook is kept beside it (``.ipynb``). Writes are atomic: on any failure no
    partial report is left behind and ``QualityReportError`` says what went wrong.
    """
    pooled_db, out_html = Path(pooled_db), Path(out_html)
    _check_batch(pooled_db, batch_id)
    # papermill and nbconvert take seconds to import: only here, when a report is built
    import nbformat
    import papermill
    from nbconvert import HTMLExporter

    out_html.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tre-quality-") as tmp:
        executed = Path(tmp) / "executed.ipynb"
        try:
            papermill.execute_notebook(
                str(NOTEBOOK),
                str(executed),
                parameters={
                    "pooled_db": str(pooled_db.resolve()),
                    "batch_id": batch_id,
                    "dictionary_path": str(Path(dictionary_path).resolve()),
                    "expected_shares_path": str(EXPECTED_SHARES),
                },
                kernel_name=KERNEL,
                progress_bar=False,
                log_output=False,
                cwd=tmp,
                execution_timeout=timeout_seconds,
            )
        except Exception as exc:  # papermill wraps cell errors; report them plainly
            raise QualityReportError(
                f"data-quality notebook failed for batch {batch_id}: {exc}"
            ) from exc
        nb = nbformat.read(executed, as_version=4)
        exporter = HTMLExporter(
            template_name="basic",
            exclude_input=True,
            exclude_input_prompt=True,
            exclude_output_prompt=True,
        )
        body, _ = exporter.from_notebook_node(nb)
        page = (
            "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>Data quality: batch {html.escape(batch_id)}</title>"
            f"<style>{_CSS}</style></head><body>\n{body}\n</body></html>\n"
        )
        tmp_html = out_html.with_name(out_html.name + ".tmp")
        tmp_html.write_text(page, encoding="utf-8")
        tmp_nb = out_html.with_name(out_html.stem + ".ipynb.tmp")
        nbformat.write(nb, str(tmp_nb))
        os.replace(tmp_nb, out_html.with_suffix(".ipynb"))
        os.replace(tmp_html, out_html)
    return out_html

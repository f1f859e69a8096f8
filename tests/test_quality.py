"""Per-batch data-quality report: executed with papermill, rendered with nbconvert, offline."""

from __future__ import annotations

import json
import re
from pathlib import Path

import duckdb
import lxml.html
import nbformat
import polars as pl
import pytest

from tre.dictionary import load_dictionary, validate_batch
from tre.quality import NOTEBOOK, QualityReportError, build_quality_report
from tre.synth import generate, read_delivery

POLICIES = Path(__file__).resolve().parent.parent / "policies"


def build_pool(root: Path, db: Path) -> dict[str, pl.DataFrame]:
    """A pooled DuckDB laid out like the pooled store (provenance columns, _quarantine)."""
    d = load_dictionary()
    con = duckdb.connect(str(db))
    con.execute(
        "CREATE TABLE _quarantine (batch_id VARCHAR, table_name VARCHAR, source_row BIGINT,"
        " errors VARCHAR, data VARCHAR)"
    )
    errors = {}
    for i, site in enumerate(sorted(p for p in root.iterdir() if p.is_dir())):
        batch = f"batch-{site.name}"
        res = validate_batch(d, read_delivery(site))
        for t, r in res.items():
            df = r.valid.drop("_row").with_columns(
                pl.lit(site.name).alias("site_id"), pl.lit(batch).alias("load_batch")
            )
            con.register("df", df.to_arrow())
            if i == 0:
                con.execute(f'CREATE TABLE "{t}" AS SELECT * FROM df')
            else:
                con.execute(f'INSERT INTO "{t}" BY NAME SELECT * FROM df')
            con.unregister("df")
            for row, errs in r.errors.group_by("row"):
                con.execute(
                    "INSERT INTO _quarantine VALUES (?, ?, ?, ?, '{}')",
                    [batch, t, row[0], json.dumps(errs.select("column", "rule").to_dicts())],
                )
        errors[site.name] = pl.concat(
            [r.errors.with_columns(pl.lit(t).alias("table")) for t, r in res.items()]
        )
    con.close()
    return errors


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    generate(root / "sites", 2, 2000, seed=9, defects_rate=0.02, policies_dir=POLICIES)
    db = root / "pooled.duckdb"
    errors = build_pool(root / "sites", db)
    site = sorted(errors)[0]
    out = build_quality_report(db, f"batch-{site}", root / "reports" / "r.html")
    return db, site, out, errors[site]


def tables_by_caption(html_path: Path) -> dict[str, list[list[str]]]:
    doc = lxml.html.parse(str(html_path)).getroot()
    found = {}
    for table in doc.iter("table"):
        cap = table.find("caption")
        if cap is None:
            continue
        rows = [[c.text_content() for c in tr] for tr in table.iter("tr")]
        found[cap.text_content()] = rows
    return found


def test_report_is_written_with_its_executed_notebook(report):
    db, site, out, _ = report
    assert out.exists() and out.with_suffix(".ipynb").exists()
    text = out.read_text()
    assert f"batch-{site}" in text
    for heading in (
        "Completeness per column",
        "Code distributions per site",
        "ICCC-3 mix",
        "Implausible values",
    ):
        assert heading in text
    assert text.count("data:image/png;base64") >= 2
    assert not list(out.parent.glob("*.tmp"))


def test_report_fetches_nothing_from_outside(report):
    text = report[2].read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
    assert "<script src" not in text
    assert "@import" not in text


def test_report_figures_match_the_pool(report):
    db, site, out, errors = report
    batch = f"batch-{site}"
    tables = tables_by_caption(out)
    con = duckdb.connect(str(db), read_only=True)
    try:
        # ICCC-3 mix: counts per group in this batch
        rows = tables["ICCC-3 main groups"]
        header, body = rows[0], rows[1:]
        got = {r[header.index("group")]: int(r[header.index("n")]) for r in body}
        want = dict(
            con.execute(
                "SELECT iccc3_group, count(*) FROM tumour WHERE load_batch = ? GROUP BY ALL",
                [batch],
            ).fetchall()
        )
        assert {g: n for g, n in got.items() if n} == want
        # rows added per table
        added = {r[0]: int(r[1]) for r in tables["Rows added"][1:]}
        for t, n in added.items():
            assert (
                n
                == con.execute(
                    f'SELECT count(*) FROM "{t}" WHERE load_batch = ?', [batch]
                ).fetchone()[0]
            )
        # completeness of an optional column
        comp = {(r[0], r[1]): r[3] for r in tables["Completeness of this batch"][1:]}
        share = con.execute(
            "SELECT 100.0 * count(stage) / count(*) FROM tumour WHERE load_batch = ?", [batch]
        ).fetchone()[0]
        assert comp[("tumour", "stage")] == f"{share:.1f}%"
    finally:
        con.close()
    # quarantined rules: the same counts as the validation errors of the batch
    q = {(r[0], r[1]): int(r[2]) for r in tables["Quarantined rows by rule"][1:]}
    want_q = errors.group_by("table", "rule").agg(pl.col("row").n_unique())
    assert q == {(t, r): n for t, r, n in want_q.iter_rows()}
    assert "patient.sex: % of each site's rows" in tables


def test_unknown_batch_or_database_fails_fast_and_writes_nothing(report, tmp_path):
    db = report[0]
    out = tmp_path / "x.html"
    with pytest.raises(QualityReportError, match="no rows"):
        build_quality_report(db, "no-such-batch", out)
    with pytest.raises(QualityReportError, match="does not exist"):
        build_quality_report(tmp_path / "missing.duckdb", "b", out)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_notebook_declares_its_parameters():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    for name in ("pooled_db", "batch_id", "dictionary_path", "expected_shares_path"):
        assert name in tagged[0].source
    assert all(c.get("outputs", []) == [] for c in nb.cells if c.cell_type == "code")

"""Real-world quirks of delivered files: empty lines, old-Mac line ends, other text encodings,
Parquet text stored as BINARY, values that span lines.

Each variant of a clean delivery must give exactly the pooled rows of the clean delivery; row
numbers in error reports (and the quarantine) must stay those of the file as the site has it
(row N is line N + 1) however many empty lines were skipped; what cannot be read is a clear
error that names the file, the line and the encoding problem, and changes nothing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import site_files
from typer.testing import CliRunner

from tre.ingest import IngestError, ingest_files
from tre.pooled import PooledStore
from tre.pseudonymise import init_key
from tre.settings import REPO_ROOT, Settings

TABLES = ("patient", "tumour", "treatment", "event", "followup")


@pytest.fixture(scope="module")
def delivery() -> dict[str, pl.DataFrame]:
    d = site_files.generate(60, seed=5)
    # free text with accents, as European registries write it
    study = pl.when(pl.int_range(pl.len()) % 3 == 2).then(pl.lit("Étude Léa-Noël"))
    d["patient"] = d["patient"].with_columns(study.otherwise(pl.col("study_id")).alias("study_id"))
    return d


@pytest.fixture(scope="module")
def key(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("key") / "hmac.key"
    init_key(path)
    return path.read_bytes()


def new_settings(root: Path, key: bytes, policies: Path | None = None) -> Settings:
    s = Settings(state_dir=root, **({"policies_dir": policies} if policies else {}))
    init_key(s.hmac_key_file)
    s.hmac_key_file.write_bytes(key)  # one key: the same local ids give the same pseudonyms
    return s


def pooled(s: Settings) -> dict[str, list]:
    con = duckdb.connect(str(PooledStore(s.pooled_dir).db_path), read_only=True)
    try:
        return {
            t: con.execute(f"SELECT * EXCLUDE (load_batch) FROM {t} ORDER BY ALL").fetchall()
            for t in TABLES
        }
    finally:
        con.close()


def ingest(s: Settings, site: str, files, **kw):
    return ingest_files(s, site, files, quality_report=False, **kw)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, delivery, key) -> dict[str, list]:
    """The pooled rows of the clean delivery (UTF-8, LF, no empty line)."""
    root = tmp_path_factory.mktemp("reference")
    s = new_settings(root / "state", key)
    r = ingest(s, "uk-ccr", site_files.write(delivery, root / "in"))
    assert r.status == "loaded", r.errors
    return pooled(s)


def edited(directory: Path, delivery, change, fmt: str = "csv") -> list[Path]:
    files = site_files.write(delivery, directory, fmt)
    for path in files:
        path.write_bytes(change(path.read_bytes()))
    return files


def _blank_blocks(b: bytes) -> bytes:
    """Excel/R style: an empty line and a line of separators between blocks, two at the end."""
    lines = b.split(b"\n")
    width = lines[0].count(b",")
    out = [lines[0]]
    for i, line in enumerate(lines[1:], 1):
        out.append(line)
        if i % 7 == 0:
            out += [b"", b"," * width]
    return b"\n".join(out) + b"\n\n"


# each must load exactly the reference rows (all were refused or rejected before)
VARIANTS = {
    "trailing empty lines": lambda b: b + b"\n\n",
    "trailing CRLF empty lines": lambda b: b.replace(b"\n", b"\r\n") + b"\r\n\r\n",
    "empty lines and separator-only lines between blocks": _blank_blocks,
    "empty quoted values only": lambda b: b + b'"",""\n',
    "empty lines before the header": lambda b: b"\n\n" + b,
    "CR line ends (CSV Macintosh)": lambda b: b.replace(b"\n", b"\r"),
    "CR line ends with BOM and empty lines": lambda b: (
        b"\xef\xbb\xbf" + _blank_blocks(b).replace(b"\n", b"\r")
    ),
    "CRLF with BOM": lambda b: b"\xef\xbb\xbf" + b.replace(b"\n", b"\r\n"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_empty_lines_and_line_ends_give_the_rows_of_the_clean_file(
    tmp_path, delivery, key, reference, variant
):
    s = new_settings(tmp_path / "state", key)
    r = ingest(s, "uk-ccr", edited(tmp_path / "in", delivery, VARIANTS[variant]))
    assert r.status == "loaded", r.errors
    assert r.invalid_rows == 0
    assert pooled(s) == reference
    assert r.rows_added == {t: delivery[t].height for t in TABLES}


def _defects(delivery) -> dict[str, pl.DataFrame]:
    d = dict(delivery)
    d["patient"] = site_files.set_cell(d["patient"], 20, "sex", "banana")  # data row 21
    d["tumour"] = site_files.set_cell(d["tumour"], 30, "icdo3_morphology", "1234")  # row 31
    return d


def _line_numbers(path: Path, needle: str, eol: bytes) -> list[int]:
    """The file's own (1-based) line numbers of the lines holding ``needle``: an independent
    reading of where a site finds a row in its editor."""
    lines = path.read_bytes().removeprefix(b"\xef\xbb\xbf").split(eol)
    return [i for i, line in enumerate(lines, 1) if needle.encode() in line]


@pytest.mark.parametrize("eol", [b"\n", b"\r"])
@pytest.mark.parametrize("on_invalid", ["reject", "quarantine"])
def test_row_numbers_stay_the_files_own_after_empty_lines(tmp_path, delivery, key, eol, on_invalid):
    """Errors (and the quarantine, which reads the file again) name the row by its place in
    the file as delivered: row N is line N + 1, the skipped empty lines counted."""
    s = new_settings(tmp_path / "state", key)
    files = edited(
        tmp_path / "in",
        _defects(delivery),
        lambda b: (b"\n" + _blank_blocks(b)).replace(b"\n", eol),
    )
    r = ingest(s, "uk-ccr", files, on_invalid=on_invalid)
    report = pl.read_csv(r.errors_csv)
    assert "required" not in set(report["rule"])  # no empty line became a row
    by_file = {p.stem: p for p in files}
    sex = report.filter((pl.col("table") == "patient") & (pl.col("column") == "sex"))
    assert sex["row"].to_list() == [n - 1 for n in _line_numbers(by_file["patient"], "banana", eol)]
    morph = report.filter((pl.col("table") == "tumour") & (pl.col("column") == "icdo3_morphology"))
    [line] = _line_numbers(by_file["tumour"], ",1234,", eol)
    assert morph["row"].to_list() == [line - 1]
    assert line - 1 > 31  # empty lines above it were counted
    if on_invalid == "reject":
        assert r.status == "rejected"
        return
    assert r.status == "loaded" and r.quarantined_rows == report.select("table", "row").n_unique()
    con = duckdb.connect(str(PooledStore(s.pooled_dir).db_path), read_only=True)
    try:
        quarantined = con.execute("SELECT table_name, source_row, data FROM _quarantine").fetchall()
    finally:
        con.close()
    assert {(t, row) for t, row, _ in quarantined} == set(report.select("table", "row").iter_rows())
    data = {(t, row): json.loads(d) for t, row, d in quarantined}
    # the quarantined row is the one validated (the re-read drops the same empty lines)
    assert data[("patient", sex["row"][0])]["sex"] == "banana"
    assert data[("tumour", line - 1)]["icdo3_morphology"] == "1234"
    loaded = sum(r.rows_added.values())
    assert loaded == sum(delivery[t].height for t in TABLES) - r.quarantined_rows


def test_values_spanning_lines_are_one_row_and_rows_keep_their_line(tmp_path, delivery, key):
    """A quoted value holding a line break is one value of one row, with LF, CRLF and CR line
    ends; row N still starts on line N + 1 of the file: the line break inside the value above
    it is counted (the 21st record starts on line 23 here, so it is row 22)."""
    d = _defects(delivery)
    multi = pl.when(pl.int_range(pl.len()) == 2).then(pl.lit("line one\nline two"))
    d["patient"] = d["patient"].with_columns(multi.otherwise(pl.col("study_id")).alias("study_id"))
    for eol in (b"\n", b"\r\n", b"\r"):
        s = new_settings(tmp_path / f"state{len(eol)}{eol[0]}", key)
        files = edited(tmp_path / f"in{len(eol)}{eol[0]}", d, lambda b, e=eol: b.replace(b"\n", e))
        r = ingest(s, "uk-ccr", files, on_invalid="quarantine")
        assert r.status == "loaded" and r.rows_added["patient"] == d["patient"].height - 1
        rows = pl.read_csv(r.errors_csv).filter(pl.col("table") == "patient")["row"].to_list()
        assert rows == [22]
        patient = next(f for f in files if f.name.startswith("patient"))
        line = patient.read_bytes().split(eol)[rows[0]]  # line N + 1, 0-based N
        assert line.startswith(d["patient"]["patient_id"][20].encode())
        con = duckdb.connect(str(PooledStore(s.pooled_dir).db_path), read_only=True)
        try:
            [(text,)] = con.execute(
                "SELECT study_id FROM patient WHERE study_id LIKE 'line one%'"
            ).fetchall()
        finally:
            con.close()
        assert text == "line one" + eol.decode() + "line two"  # verbatim, as delivered


def test_a_line_of_blanks_is_still_a_row(tmp_path, delivery, key):
    """Only lines holding no character at all (besides separators and empty quotes) are
    skipped: a line of spaces holds something and is reported, not dropped silently."""
    s = new_settings(tmp_path / "state", key)
    files = edited(
        tmp_path / "in", delivery, lambda b: b + b"  ,\n" if b.startswith(b"patient_id,sex") else b
    )
    r = ingest(s, "uk-ccr", files)
    assert r.status == "rejected"
    report = pl.read_csv(r.errors_csv)
    assert set(report.select("table", "row").iter_rows()) == {
        ("patient", delivery["patient"].height + 1)
    }


def test_mixed_old_mac_and_unix_line_ends_are_refused(tmp_path, delivery, key):
    s = new_settings(tmp_path / "state", key)
    files = edited(tmp_path / "in", delivery, lambda b: b.replace(b"\n", b"\r", 1))
    with pytest.raises(IngestError, match=r"patient.csv: .*CR alone.*LF"):
        ingest(s, "uk-ccr", files)
    assert not PooledStore(s.pooled_dir).db_path.exists()


def test_latin1_csv_of_a_utf8_site_is_refused_naming_line_and_encoding(tmp_path, delivery, key):
    s = new_settings(tmp_path / "state", key)
    files = edited(tmp_path / "in", delivery, lambda b: b.decode().encode("cp1252"))
    patient = next(p for p in files if p.stem == "patient")
    # the first accented letter's line, found independently of the reader
    text = patient.read_bytes()
    line = text[: text.index(b"\xc9")].count(b"\n") + 1
    assert line == 4  # the first accented value is on data row 3
    with pytest.raises(IngestError) as info:
        ingest(s, "uk-ccr", files)
    message = str(info.value)
    assert message.startswith("patient.csv: ")
    assert f"line {line}: byte 0xC9 is not UTF-8" in message
    assert "encoding: windows-1252" in message and "iconv" in message
    assert not PooledStore(s.pooled_dir).db_path.exists()
    # a header that is not UTF-8 (polars would read it with replacement characters)
    header = tmp_path / "h" / "patient.csv"
    header.parent.mkdir()
    header.write_bytes(text.replace(b"study_id", b"\xe9tude", 1))
    with pytest.raises(IngestError, match=r"patient.csv: .*line 1: byte 0xE9 is not UTF-8"):
        ingest(s, "uk-ccr", [header])


@pytest.fixture
def legacy_policies(tmp_path) -> Path:
    """The shipped policies with fr-rnce declaring Windows-1252 CSV files."""
    policies = tmp_path / "policies"
    shutil.copytree(REPO_ROOT / "policies", policies)
    site = policies / "sites" / "fr-rnce.yaml"
    site.write_text(site.read_text() + "encoding: windows-1252\n")
    return policies


def test_a_site_declaring_windows_1252_delivers_legacy_csv(
    tmp_path, delivery, key, legacy_policies
):
    """fr-rnce declares `encoding: windows-1252`: its legacy files load with the accents
    right, the same rows as its UTF-8 files (a UTF-8 file is never decoded twice into 'Ã©');
    a byte undefined in Windows-1252 is refused naming the line."""
    results = {}
    for name, encode in {
        "utf-8": lambda b: b,
        "utf-8 with BOM": lambda b: b"\xef\xbb\xbf" + b,
        "windows-1252": lambda b: b.decode().encode("cp1252"),
        "windows-1252, CR, empty lines": lambda b: _blank_blocks(
            b.decode().encode("cp1252")
        ).replace(b"\n", b"\r"),
    }.items():
        s = new_settings(tmp_path / name / "state", key, legacy_policies)
        r = ingest(s, "fr-rnce", edited(tmp_path / name / "in", delivery, encode))
        assert r.status == "loaded", (name, r.errors)
        results[name] = pooled(s)
    assert all(rows == results["utf-8"] for rows in results.values())
    studies = {row[3] for row in results["windows-1252"]["patient"]}
    assert "Étude Léa-Noël" in studies
    s = new_settings(tmp_path / "bad" / "state", key, legacy_policies)
    bad = edited(tmp_path / "bad" / "in", delivery, lambda b: b.decode().encode("cp1252"))
    patient = next(p for p in bad if p.stem == "patient")
    patient.write_bytes(patient.read_bytes().replace(b"\xc9tude", b"\x81tude", 1))
    text = patient.read_bytes()
    line = text[: text.index(b"\x81")].count(b"\n") + 1
    with pytest.raises(IngestError, match=rf"patient.csv: .*line {line}: byte 0x81 is not windows"):
        ingest(s, "fr-rnce", bad)
    # the site's declaration is validated like every other field
    site = legacy_policies / "sites" / "fr-rnce.yaml"
    site.write_text(site.read_text().replace("windows-1252", "ebcdic"))
    from tre.registry import RegistryError, load_registry

    with pytest.raises(RegistryError, match="encoding"):
        load_registry(legacy_policies)


def _parquet_with_binary_text(frame: pl.DataFrame, column: str, values=None) -> bytes:
    """The frame as an old exporter writes it: ``column`` as BINARY without the UTF8
    annotation (no Arrow schema stored, so readers see plain bytes)."""
    table = frame.to_arrow()
    i = table.schema.get_field_index(column)
    raw = values if values is not None else table.column(i).cast(pa.binary())
    table = table.set_column(i, pa.field(column, pa.binary()), raw)
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, store_schema=False)
    data = buf.getvalue().to_pybytes()
    assert pq.read_schema(pa.BufferReader(data)).field(column).type == pa.binary()
    return data


def test_parquet_text_stored_as_binary_is_read_when_it_is_utf8(tmp_path, delivery, key, reference):
    s = new_settings(tmp_path / "state", key)
    files = site_files.write(delivery, tmp_path / "in", "parquet")
    for path in files:  # every text column of every table as BINARY
        table = pq.read_table(path)
        for name in table.column_names:
            path.write_bytes(_parquet_with_binary_text(pl.read_parquet(path), name))
    r = ingest(s, "uk-ccr", files)
    assert r.status == "loaded", r.errors
    assert pooled(s) == reference  # the accents included


def test_parquet_binary_that_is_not_utf8_is_refused_naming_the_column(tmp_path, delivery, key):
    s = new_settings(tmp_path / "state", key)
    files = site_files.write(delivery, tmp_path / "in", "parquet")
    patient = next(p for p in files if p.stem == "patient")
    n = delivery["patient"].height
    values = pa.array(["Étude".encode("latin-1")] * n, pa.binary())
    patient.write_bytes(_parquet_with_binary_text(delivery["patient"], "study_id", values))
    with pytest.raises(
        IngestError, match=r"patient.parquet: column study_id \(binary\) .*not UTF-8"
    ):
        ingest(s, "uk-ccr", files)
    # other types stay refused: nested values, fixed-size binary
    for array in (pa.array([{"a": 1}] * n), pa.array([b"ok"] * n, pa.binary(2))):
        table = delivery["patient"].to_arrow().set_column(3, "study_id", array)
        pq.write_table(table, patient)
        with pytest.raises(IngestError, match="study_id .* nested, binary"):
            ingest(s, "uk-ccr", files)
    assert not PooledStore(s.pooled_dir).db_path.exists()


def test_data_check_reads_deliveries_as_ingest_does(
    tmp_path, delivery, legacy_policies, monkeypatch
):
    """`tre data check` skips the same empty lines, reports the same row numbers, reads
    old-Mac line ends, and uses the site's declared encoding with --site."""
    from tre.cli import app
    from tre.settings import get_settings

    runner = CliRunner()
    site = tmp_path / "fr-rnce"
    edited(site, _defects(delivery), lambda b: _blank_blocks(b).replace(b"\n", b"\r"))
    res = runner.invoke(app, ["data", "check", str(site), "--errors-out", str(tmp_path / "e.csv")])
    assert res.exit_code == 1, res.output
    errors = pl.read_csv(tmp_path / "e.csv")
    assert "required" not in set(errors["rule"])
    sex = errors.filter((pl.col("table") == "patient") & (pl.col("column") == "sex"))
    patient = site / "patient.csv"
    assert sex["row"].to_list() == [n - 1 for n in _line_numbers(patient, "banana", b"\r")]
    # Windows-1252: refused naming the line without the declaration, read with it
    edited(site, delivery, lambda b: b.decode().encode("cp1252"))
    res = runner.invoke(app, ["data", "check", str(site)])
    assert res.exit_code == 2 and "is not UTF-8" in res.output, res.output
    monkeypatch.setenv("TRE_POLICIES_DIR", str(legacy_policies))
    get_settings.cache_clear()
    try:
        res = runner.invoke(app, ["data", "check", "--site", "fr-rnce", str(site)])
        assert res.exit_code == 0 and "no errors" in res.output, res.output
        res = runner.invoke(app, ["data", "check", "--site", "nowhere", str(site)])
        assert res.exit_code == 2 and "unknown site" in res.output
    finally:
        get_settings.cache_clear()


def test_skipped_empty_lines_are_said(tmp_path, delivery, key):
    """A site reconciling its row counts learns that empty lines were not rows."""
    from structlog.testing import capture_logs

    s = new_settings(tmp_path / "state", key)
    with capture_logs() as logs:
        r = ingest(s, "uk-ccr", edited(tmp_path / "in", delivery, _blank_blocks))
    assert r.status == "loaded", r.errors
    said = [e for e in logs if e["event"] == "empty lines skipped"]
    assert said and all(e["lines"] > 0 for e in said), logs
    with capture_logs() as logs:
        ingest(
            new_settings(tmp_path / "clean", key), "uk-ccr", edited(tmp_path / "c", delivery, bytes)
        )
    assert not [e for e in logs if e["event"] == "empty lines skipped"]

"""Fuzzing ingest: hostile or broken deliveries from a semi-trusted site.

Every delivery starts as a small valid one (``site_files``) and is then broken: random bytes,
truncation, other encodings, NUL bytes, CR/CRLF line ends, header names added, dropped, repeated,
renamed or emptied, very long fields, open quotes, Parquet columns of other types (nested, binary,
dictionary, decimal, timestamps, all-null), a corrupt Parquet page header (a huge declared number
of values), Parquet that is CSV and vice versa, empty files, header-only files, directories,
FIFOs and symbolic links in place of files, duplicate rows, ids with blanks or Unicode.

Whatever happens, the outcome must be one of:

* the batch loads, and every live pooled row of the site passes the dictionary again;
* the batch is rejected (or its invalid rows quarantined) with a per-row error report, and no
  pooled data changed;
* an ``IngestError`` whose message names the broken file, and nothing at all changed: the pooled
  tables (row counts and a hash of every row), ``_batches``, ``_versions`` and the batch records.

Never another exception, and never a crashed process (the CLI is run as a real subprocess).
"""

from __future__ import annotations

import datetime as dt
import decimal
import hashlib
import io
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import site_files
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tre.dictionary import load_dictionary, validate_batch
from tre.ingest import IngestError, ingest_files
from tre.pooled import PooledStore
from tre.pseudonymise import init_key
from tre.settings import Settings

TABLES = ("patient", "tumour", "treatment", "event", "followup")
SITE = "uk-ccr"
DELIVERY = site_files.generate(12, seed=3)
DICTIONARY = load_dictionary()
FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A state directory with a key and one loaded batch of the same site (other ids)."""
    root = tmp_path_factory.mktemp("template")
    s = Settings(state_dir=root / "state")
    init_key(s.hmac_key_file)
    earlier = site_files.write(site_files.generate(10, seed=9, id_prefix="Q"), root / "earlier")
    assert ingest_files(s, SITE, earlier, quality_report=False).status == "loaded"
    return root / "state"


@pytest.fixture
def fresh(template, tmp_path) -> Settings:
    shutil.copytree(template, tmp_path / "state")
    return Settings(state_dir=tmp_path / "state")


def fingerprint(s: Settings) -> dict:
    """Everything an ingest may change: every table of the store (row count and a hash of all
    its rows, order-independent) and every file under the batch records."""
    store = PooledStore(s.pooled_dir)
    out: dict = {}
    con = duckdb.connect(str(store.db_path), read_only=True)
    try:
        for (t,) in con.execute("SELECT table_name FROM duckdb_tables() ORDER BY 1").fetchall():
            out[t] = con.execute(
                f'SELECT count(*), coalesce(sum(hash(columns(*))), 0) FROM "{t}"'
            ).fetchone()
    finally:
        con.close()
    out["files"] = sorted(
        (str(p.relative_to(store.batches_dir)), hashlib.sha256(p.read_bytes()).hexdigest())
        for p in store.batches_dir.rglob("*")
        if p.is_file()
    )
    return out


def live_site_rows(s: Settings) -> dict[str, pl.DataFrame]:
    """The site's live pooled rows, delivered columns only, as the text a site would send."""
    con = duckdb.connect(str(PooledStore(s.pooled_dir).db_path), read_only=True)
    try:
        out = {}
        for t in TABLES:
            cols = ", ".join(f'"{c}"::VARCHAR AS "{c}"' for c in DICTIONARY.delivered_columns(t))
            out[t] = pl.DataFrame(
                con.sql(
                    f"SELECT {cols} FROM {t} WHERE site_id = '{SITE}' AND load_batch NOT IN "
                    "(SELECT batch_id FROM _retired)"
                )
            )
        return out
    finally:
        con.close()


def check_outcome(s: Settings, files: list[Path], broken: str, on_invalid: str) -> str:
    """Ingest and check the contract; returns the outcome (for the tests' own assertions)."""
    before = fingerprint(s)
    try:
        r = ingest_files(s, SITE, files, on_invalid=on_invalid, quality_report=False)
    except IngestError as exc:
        message = str(exc)
        assert broken in message, f"the error does not name {broken}: {message}"
        assert fingerprint(s) == before, "a refused batch changed the store"
        return "error"
    after = fingerprint(s)
    if r.status == "rejected":
        assert on_invalid == "reject" and r.invalid_rows > 0 and r.errors.height > 0
        assert pl.read_csv(r.errors_csv, infer_schema=False).height == r.errors.height
        for t in [*TABLES, "_versions", "_quarantine"]:  # only the rejection is recorded
            assert after.get(t) == before.get(t), t
        assert after["_batches"][0] == before["_batches"][0] + 1
        return "rejected"
    assert r.status == "loaded", r.status
    assert after["_versions"][0] == before["_versions"][0] + 1
    assert r.quarantined_rows == (r.invalid_rows if on_invalid == "quarantine" else 0)
    # every live pooled row of the site passes the dictionary again (pseudonyms as ids)
    results = validate_batch(DICTIONARY, live_site_rows(s))
    problems = {t: res.errors.head(3).to_dicts() for t, res in results.items() if res.errors.height}
    assert not problems, problems
    # and loading the same files again changes nothing
    again = ingest_files(s, SITE, files, on_invalid=on_invalid, quality_report=False)
    assert again.status == "unchanged" and fingerprint(s) == after
    return "quarantined" if r.quarantined_rows else "loaded"


# --- building deliveries -----------------------------------------------------------------------
def deliver(directory: Path, fmt: str = "csv") -> dict[str, Path]:
    return {p.stem: p for p in site_files.write(DELIVERY, directory, fmt)}


def edit_bytes(path: Path, change: Callable[[bytes], bytes]) -> None:
    path.write_bytes(change(path.read_bytes()))


def edit_parquet(path: Path, column: str, array: pa.Array) -> None:
    table = pq.read_table(path)
    i = table.schema.get_field_index(column)
    pq.write_table(table.set_column(i, column, array), path)


def corrupt_page_header(path: Path, negative: bool) -> None:
    """Rewrite the value count in the first data page header of an uncompressed, plain-encoded
    Parquet file (same length, so every offset stays right): a negative count, which a reader
    may take for an enormous one, or a larger count than the page holds."""
    table = pq.read_table(path)
    buf = io.BytesIO()
    pq.write_table(table, buf, use_dictionary=False, compression="none")
    data = bytearray(buf.getvalue())
    off = pq.ParquetFile(io.BytesIO(bytes(data))).metadata.row_group(0).column(0).data_page_offset
    # compact thrift: type=DATA_PAGE, two page sizes, then the data page header's num_values
    i = off + 2
    for _ in range(2):
        assert data[i] == 0x15
        i += 1
        while data[i] & 0x80:
            i += 1
        i += 1
    assert data[i : i + 2] == b"\x2c\x15"
    low = data[i + 2]  # the zigzag varint's first byte: its lowest bit is the sign
    data[i + 2] = (low | 0x01) if negative else (low & 0x80) | 0x7E
    path.write_bytes(bytes(data))


N = DELIVERY["patient"].height


def _csv(change: Callable[[bytes], bytes]) -> Callable[[dict[str, Path], str], None]:
    return lambda files, table: edit_bytes(files[table], change)


def _first_id(b: bytes, new: bytes) -> bytes:
    old = DELIVERY["patient"]["patient_id"][1].encode()
    return b.replace(old, new)


def _page_count(path: Path, negative: bool) -> None:
    corrupt_page_header(path, negative=negative)


def _add_column(b: bytes, name: bytes, value: bytes) -> bytes:
    header, _, body = b.partition(b"\n")
    return header + b"," + name + b"\n" + body.replace(b"\n", b"," + value + b"\n")


def _rename(files: dict[str, Path], table: str, suffix: str) -> None:
    target = files[table].with_suffix(suffix)
    files[table].rename(target)
    files[table] = target


def _to_dir(files: dict[str, Path], table: str) -> None:
    files[table].unlink()
    files[table].mkdir()


def _to_fifo(files: dict[str, Path], table: str) -> None:
    files[table].unlink()
    os.mkfifo(files[table])


def _to_symlink(files: dict[str, Path], table: str, dangling: bool = False) -> None:
    elsewhere = files[table].parent.parent / f"elsewhere-{files[table].name}"
    files[table].rename(elsewhere)
    files[table].symlink_to(Path("/nonexistent") if dangling else elsewhere)


# name -> (format, mutation(files, table)); each applied to the patient file and the tumour file
CASES: dict[str, tuple[str, Callable[[dict[str, Path], str], None]]] = {
    "random bytes": ("csv", _csv(lambda b: bytes(range(256)) * 3)),
    "truncated": ("csv", _csv(lambda b: b[: len(b) // 2])),
    "utf-16 with BOM": ("csv", _csv(lambda b: b.decode().encode("utf-16"))),
    "utf-16-le without BOM": ("csv", _csv(lambda b: b.decode().encode("utf-16-le"))),
    "utf-32": ("csv", _csv(lambda b: b.decode().encode("utf-32"))),
    "latin-1": ("csv", _csv(lambda b: _first_id(b, "Zoë".encode("latin-1")))),
    "BOM": ("csv", _csv(lambda b: b"\xef\xbb\xbf" + b)),
    "CRLF": ("csv", _csv(lambda b: b.replace(b"\n", b"\r\n"))),
    "CR only": ("csv", _csv(lambda b: b.replace(b"\n", b"\r"))),
    "mixed line ends": ("csv", _csv(lambda b: b.replace(b"\n", b"\r\n", 3).replace(b"5\n", b"\r"))),
    "NUL in a value": ("csv", _csv(lambda b: _first_id(b, b"P\x001"))),
    "extra column": ("csv", _csv(lambda b: b.replace(b"\n", b",x\n"))),
    "empty header name": ("csv", _csv(lambda b: b.replace(b"\n", b",\n"))),
    "repeated header": ("csv", _csv(lambda b: _add_column(b, b"PATIENT-ID", b"x"))),
    "header renamed": ("csv", _csv(lambda b: b.replace(b"_id", b"_ident", 1))),
    "row-number header": ("csv", _csv(lambda b: _add_column(b, b"_row", b"1"))),
    "header only": ("csv", _csv(lambda b: b.split(b"\n")[0] + b"\n")),
    "empty": ("csv", _csv(lambda b: b"")),
    "very long field": ("csv", _csv(lambda b: _first_id(b, b"x" * 3_000_000))),
    "very long line": ("csv", _csv(lambda b: b.replace(b"\n", b"," + b"y" * 2_000_000 + b"\n", 2))),
    "quote left open": ("csv", _csv(lambda b: _first_id(b, b'"P1'))),
    "ragged row": ("csv", _csv(lambda b: b + b"a,b,c,d,e,f,g,h,i,j,k,l,m\n")),
    "duplicate rows": ("csv", _csv(lambda b: b + b"\n".join(b.split(b"\n")[1:4]) + b"\n")),
    "id with blanks": ("csv", _csv(lambda b: _first_id(b, b" \t P1 "))),
    "id with unicode": ("csv", _csv(lambda b: _first_id(b, "P\u200b１\u0301😀".encode()))),
    "blank lines": ("csv", _csv(lambda b: b.replace(b"\n", b"\n\n"))),
    "parquet that is CSV": ("csv", lambda f, t: _rename(f, t, ".parquet")),
    "CSV that is parquet": ("parquet", lambda f, t: _rename(f, t, ".csv")),
    "directory": ("csv", _to_dir),
    "FIFO": ("csv", _to_fifo),
    "symlink": ("csv", _to_symlink),
    "dangling symlink": ("csv", lambda f, t: _to_symlink(f, t, dangling=True)),
    "parquet truncated": ("parquet", _csv(lambda b: b[: len(b) // 2])),
    "parquet random footer": ("parquet", _csv(lambda b: b[:-40] + bytes(range(36)) + b"PAR1")),
    "parquet negative page value count": ("parquet", lambda f, t: _page_count(f[t], True)),
    "parquet huge page value count": ("parquet", lambda f, t: _page_count(f[t], False)),
    "parquet with no rows": ("parquet", lambda f, t: pq.write_table(pq.read_table(f[t])[:0], f[t])),
}  # fmt: skip
# a Parquet column of another type in place of the id column, by its number of rows
PARQUET_COLUMNS: dict[str, Callable[[int], pa.Array]] = {
    "list": lambda n: pa.array([["a"]] * n),
    "struct": lambda n: pa.array([{"a": 1}] * n),
    "map": lambda n: pa.array([[("k", "v")]] * n, pa.map_(pa.string(), pa.string())),
    "binary": lambda n: pa.array([b"\xff\x00"] * n),
    "duration": lambda n: pa.array([dt.timedelta(1)] * n),
    "dictionary": lambda n: pa.array([f"P{i % 3}" for i in range(n)]).dictionary_encode(),
    "decimal": lambda n: pa.array([decimal.Decimal("1.5")] * n, pa.decimal128(4, 1)),
    "decimal256": lambda n: pa.array([decimal.Decimal(7)] * n, pa.decimal256(40, 0)),
    "timestamp": lambda n: pa.array([dt.datetime(2001, 1, 1)] * n, pa.timestamp("ns", tz="UTC")),
    "all-null": pa.nulls,
}
for _kind, _make in PARQUET_COLUMNS.items():
    CASES[f"parquet {_kind} column"] = (
        "parquet",
        lambda f, t, make=_make: edit_parquet(f[t], "patient_id", make(DELIVERY[t].height)),
    )


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_delivery_is_loaded_rejected_or_refused_and_never_crashes(fresh, tmp_path, case):
    fmt, mutate = CASES[case]
    files = deliver(tmp_path / "in", fmt)
    # half the cases break the patient file under 'reject', the others the tumour file under
    # 'quarantine' (where its invalid rows' dependants are quarantined too)
    on_invalid = ("reject", "quarantine")[list(CASES).index(case) % 2]
    table = "patient" if on_invalid == "reject" else "tumour"
    mutate(files, table)
    # the site's directory as the admin passes it, or the files one by one
    given = [tmp_path / "in"] if case in {"symlink", "FIFO"} else list(files.values())
    outcome = check_outcome(fresh, given, files[table].name, on_invalid)
    if case in REFUSED:
        assert outcome == "error", outcome
    if case in LOADS:
        assert outcome == "loaded", outcome


# cases that must refuse the whole file (the others may also load, be rejected or quarantined)
REFUSED = {
    "random bytes", "utf-16 with BOM", "utf-16-le without BOM", "utf-32", "latin-1",
    "NUL in a value", "extra column", "empty header name", "repeated header",
    "header renamed", "row-number header", "empty", "quote left open", "ragged row",
    "parquet that is CSV", "CSV that is parquet", "directory", "FIFO", "symlink",
    "dangling symlink", "parquet truncated", "parquet random footer",
    "parquet negative page value count", "parquet list column", "parquet struct column",
    "parquet map column", "parquet binary column", "parquet duration column",
}  # fmt: skip
# spreadsheet and old-Mac quirks of valid files, which must load as the clean files do
LOADS = {"BOM", "CRLF", "CR only", "blank lines"}


# --- random breakage -----------------------------------------------------------------------------
SNIPPETS = [b"\x00", b'"', b"\r", b"\n", b"\r\n", b",", b";", b"\t", b"\xef\xbb\xbf", b"\xff",
            b"\xc3", "é".encode(), "😀".encode(), b"''", b'""', b"\\", b"x" * 70_000]  # fmt: skip


@st.composite
def byte_edits(draw: st.DrawFn) -> list[tuple[float, int, bytes]]:
    """Edits at relative positions: (where, how many bytes to remove, what to insert)."""
    snippet = st.one_of(st.sampled_from(SNIPPETS), st.binary(min_size=1, max_size=8))
    edit = st.tuples(st.floats(0, 1), st.integers(0, 40), snippet | st.just(b""))
    return draw(st.lists(edit, min_size=1, max_size=4))


def apply_edits(data: bytes, edits: list[tuple[float, int, bytes]]) -> bytes:
    for where, cut, insert in edits:
        i = int(where * len(data))
        data = data[:i] + insert + data[i + cut :]
    return data


@FUZZ
@given(
    fmt=st.sampled_from(["csv", "parquet"]),
    table=st.sampled_from(TABLES),
    edits=byte_edits(),
    on_invalid=st.sampled_from(["reject", "quarantine"]),
)
def test_random_byte_edits_never_crash_or_change_the_store_on_failure(
    template, tmp_path, fmt, table, edits, on_invalid
):
    s = Settings(state_dir=tmp_path / "state")  # one fresh copy per example
    shutil.rmtree(s.state_dir, ignore_errors=True)
    shutil.copytree(template, s.state_dir)
    shutil.rmtree(tmp_path / "in", ignore_errors=True)
    files = deliver(tmp_path / "in", fmt)
    edit_bytes(files[table], lambda b: apply_edits(b, edits))
    check_outcome(s, list(files.values()), files[table].name, on_invalid)


@settings(FUZZ, max_examples=25)
@given(
    fmt=st.sampled_from(["csv", "parquet"]),
    table=st.sampled_from(TABLES),
    row=st.integers(0, 11),
    column=st.integers(0, 10),
    value=st.one_of(st.none(), st.text(max_size=30), st.sampled_from(["", " ", "NA", "1e308"])),
    header=st.one_of(st.none(), st.text(max_size=12)),
    repeat=st.integers(0, 3),
)
def test_random_cells_headers_and_repeated_rows(
    template, tmp_path, fmt, table, row, column, value, header, repeat
):
    """Any text in any cell (or as a header name), and repeated rows: a clear outcome."""
    s = Settings(state_dir=tmp_path / "state")
    shutil.rmtree(s.state_dir, ignore_errors=True)
    shutil.copytree(template, s.state_dir)
    shutil.rmtree(tmp_path / "in", ignore_errors=True)
    d = dict(DELIVERY)
    df = d[table]
    name = df.columns[column % df.width]
    if df.height:
        df = site_files.set_cell(df, row % df.height, name, value)
        df = pl.concat([df, df.head(repeat)])
    if header is not None:
        df = df.rename({name: header}) if header not in df.columns else df
    d[table] = df
    files = {p.stem: p for p in site_files.write(d, tmp_path / "in", fmt)}
    check_outcome(s, list(files.values()), files[table].name, "quarantine")


# --- the CLI, as a real process ----------------------------------------------------------------
@pytest.mark.parametrize("case", ["parquet negative page value count", "utf-16 with BOM"])
def test_cli_refuses_a_broken_delivery_with_exit_2_and_no_traceback(fresh, tmp_path, case):
    fmt, mutate = CASES[case]
    files = deliver(tmp_path / "in", fmt)
    mutate(files, "tumour")
    before = fingerprint(fresh)
    env = dict(os.environ, TRE_STATE_DIR=str(fresh.state_dir), RUST_BACKTRACE="0")
    res = subprocess.run(
        [sys.executable, "-c", "from tre.cli import main; main()", "data", "ingest",
         "--site", SITE, str(tmp_path / "in"), "--no-report"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    output = res.stdout + res.stderr
    assert res.returncode == 2, output
    assert "error:" in output and files["tumour"].name in output and "nothing was changed" in output
    assert "Traceback" not in output and "panicked" not in output
    assert fingerprint(fresh) == before

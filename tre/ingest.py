"""Ingest a site's files into the pooled store: validate, harmonise, recode, pseudonymise, load.

One call of :func:`ingest_files` is one *batch*, identified by the content hash of its files and
the site. A batch loads completely or not at all:

1. read every file (CSV or Parquet; the table is named by the file name, e.g. ``tumour.csv``);
2. validate and harmonise every row against the data dictionary (``tre.dictionary``), derive
   ICCC-3 (``tre.iccc3``), then check keys across the batch and the pooled store (duplicate
   ids, rows whose patient or tumour is unknown);
3. pseudonymise local ids with the keyed HMAC (``tre.pseudonymise``) and stamp provenance
   (``site_id``, ``source_dataset``, ``source_version``, ``load_batch``);
4. in ONE DuckDB transaction: insert the rows, the quarantined rows, the batch record and the
   next pooled version; commit. A crash before the commit leaves the store as it was.

Invalid rows go to a per-row error report (``errors.csv`` next to the batch record, and a rich
summary table in the CLI). By policy (``Settings.ingest_invalid_rows`` / ``--on-invalid``) they
either reject the whole batch or are quarantined, and the valid rows load. Re-ingesting a loaded
batch changes nothing. After a load, a data-quality report is written under
``Settings.reports_dir``. The work is vectorised (polars, DuckDB): no per-row Python.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import signal
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import polars as pl
import structlog

from tre.pooled import PooledStore
from tre.pseudonymise import Pseudonymiser, load_key
from tre.registry import CORE_TABLES, Registry, load_registry
from tre.settings import Settings

log = structlog.get_logger(__name__)

PROVENANCE_COLUMNS = ("site_id", "source_dataset", "source_version", "load_batch")
# Columns holding a site-local identifier, and the kind of thing they identify (the kind is part
# of the HMAC message, so a patient id and a tumour id never share a pseudonym).
IDENTIFIER_KINDS = {
    "patient_id": "patient",
    "tumour_id": "tumour",
    "treatment_id": "treatment",
    "event_id": "event",
    "followup_id": "followup",
}
# Each table's own key and the parent keys its rows must point to. Parents load first.
TABLE_KEYS: dict[str, str | None] = {
    "patient": "patient_id",
    "tumour": "tumour_id",
    "treatment": "treatment_id",
    "event": "event_id",
    "followup": "followup_id",
}
PARENTS: dict[str, tuple[tuple[str, str], ...]] = {
    "patient": (),
    "tumour": (("patient_id", "patient"),),
    "treatment": (("tumour_id", "tumour"),),
    "event": (("tumour_id", "tumour"),),
    "followup": (("patient_id", "patient"),),
}
ERROR_COLUMNS = ("table", "row", "column", "value", "rule", "message")
SUPPORTED_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


class IngestError(RuntimeError):
    """The batch cannot be ingested at all (unknown site, unreadable file...); nothing changed."""


@dataclass
class BatchResult:
    batch_id: str
    site_id: str
    status: str  # loaded | rejected | unchanged
    pooled_version: int | None
    rows_added: dict[str, int] = field(default_factory=dict)
    invalid_rows: int = 0
    quarantined_rows: int = 0
    batch_dir: Path | None = None
    errors_csv: Path | None = None
    report_html: Path | None = None
    report_error: str | None = None
    errors: pl.DataFrame | None = None  # the per-row error report

    @property
    def ok(self) -> bool:
        return self.status in {"loaded", "unchanged"}


# ---------------------------------------------------------------------------------------------
# test hook: fault injection at named points, to prove atomicity under kill -9
def _crash_point(name: str) -> None:
    if os.environ.get("TRE_INGEST_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
def table_of(path: Path) -> str:
    """Which core table a delivered file holds, from its name (``tumour.csv``,
    ``uk-ccr_tumour.parquet``, ``2026-tumour.csv``)."""
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise IngestError(
            f"{path.name}: unsupported file type {suffix!r}; deliver CSV or Parquet files"
        )
    stem = path.stem.lower()
    for table in CORE_TABLES:
        if stem == table or any(stem.endswith(sep + table) for sep in ("_", "-", ".")):
            return table
    raise IngestError(
        f"{path.name}: cannot tell which table this file holds; name it after one of "
        f"{', '.join(CORE_TABLES)} (e.g. tumour.csv or {CORE_TABLES[0]}.parquet)"
    )


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def batch_identity(site_id: str, files: dict[str, tuple[Path, str]]) -> str:
    """Content hash of the site and (table, file sha256) pairs: names and order do not matter."""
    h = hashlib.sha256(f"site={site_id}\n".encode())
    for table in sorted(files):
        h.update(f"{table}={files[table][1]}\n".encode())
    return h.hexdigest()[:24]


def _read(path: Path) -> pl.DataFrame:
    """Read a delivered file as text columns: the dictionary does the typing and says why a
    value is wrong, instead of the reader guessing types."""
    try:
        if SUPPORTED_SUFFIXES[path.suffix.lower()] == "csv":
            return pl.read_csv(path, infer_schema=False, raise_if_empty=False)
        df = pl.read_parquet(path)
        return df.with_columns(pl.all().cast(pl.String))
    except (pl.exceptions.PolarsError, OSError, ValueError) as exc:
        raise IngestError(f"{path.name}: cannot be read: {exc}") from exc


@contextmanager
def _progress(enabled: bool, total: int) -> Iterator:
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TimeElapsedColumn(), transient=False
    ) as bar:
        task = bar.add_task("ingest", total=total)

        class _Step:
            def __call__(self, description: str) -> None:
                bar.update(task, advance=1, description=description)

        yield _Step()


# ---------------------------------------------------------------------------------------------
# the data dictionary (owned by tre.dictionary); the few calls made to it are kept here
def _dictionary(settings: Settings):  # noqa: ANN202 - type lives in tre.dictionary
    from tre.dictionary import load_dictionary

    return load_dictionary(settings.policies_dir / "dictionary.yaml")


def _validate(dictionary, raw: dict[str, pl.DataFrame]) -> dict:  # noqa: ANN001
    from tre.dictionary import validate_batch

    return validate_batch(dictionary, raw)


def _recode(df: pl.DataFrame) -> pl.DataFrame:
    from tre.iccc3 import recode

    return recode(df, "icdo3_morphology", "icdo3_behaviour", "icdo3_topography")


# ---------------------------------------------------------------------------------------------
def _errors_frame(frames: list[pl.DataFrame]) -> pl.DataFrame:
    schema = {c: pl.String for c in ERROR_COLUMNS} | {"row": pl.Int64}
    if not frames:
        return pl.DataFrame(schema=schema)
    return pl.concat(
        [f.select([pl.col(c).cast(schema[c]) for c in ERROR_COLUMNS]) for f in frames]
    ).sort(["table", "row", "column"])


def _key_errors(
    con: duckdb.DuckDBPyConnection,
    table: str,
    staged: str,
    pooled_tables: set[str],
    site_id: str,
) -> pl.DataFrame:
    """Duplicate keys (in the batch or already pooled) and rows pointing at unknown parents."""
    cols = {r[0] for r in con.execute(f"DESCRIBE {staged}").fetchall()}
    parts: list[str] = []
    key = TABLE_KEYS.get(table)
    if key and key in cols:
        parts.append(
            f"SELECT _row, '{key}' AS column, _local_{key} AS value, 'unique_key' AS rule, "
            f"'{key} occurs more than once in this batch' AS message FROM {staged} "
            f"WHERE {key} IN (SELECT {key} FROM {staged} GROUP BY {key} HAVING count(*) > 1)"
        )
        if table in pooled_tables:
            parts.append(
                f"SELECT _row, '{key}', _local_{key}, 'unique_key', "
                f"'{key} is already in the pooled store (loaded by an earlier batch)' "
                f"FROM {staged} WHERE {key} IN (SELECT {key} FROM main.{table})"
            )
    for col, parent in PARENTS.get(table, ()):
        if col not in cols:
            continue
        sources = [f"SELECT {col} FROM _ok_{parent}"] if _exists(con, f"_ok_{parent}") else []
        if parent in pooled_tables:
            sources.append(f"SELECT {col} FROM main.{parent} WHERE site_id = '{site_id}'")
        known = " UNION ALL ".join(sources) or f"SELECT NULL::VARCHAR AS {col} WHERE FALSE"
        parts.append(
            f"SELECT _row, '{col}', _local_{col}, 'known_{parent}', "
            f"'no valid {parent} row with this {col} in the batch or the pooled store' "
            f"FROM {staged} WHERE {col} IS NOT NULL AND {col} NOT IN ({known})"
        )
    if not parts:
        return _errors_frame([])
    sql = " UNION ALL ".join(parts)
    df = con.sql(sql).pl()
    df.columns = ["row", "column", "value", "rule", "message"]
    return df.with_columns(pl.lit(table).alias("table"))


def _exists(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    return bool(
        con.execute(
            "SELECT count(*) FROM duckdb_tables() WHERE table_name = $n", {"n": name}
        ).fetchone()[0]
    )


def _write_batch_record(
    directory: Path, record: dict, errors: pl.DataFrame, quarantine: pl.DataFrame | None
) -> None:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    errors.write_csv(directory / "errors.csv")
    if quarantine is not None and quarantine.height:
        quarantine.write_csv(directory / "quarantine.csv")
    (directory / "batch.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    for p in directory.iterdir():
        fd = os.open(p, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def _publish(staging: Path, final: Path) -> None:
    """Move the staged batch record into place (replacing one from an earlier attempt)."""
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
        os.replace(staging, final)
        for p in old.iterdir():
            p.unlink()
        old.rmdir()
    else:
        os.replace(staging, final)


def _quality_report(settings: Settings, store: PooledStore, batch_id: str) -> tuple[Path, str]:
    assert settings.reports_dir is not None
    settings.reports_dir.mkdir(parents=True, exist_ok=True)
    out = settings.reports_dir / f"{batch_id}.html"
    try:
        from tre.quality import build_quality_report

        with store._locked(exclusive=False, timeout=120):
            build_quality_report(store.db_path, batch_id, out)
        return out, ""
    except Exception as exc:  # noqa: BLE001 - a report failure must not undo a committed batch
        log.warning("quality report failed", batch=batch_id, error=str(exc))
        return out, f"{type(exc).__name__}: {exc}"


def ingest_files(
    settings: Settings,
    site_id: str,
    files: Sequence[Path | str],
    *,
    source_version: str | None = None,
    on_invalid: str | None = None,
    registry: Registry | None = None,
    progress: bool = False,
    quality_report: bool = True,
) -> BatchResult:
    """Ingest one batch of a site's files; see the module docstring for the guarantees."""
    on_invalid = on_invalid or settings.ingest_invalid_rows
    if on_invalid not in {"reject", "quarantine"}:
        raise IngestError(f"--on-invalid must be 'reject' or 'quarantine', not {on_invalid!r}")
    registry = registry or load_registry(settings.policies_dir)
    site = registry.sites.get(site_id)
    if site is None:
        raise IngestError(f"unknown site {site_id!r}; declared sites: {', '.join(registry.sites)}")
    if not files:
        raise IngestError("no files given")
    by_table: dict[str, tuple[Path, str]] = {}
    for f in map(Path, files):
        if not f.is_file():
            raise IngestError(f"{f}: no such file")
        table = table_of(f)
        if table in by_table:
            raise IngestError(f"{f.name} and {by_table[table][0].name} both hold table {table!r}")
        by_table[table] = (f, _sha256_file(f))
    batch_id = batch_identity(site_id, by_table)
    version_label = source_version or "unversioned"
    assert settings.pooled_dir is not None and settings.extracts_dir is not None
    key = load_key(
        settings.hmac_key_file,  # type: ignore[arg-type]
        forbidden_dirs=(settings.pooled_dir, settings.extracts_dir),
    )
    pseudonymiser = Pseudonymiser(key)
    store = PooledStore(settings.pooled_dir)
    final_dir = store.batches_dir / batch_id
    order = [t for t in CORE_TABLES if t in by_table]

    with store.writer() as con, _progress(progress, 4 + 2 * len(order)) as step:
        step = step or (lambda _d: None)
        previous = store.batch_record(con, batch_id)
        if previous is not None and previous["status"] == "loaded":
            result = BatchResult(
                batch_id, site_id, "unchanged", previous["pooled_version"], batch_dir=final_dir
            )
            if not (final_dir / "batch.json").exists():  # crashed after the commit: repair
                errs = _errors_frame([])
                staging = store.batches_dir / f".staging-{batch_id}-{os.getpid()}"
                _write_batch_record(staging, previous, errs, None)
                _publish(staging, final_dir)
            result.errors_csv = final_dir / "errors.csv"
            step("already loaded")
        else:
            result = _ingest_new(
                con,
                store,
                pseudonymiser,
                settings,
                site,
                by_table,
                order,
                batch_id,
                version_label,
                on_invalid,
                step,
            )
    if result.status in {"loaded", "unchanged"} and quality_report:
        out = (settings.reports_dir or Path()) / f"{batch_id}.html"
        if result.status == "loaded" or not out.exists():
            result.report_html, err = _quality_report(settings, store, batch_id)
            result.report_error = err or None
        else:
            result.report_html = out
    return result


def _ingest_new(
    con: duckdb.DuckDBPyConnection,
    store: PooledStore,
    pseudonymiser: Pseudonymiser,
    settings: Settings,
    site,  # noqa: ANN001 - tre.registry.Site
    by_table: dict[str, tuple[Path, str]],
    order: list[str],
    batch_id: str,
    source_version: str,
    on_invalid: str,
    step,  # noqa: ANN001
) -> BatchResult:
    site_id = site.id
    raw = {}
    for table in order:
        raw[table] = _read(by_table[table][0])
        step(f"read {table}")
    dictionary = _dictionary(settings)
    results = _validate(dictionary, raw)
    step("validated")

    error_frames: list[pl.DataFrame] = []
    pooled_tables = set(store.data_tables(con))
    pads = pseudonymiser.register(con)
    provenance = {
        "site_id": site_id,
        "source_dataset": site.source_dataset,
        "source_version": source_version,
        "load_batch": batch_id,
    }
    # stage each table in dependency order: pseudonymise, then key checks against parents
    for table in order:
        res = results[table]
        valid: pl.DataFrame = res.valid
        if res.errors.height:
            error_frames.append(res.errors.with_columns(pl.lit(table).alias("table")))
        if table == "tumour" and valid.height:
            valid = _recode(valid)
        valid = valid.with_columns([pl.lit(v, pl.String).alias(k) for k, v in provenance.items()])
        id_cols = [c for c in valid.columns if c in IDENTIFIER_KINDS]
        con.register("_incoming", valid.to_arrow())
        select = ["i.* EXCLUDE (" + ", ".join(id_cols) + ")" if id_cols else "i.*"]
        for c in id_cols:
            expr = pseudonymiser.sql(IDENTIFIER_KINDS[c], site_id, f"i.{c}::VARCHAR", pads)
            select += [f"{expr} AS {c}", f"i.{c}::VARCHAR AS _local_{c}"]
        con.execute(
            f"CREATE OR REPLACE TEMP TABLE _stage_{table} AS "
            f"SELECT {', '.join(select)} FROM _incoming AS i"
        )
        con.unregister("_incoming")
        key_errors = _key_errors(con, table, f"_stage_{table}", pooled_tables, site_id)
        if key_errors.height:
            error_frames.append(key_errors)
        bad_rows = key_errors["row"].unique().to_list() if key_errors.height else []
        con.execute(
            f"CREATE OR REPLACE TEMP TABLE _ok_{table} AS SELECT * FROM _stage_{table} "
            "WHERE _row NOT IN (SELECT unnest($bad::BIGINT[]))",
            {"bad": bad_rows},
        )
        step(f"pseudonymised {table}")

    errors = _errors_frame(error_frames)
    invalid_rows = errors.select(["table", "row"]).unique().height
    files_meta = [
        {"table": t, "name": by_table[t][0].name, "sha256": by_table[t][1], "rows": raw[t].height}
        for t in order
    ]
    staging = store.batches_dir / f".staging-{batch_id}-{os.getpid()}"
    final_dir = store.batches_dir / batch_id
    now = dt.datetime.now(dt.UTC)
    record = {
        "batch_id": batch_id,
        "site_id": site_id,
        "source_dataset": site.source_dataset,
        "source_version": source_version,
        "files": files_meta,
        "invalid_rows": invalid_rows,
        "on_invalid": on_invalid,
        "recorded_at": now.isoformat(),
    }
    if invalid_rows and on_invalid == "reject":
        record |= {"status": "rejected", "pooled_version": None, "row_counts": {}}
        _write_batch_record(staging, record, errors, None)
        con.execute("BEGIN TRANSACTION")
        con.execute("DELETE FROM _batches WHERE batch_id = $b", {"b": batch_id})
        _insert_batch_row(con, record, quarantined=0)
        con.execute("COMMIT")
        _publish(staging, final_dir)
        step("rejected")
        return BatchResult(
            batch_id,
            site_id,
            "rejected",
            None,
            invalid_rows=invalid_rows,
            batch_dir=final_dir,
            errors_csv=final_dir / "errors.csv",
            errors=errors,
        )

    quarantine = _quarantine_rows(con, raw, errors, pseudonymiser, site_id, pads, batch_id)
    version = store.current_version(con) + 1
    rows_added: dict[str, int] = {}
    _crash_point("before-transaction")
    con.execute("BEGIN TRANSACTION")
    for table in order:
        data_cols = [
            r[0]
            for r in con.execute(f"DESCRIBE _ok_{table}").fetchall()
            if r[0] != "_row" and not r[0].startswith("_local_")
        ]
        if table not in pooled_tables:
            cols = ", ".join(f'"{c}"' for c in data_cols)
            con.execute(f"CREATE TABLE main.{table} AS SELECT {cols} FROM _ok_{table} LIMIT 0")
        cols = ", ".join(f'"{c}"' for c in data_cols)
        con.execute(f"INSERT INTO main.{table} BY NAME SELECT {cols} FROM _ok_{table}")
        rows_added[table] = con.execute(f"SELECT count(*) FROM _ok_{table}").fetchone()[0]
        step(f"wrote {table}")
        _crash_point(f"after-insert-{table}")
    if quarantine.height:
        con.register("_q", quarantine.to_arrow())
        con.execute(
            "INSERT INTO _quarantine SELECT $b, table_name, source_row, errors, data FROM _q",
            {"b": batch_id},
        )
        con.unregister("_q")
    totals = {t: con.execute(f"SELECT count(*) FROM main.{t}").fetchone()[0] for t in order}
    record |= {"status": "loaded", "pooled_version": version, "row_counts": rows_added}
    con.execute("DELETE FROM _batches WHERE batch_id = $b", {"b": batch_id})
    _insert_batch_row(con, record, quarantined=invalid_rows)
    con.execute(
        "INSERT INTO _versions VALUES ($v, $b, $t, $c)",
        {"v": version, "b": batch_id, "t": now, "c": json.dumps(totals)},
    )
    _write_batch_record(staging, record | {"quarantined_rows": invalid_rows}, errors, quarantine)
    _crash_point("before-commit")
    con.execute("COMMIT")
    _crash_point("after-commit")
    _publish(staging, final_dir)
    step("committed")
    return BatchResult(
        batch_id,
        site_id,
        "loaded",
        version,
        rows_added=rows_added,
        invalid_rows=invalid_rows,
        quarantined_rows=invalid_rows,
        batch_dir=final_dir,
        errors_csv=final_dir / "errors.csv",
        errors=errors,
    )


def _insert_batch_row(con: duckdb.DuckDBPyConnection, record: dict, quarantined: int) -> None:
    con.execute(
        "INSERT INTO _batches VALUES ($id, $site, $ds, $sv, $status, $v, $files, $rows, "
        "$invalid, $quarantined, $on_invalid, $at)",
        {
            "id": record["batch_id"],
            "site": record["site_id"],
            "ds": record["source_dataset"],
            "sv": record["source_version"],
            "status": record["status"],
            "v": record["pooled_version"],
            "files": json.dumps(record["files"]),
            "rows": json.dumps(record["row_counts"]),
            "invalid": record["invalid_rows"],
            "quarantined": quarantined,
            "on_invalid": record["on_invalid"],
            "at": record["recorded_at"],
        },
    )


def _quarantine_rows(
    con: duckdb.DuckDBPyConnection,
    raw: dict[str, pl.DataFrame],
    errors: pl.DataFrame,
    pseudonymiser: Pseudonymiser,
    site_id: str,
    pads: str,
    batch_id: str,
) -> pl.DataFrame:
    """The invalid rows as delivered (identifiers pseudonymised) with their errors, as JSON."""
    schema = {
        "table_name": pl.String,
        "source_row": pl.Int64,
        "errors": pl.String,
        "data": pl.String,
    }
    if not errors.height:
        return pl.DataFrame(schema=schema)
    out = []
    for table, errs in errors.group_by("table"):
        table = str(table[0])
        grouped = errs.group_by("row").agg(
            pl.struct(["column", "value", "rule", "message"]).alias("errs")
        )
        rows = (
            raw[table]
            .with_row_index("source_row", offset=_first_row())
            .with_columns(pl.col("source_row").cast(pl.Int64))
            .join(grouped, left_on="source_row", right_on="row", how="inner")
        )
        id_cols = [c for c in raw[table].columns if c in IDENTIFIER_KINDS]
        con.register("_qin", rows.to_arrow())
        replaced = [
            f"{pseudonymiser.sql(IDENTIFIER_KINDS[c], site_id, f'{c}::VARCHAR', pads)} AS {c}"
            for c in id_cols
        ]
        data_cols = [c for c in raw[table].columns]
        exclude = ", ".join(["source_row", "errs", *id_cols])
        q = con.sql(
            f"SELECT '{table}' AS table_name, source_row, to_json(errs)::VARCHAR AS errors, "
            f"to_json(struct_pack({', '.join(data_cols)}))::VARCHAR AS data FROM ("
            f"SELECT * EXCLUDE ({exclude}), {', '.join(replaced + ['source_row', 'errs'])} "
            "FROM _qin)"
            if id_cols
            else f"SELECT '{table}' AS table_name, source_row, to_json(errs)::VARCHAR, "
            f"to_json(struct_pack({', '.join(data_cols)}))::VARCHAR FROM _qin"
        ).pl()
        con.unregister("_qin")
        q.columns = list(schema)
        out.append(q)
    return pl.concat(out).sort(["table_name", "source_row"])


def _first_row() -> int:
    """Row number of the first data row, as the dictionary numbers ``_row``."""
    return 1

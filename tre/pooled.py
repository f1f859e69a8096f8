"""The pooled store: one DuckDB file of harmonised, pseudonymised rows from every site.

Layout under ``Settings.pooled_dir``::

    pooled.duckdb            the pooled tables + bookkeeping tables (below)
    .lock                    flock: one writer (ingest) excludes readers (extract builds)
    batches/<batch_id>/      the batch record: batch.json, errors.csv (and quarantine.csv)
    batches/.staging-*       a batch being written; removed when the next writer starts

Bookkeeping tables (names start with ``_`` and are never copied into extracts):

* ``_batches``: one row per batch ever seen (loaded or rejected), keyed by the batch id
  (content hash of the files and the site).
* ``_versions``: the pooled store is VERSIONED: each loaded batch creates the next version in
  the same transaction as its rows. Version N is exactly the rows whose ``load_batch`` belongs to
  a batch with ``pooled_version <= N`` that was not retired at or before N (rows are never
  updated or deleted), so an extract that names its pooled version names a reproducible state.
* ``_retired``: batches replaced by a later batch of the same site (``--replace``, a corrected
  re-delivery). Their rows stay in the file, so earlier versions stay reproducible, but they
  belong to no version from ``retired_in_version`` on.
* ``_quarantine``: invalid rows kept aside with their errors (policy ``quarantine``); their
  identifiers are pseudonymised like pooled rows, and they are never in pooled tables.

Atomicity comes from DuckDB transactions (write-ahead log): a batch's rows, its ``_batches`` row
and its ``_versions`` row commit together or not at all, also under ``kill -9``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb

POOLED_DB_NAME = "pooled.duckdb"
BOOKKEEPING_PREFIX = "_"
LOCK_TIMEOUT_SECONDS = 120.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS _batches (
    batch_id VARCHAR PRIMARY KEY,
    site_id VARCHAR NOT NULL,
    source_dataset VARCHAR NOT NULL,
    source_version VARCHAR NOT NULL,
    status VARCHAR NOT NULL,            -- loaded | rejected
    pooled_version BIGINT,              -- the version this batch created (loaded only)
    files VARCHAR NOT NULL,             -- JSON: [{table, name, sha256, rows}]
    row_counts VARCHAR NOT NULL,        -- JSON: {table: rows added}
    invalid_rows BIGINT NOT NULL,
    quarantined_rows BIGINT NOT NULL,
    on_invalid VARCHAR NOT NULL,
    recorded_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS _versions (
    version BIGINT PRIMARY KEY,
    batch_id VARCHAR NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    row_counts VARCHAR NOT NULL         -- JSON: {table: total rows at this version}
);
CREATE TABLE IF NOT EXISTS _retired (
    batch_id VARCHAR PRIMARY KEY,       -- a loaded batch replaced by a later one of its site
    retired_by VARCHAR NOT NULL,
    retired_in_version BIGINT NOT NULL  -- its rows belong to versions before this one only
);
CREATE TABLE IF NOT EXISTS _quarantine (
    batch_id VARCHAR NOT NULL,
    table_name VARCHAR NOT NULL,
    source_row BIGINT NOT NULL,
    errors VARCHAR NOT NULL,            -- JSON list of {column, value, rule, message}
    data VARCHAR NOT NULL               -- JSON object of the row (identifiers pseudonymised)
);
"""


class PooledStoreError(RuntimeError):
    """The pooled store is missing, busy or inconsistent."""


class PooledStore:
    """Access to the pooled DuckDB file, serialised by a file lock."""

    def __init__(self, pooled_dir: Path) -> None:
        self.dir = Path(pooled_dir)
        self.db_path = self.dir / POOLED_DB_NAME
        self.lock_path = self.dir / ".lock"
        self.batches_dir = self.dir / "batches"

    # -- locking -------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self, exclusive: bool, timeout: float) -> Iterator[None]:
        if not self.dir.exists():
            # the pooled store is for the TRE's own services only: owner-only from the start
            self.dir.mkdir(parents=True, mode=0o700)
            os.chmod(self.dir, 0o700)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = time.monotonic() + timeout
            mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
            while True:
                try:
                    fcntl.flock(fd, mode)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    if time.monotonic() > deadline:
                        raise PooledStoreError(
                            f"the pooled store {self.dir} is busy (another ingest or extract "
                            f"build holds it); try again later"
                        ) from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    @contextlib.contextmanager
    def writer(self, timeout: float = LOCK_TIMEOUT_SECONDS) -> Iterator[duckdb.DuckDBPyConnection]:
        """Exclusive read-write connection; cleans up staging left by an interrupted writer."""
        with self._locked(exclusive=True, timeout=timeout):
            self._remove_staging()
            # row order carries no meaning in the pool: let DuckDB insert in parallel
            con = duckdb.connect(str(self.db_path), config={"preserve_insertion_order": False})
            try:
                con.execute(_SCHEMA)
                yield con
            finally:
                con.close()

    @contextlib.contextmanager
    def reader(self, timeout: float = LOCK_TIMEOUT_SECONDS) -> Iterator[duckdb.DuckDBPyConnection]:
        """Shared read-only connection (an in-memory database with the store attached as
        ``pooled``), so the caller can also attach other databases."""
        with self._locked(exclusive=False, timeout=timeout):
            if not self.db_path.exists():
                raise PooledStoreError(
                    f"there is no pooled store at {self.db_path}; ingest data first "
                    "(`tre data ingest --site SITE FILES...`)"
                )
            con = duckdb.connect(config={"preserve_insertion_order": False})
            try:
                con.execute("ATTACH $p AS pooled (READ_ONLY)", {"p": str(self.db_path)})
                yield con
            finally:
                con.close()

    def _remove_staging(self) -> None:
        if self.batches_dir.exists():
            for p in [*self.batches_dir.glob(".staging-*"), *self.batches_dir.glob(".old-*")]:
                shutil.rmtree(p, ignore_errors=True)

    # -- queries -------------------------------------------------------------------------
    @staticmethod
    def current_version(con: duckdb.DuckDBPyConnection, schema: str = "main") -> int:
        rows = con.execute(f"SELECT coalesce(max(version), 0) FROM {schema}._versions").fetchall()
        return int(rows[0][0])

    @staticmethod
    def data_tables(con: duckdb.DuckDBPyConnection, catalog: str | None = None) -> list[str]:
        """Pooled data tables (bookkeeping tables excluded)."""
        where = "AND database_name = $c" if catalog else ""
        params = {"c": catalog} if catalog else {}
        rows = con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE schema_name = 'main' "
            f"AND NOT temporary {where} ORDER BY table_name",
            params,
        ).fetchall()
        return [r[0] for r in rows if not r[0].startswith(BOOKKEEPING_PREFIX)]

    @staticmethod
    def batch_record(
        con: duckdb.DuckDBPyConnection, batch_id: str, schema: str = "main"
    ) -> dict | None:
        cur = con.execute(f"SELECT * FROM {schema}._batches WHERE batch_id = $b", {"b": batch_id})
        rows = cur.fetchall()
        if not rows:
            return None
        row = rows[0]
        cols = [d[0] for d in cur.description]
        rec = dict(zip(cols, row, strict=True))
        for k in ("files", "row_counts"):
            rec[k] = json.loads(rec[k])
        return rec

    @staticmethod
    def live_batches_sql(version: int | None = None, schema: str = "main") -> str:
        """SQL selecting the batch ids whose rows make up ``version`` (default: current)."""
        at = "" if version is None else f" AND pooled_version <= {int(version)}"
        retired_at = "" if version is None else f" WHERE retired_in_version <= {int(version)}"
        return (
            f"SELECT batch_id FROM {schema}._batches WHERE status = 'loaded'{at} "
            f"AND batch_id NOT IN (SELECT batch_id FROM {schema}._retired{retired_at})"
        )

    @staticmethod
    def has_retired(con: duckdb.DuckDBPyConnection, schema: str = "main") -> bool:
        """Whether any batch was ever replaced (stores from before ``_retired`` have none)."""
        exists = con.execute(
            "SELECT count(*) FROM duckdb_tables() WHERE table_name = '_retired' "
            "AND database_name = $d",
            {
                "d": "pooled"
                if schema == "pooled"
                else con.execute("SELECT current_database()").fetchall()[0][0]
            },
        ).fetchall()[0][0]
        if not exists:
            return False
        return bool(con.execute(f"SELECT count(*) FROM {schema}._retired").fetchall()[0][0])

    def status(self) -> dict:
        """Version, batches and row counts (for `tre data status` and tests)."""
        with self.reader() as con:
            version = self.current_version(con, "pooled")
            tables = self.data_tables(con, "pooled")
            counts = {
                t: con.execute(f'SELECT count(*) FROM pooled."{t}"').fetchall()[0][0]
                for t in tables
            }
            batches = con.execute(
                "SELECT batch_id, site_id, status, pooled_version FROM pooled._batches "
                "ORDER BY recorded_at"
            ).fetchall()
        return {"version": version, "row_counts": counts, "batches": batches}

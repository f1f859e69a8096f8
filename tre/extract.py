"""Per-project extracts: a read-only DuckDB file with only what the project may see.

An extract holds only the granted tables and columns, only rows from sites whose sharing
conditions allow the project today (``Registry.sites_for``: purpose, jurisdiction, embargo, the
project's site filter), and only rows within the project's row filters. ICCC-3 group and
diagnosis-year filters select tumours; patients, treatments, events and follow-ups are then
restricted to the patients and tumours that qualify.

The file is built under a temporary name next to the final one, made read-only (0444) and
swapped in with ``os.replace``: a sandbox that holds the old file keeps reading the old inode,
new openers get the new file, and nobody ever sees a half-written extract. DuckDB's file lock
forbids writing a file that readers hold open, which is why the extract is never updated in
place. A metadata table ``_extract`` records the project, the pooled version, the sites, the
build time and what was granted.

That record is also how an extract is judged against today's rules (``extract_exceeds``): a
failed rebuild keeps the old file only while it holds nothing the declarations no longer allow,
and provisioning withdraws one that does (``tre.provision``: ``withdraw_extract``).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import duckdb

from tre.dictionary import DictionaryError, load_dictionary
from tre.pooled import PooledStore, PooledStoreError
from tre.registry import Project, Registry, RowFilters
from tre.settings import Settings

EXTRACT_SUFFIX = ".duckdb"
METADATA_TABLE = "_extract"


class ExtractError(RuntimeError):
    """The extract cannot be built as declared (unknown project, table or column...)."""


@dataclass(frozen=True)
class BuildOutcome:
    project_id: str
    path: Path | None
    removed: bool = False
    error: str | None = None


def extract_path(settings: Settings, project_id: str) -> Path:
    """Where the project's extract lives (whether or not it exists)."""
    assert settings.extracts_dir is not None
    return settings.extracts_dir / f"{project_id}{EXTRACT_SUFFIX}"


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal_list(values: list[str]) -> str:
    return "(" + ", ".join("'" + v.replace("'", "''") + "'" for v in values) + ")"


def _pooled_columns(con: duckdb.DuckDBPyConnection, table: str) -> dict[str, str]:
    """Column name -> SQL type of a pooled table, in table order."""
    rows = con.execute(
        "SELECT column_name, data_type FROM duckdb_columns() WHERE database_name = 'pooled' "
        "AND schema_name = 'main' AND table_name = $t ORDER BY column_index",
        {"t": table},
    ).fetchall()
    return dict(rows)


def _identifier_columns(settings: Settings) -> dict[str, set[str]]:
    """Pseudonym columns per table, per the dictionary (only a storage hint: without a readable
    dictionary every column keeps DuckDB's automatic compression; `tre policy validate` is
    where a broken dictionary is reported)."""
    try:
        dictionary = load_dictionary(settings.policies_dir / "dictionary.yaml")
    except (DictionaryError, OSError):
        return {}
    return {t: set(dictionary.identifier_columns(t)) for t in dictionary.tables}


def _column_definitions(
    columns: list[str], types: dict[str, str], identifiers: set[str], compression: str
) -> str:
    """Pseudonyms are random hex: DuckDB's automatic choice tries dictionary and FSST on them
    (about 2x) and that analysis was about a fifth of a full-copy build; zstd gets 1.6x for
    much less CPU (see docs/benchmarks.md, "Extract")."""
    forced = f" USING COMPRESSION {compression}" if compression != "auto" else ""
    return ", ".join(
        f"{_quote(c)} {types[c]}" + (forced if c in identifiers else "") for c in columns
    )


def _granted_columns(project: Project, table: str, available: dict[str, str]) -> list[str]:
    requested = project.grants[table]
    if "*" in requested:
        return list(available)
    missing = [c for c in requested if c not in available]
    if missing:
        raise ExtractError(
            f"project {project.id!r} is granted column(s) {', '.join(missing)} of table "
            f"{table!r}, which the pooled store does not have (it has: {', '.join(available)})"
        )
    return list(dict.fromkeys(requested))  # keep declared order, drop repeats


def _row_conditions(
    project: Project,
    table: str,
    columns: list[str],
    sites: list[str],
    tumour_filtered: bool,
    as_of: bool = False,
) -> str:
    """SQL WHERE clause of ``table`` (alias ``t``) for this project."""
    conds = [f"t.site_id IN {_literal_list(sites)}" if sites else "FALSE"]
    if as_of:
        conds.append("t.load_batch IN (SELECT batch_id FROM _batches_as_of)")
    if tumour_filtered:
        if table == "tumour":
            conds.append("t.tumour_id IN (SELECT tumour_id FROM _qualifying_tumours)")
        elif "tumour_id" in columns and "patient_id" in columns:
            # a row about a tumour follows that tumour; a row with no tumour follows its patient
            conds.append(
                "(t.tumour_id IN (SELECT tumour_id FROM _qualifying_tumours) OR "
                "(t.tumour_id IS NULL AND t.patient_id IN "
                "(SELECT patient_id FROM _qualifying_patients)))"
            )
        elif "tumour_id" in columns:
            conds.append("t.tumour_id IN (SELECT tumour_id FROM _qualifying_tumours)")
        elif "patient_id" in columns:
            conds.append("t.patient_id IN (SELECT patient_id FROM _qualifying_patients)")
        else:
            raise ExtractError(
                f"table {table!r} has neither tumour_id nor patient_id, so the project's "
                "tumour filters cannot be applied to it"
            )
    return " AND ".join(conds)


def _tumour_filter_sql(project: Project) -> list[str]:
    f = project.row_filters
    conds = []
    if f.iccc3_groups is not None:  # an empty list selects no tumour at all
        groups = list(f.iccc3_groups)
        conds.append(f"iccc3_group IN {_literal_list(groups)}" if groups else "FALSE")
    if f.diagnosis_year_min is not None:
        conds.append(f"diagnosis_year >= {int(f.diagnosis_year_min)}")
    if f.diagnosis_year_max is not None:
        conds.append(f"diagnosis_year <= {int(f.diagnosis_year_max)}")
    return conds


def _remove(path: Path) -> bool:
    removed = False
    for p in (path, path.with_name(path.name + ".wal")):
        try:
            p.unlink()
            removed = True
        except FileNotFoundError:
            pass
    return removed


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _filters_within(old: RowFilters, new: RowFilters) -> bool:
    """Whether every row the ``old`` filters let through, the ``new`` ones let through too."""

    def listed(a: list[str] | None, b: list[str] | None) -> bool:
        return b is None or (a is not None and set(a) <= set(b))

    def bound(a: int | None, b: int | None, at_least: bool) -> bool:
        return b is None or (a is not None and (a >= b if at_least else a <= b))

    return (
        listed(old.iccc3_groups, new.iccc3_groups)
        and listed(old.sites, new.sites)
        and bound(old.diagnosis_year_min, new.diagnosis_year_min, at_least=True)
        and bound(old.diagnosis_year_max, new.diagnosis_year_max, at_least=False)
    )


def scope_exceeds(scope: dict, registry: Registry, project: Project, on: dt.date) -> str | None:
    """Why an extract with this ``scope`` (``sites`` whose rows it holds, ``tables`` -> columns,
    ``row_filters``) holds more than the declarations allow the project on ``on``; None if not.

    This is what must not outlive a change of the rules: a site that withdrew (purpose,
    jurisdiction, embargo, removed), a revoked table or column, a narrower row filter."""
    allowed = {s.id for s in registry.sites_for(project, on)}
    withdrawn = sorted(set(scope.get("sites") or []) - allowed)
    if withdrawn:
        return f"rows of site(s) no longer allowed: {', '.join(withdrawn)}"
    for table, columns in sorted((scope.get("tables") or {}).items()):
        granted = project.grants.get(table)
        if granted is None:
            return f"table {table!r} is no longer granted"
        extra = [c for c in columns if c not in granted] if "*" not in granted else []
        if extra:
            return f"column(s) of {table!r} no longer granted: {', '.join(extra)}"
    try:
        old = RowFilters.model_validate(scope.get("row_filters") or {})
    except ValueError:
        return "its row filters cannot be read"
    if not _filters_within(old, project.row_filters):
        return "the row filters are narrower now"
    return None


def extract_exceeds(
    settings: Settings, registry: Registry, project_id: str, on: dt.date
) -> str | None:
    """Why the project's extract on disk holds more than its declarations allow on ``on``
    (None: it does not, or there is none). It is judged by its own ``_extract`` record, so a
    file built from older declarations, by whatever command, is caught; a file whose record
    cannot be read is judged to exceed (it cannot be shown not to)."""
    path = extract_path(settings, project_id)
    if not path.exists():
        return None
    project = registry.projects.get(project_id)
    if project is None or not project.is_active(on):
        return "the project is not active"
    try:
        con = duckdb.connect(str(path), read_only=True)
        try:
            pid, sites, tables, filters = con.execute(
                f"SELECT project_id, contributing_sites, tables, row_filters FROM {METADATA_TABLE}"
            ).fetchone()
        finally:
            con.close()
        scope = {
            "sites": sites,
            "tables": {t: m["columns"] for t, m in json.loads(tables).items()},
            "row_filters": json.loads(filters),
        }
    except (duckdb.Error, TypeError, ValueError, KeyError, AttributeError) as exc:
        return f"its {METADATA_TABLE} record cannot be read ({type(exc).__name__})"
    if pid != project_id:
        return f"it was built for project {pid!r}"
    return scope_exceeds(scope, registry, project, on)


def build_extract(
    settings: Settings,
    registry: Registry,
    project_id: str,
    on: dt.date | None = None,
    pooled_version: int | None = None,
) -> Path | None:
    """Build (or rebuild) the project's extract; return its path.

    A project that is not active on ``on`` (expired, suspended, closed, not started) gets no
    extract: an existing one is removed and ``None`` is returned. ``pooled_version`` rebuilds
    from an earlier version of the pooled store (the pool is append-only, so version N is
    exactly the rows of the batches loaded up to N); by default the current version.
    """
    on = on or dt.date.today()
    project = registry.projects.get(project_id)
    if project is None:
        raise ExtractError(f"unknown project {project_id!r}")
    final = extract_path(settings, project_id)
    if not project.is_active(on):
        _remove(final)
        return None
    sites = sorted(s.id for s in registry.sites_for(project, on))
    assert settings.extracts_dir is not None and settings.pooled_dir is not None
    settings.extracts_dir.mkdir(parents=True, exist_ok=True)
    tmp = settings.extracts_dir / f".{project_id}.{uuid.uuid4().hex}.tmp"
    store = PooledStore(settings.pooled_dir)
    try:
        with store.reader() as con:
            pooled_tables = set(store.data_tables(con, "pooled"))
            version = store.current_version(con, "pooled")
            if pooled_version is not None and not 0 <= pooled_version <= version:
                raise ExtractError(
                    f"pooled version {pooled_version} does not exist "
                    f"(the current version is {version})"
                )
            # rows of the batches that make up the version: needed for an earlier version, or
            # when a batch was replaced by a corrected re-delivery (its rows stay in the file)
            as_of = (pooled_version is not None and pooled_version != version) or store.has_retired(
                con, "pooled"
            )
            if pooled_version is not None:
                version = pooled_version
            if as_of:
                con.execute(
                    "CREATE TEMP TABLE _batches_as_of AS "
                    + store.live_batches_sql(version, "pooled")
                )
            con.execute("ATTACH $p AS ext", {"p": str(tmp)})
            tumour_conds = _tumour_filter_sql(project)
            tumour_filtered = bool(tumour_conds)  # the project's own filters, not as_of
            if as_of:
                tumour_conds.append("load_batch IN (SELECT batch_id FROM _batches_as_of)")
            if tumour_filtered:
                if "tumour" not in pooled_tables:
                    raise ExtractError("the pooled store has no tumour table to filter on")
                site_cond = f"site_id IN {_literal_list(sites)}" if sites else "FALSE"
                where = " AND ".join([site_cond, *tumour_conds])
                con.execute(
                    "CREATE TEMP TABLE _qualifying_tumours AS "
                    f"SELECT tumour_id, patient_id FROM pooled.tumour WHERE {where}"
                )
                con.execute(
                    "CREATE TEMP TABLE _qualifying_patients AS "
                    "SELECT DISTINCT patient_id FROM _qualifying_tumours"
                )
            table_meta: dict[str, dict] = {}
            contributing: set[str] = set()
            identifiers = _identifier_columns(settings)
            for table in project.grants:
                if table not in pooled_tables:
                    raise ExtractError(
                        f"the pooled store has no table {table!r} yet; ingest data first"
                    )
                available = _pooled_columns(con, table)
                columns = _granted_columns(project, table, available)
                where = _row_conditions(
                    project, table, list(available), sites, tumour_filtered, as_of
                )
                select = ", ".join(f"t.{_quote(c)}" for c in columns)
                definitions = _column_definitions(
                    columns,
                    available,
                    identifiers.get(table, set()),
                    settings.extract_identifier_compression,
                )
                con.execute(f"CREATE TABLE ext.{_quote(table)} ({definitions})")
                rows = con.execute(
                    f"INSERT INTO ext.{_quote(table)} "
                    f"SELECT {select} FROM pooled.{_quote(table)} AS t WHERE {where}"
                ).fetchall()[0][0]
                table_meta[table] = {"columns": columns, "rows": int(rows)}
                # which sites' rows are actually in it (site_id may not be a granted column)
                contributing |= {
                    r[0]
                    for r in con.execute(
                        f"SELECT DISTINCT t.site_id FROM pooled.{_quote(table)} AS t WHERE {where}"
                    ).fetchall()
                }
            con.execute(
                f"CREATE TABLE ext.{METADATA_TABLE} (project_id VARCHAR, pooled_version BIGINT, "
                "sites VARCHAR[], contributing_sites VARCHAR[], built_at TIMESTAMPTZ, "
                "built_for_date DATE, purpose VARCHAR, "
                "jurisdiction VARCHAR, end_date DATE, row_filters VARCHAR, tables VARCHAR)"
            )
            con.execute(
                f"INSERT INTO ext.{METADATA_TABLE} VALUES "
                "($pid, $v, $sites, $contributing, $built, $on, $purpose, $jur, $end, $filters, "
                "$tables)",
                {
                    "pid": project.id,
                    "v": version,
                    "sites": sites,
                    "contributing": sorted(contributing),
                    "built": dt.datetime.now(dt.UTC),
                    "on": on,
                    "purpose": str(project.purpose),
                    "jur": project.jurisdiction,
                    "end": project.end_date,
                    "filters": project.row_filters.model_dump_json(),
                    "tables": json.dumps(table_meta),
                },
            )
            con.execute("DETACH ext")  # checkpoints and closes the new file
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o444)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        return final
    except BaseException:
        # the old extract stays only while it is still within the rules: a failed rebuild
        # after a site withdrew or a column was revoked must not leave the old rows served
        if extract_exceeds(settings, registry, project_id, on) is not None:
            _remove(final)
        raise
    finally:
        _remove(tmp)


STALE_TEMPORARY_SECONDS = 3600


def _remove_stale_temporaries(directory: Path) -> None:
    """Half-written extracts of a build that was killed (never visible under a project's name).
    Only old ones: a build running right now owns its fresh temporary file."""
    if not directory.exists():
        return
    now = time.time()
    for p in directory.glob(".*.tmp*"):
        try:
            if now - p.stat().st_mtime > STALE_TEMPORARY_SECONDS:
                p.unlink()
        except FileNotFoundError:
            pass


def build_all(
    settings: Settings, registry: Registry, on: dt.date | None = None
) -> list[BuildOutcome]:
    """Build every project's extract; remove extracts of inactive or undeclared projects.

    One project's problem does not stop the others: each outcome says what happened.
    """
    assert settings.extracts_dir is not None
    _remove_stale_temporaries(settings.extracts_dir)
    outcomes: list[BuildOutcome] = []
    for project_id in sorted(registry.projects):
        try:
            path = build_extract(settings, registry, project_id, on)
            outcomes.append(BuildOutcome(project_id, path, removed=path is None))
        except (ExtractError, PooledStoreError, duckdb.Error, OSError) as exc:
            outcomes.append(BuildOutcome(project_id, None, error=str(exc)))
    assert settings.extracts_dir is not None
    if settings.extracts_dir.exists():
        for p in sorted(settings.extracts_dir.glob(f"*{EXTRACT_SUFFIX}")):
            if p.stem not in registry.projects:
                _remove(p)
                outcomes.append(BuildOutcome(p.stem, None, removed=True))
    return outcomes


def extract_info(settings: Settings, project_id: str) -> dict:
    """The ``_extract`` metadata and table sizes of an existing extract (opened read-only)."""
    path = extract_path(settings, project_id)
    if not path.exists():
        raise ExtractError(f"project {project_id!r} has no extract at {path}")
    con = duckdb.connect(str(path), read_only=True)
    try:
        cur = con.execute(f"SELECT * FROM {METADATA_TABLE}")
        row = cur.fetchall()[0]
        cols = [d[0] for d in cur.description]
    finally:
        con.close()
    info = dict(zip(cols, row, strict=True))
    info["tables"] = json.loads(info["tables"])
    info["row_filters"] = json.loads(info["row_filters"])
    info["path"] = str(path)
    info["size_bytes"] = path.stat().st_size
    info["mode"] = oct(path.stat().st_mode & 0o777)
    return info

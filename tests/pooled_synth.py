"""A pooled store of generated rows, written straight into DuckDB (for extract tests and the
extract benchmark, which need a pooled store of a given size quickly). Rows follow the pooled
schema of the data dictionary; ids look like pseudonyms; values are pseudo-random but
reproducible (DuckDB ``hash`` of the row number and a seed)."""

from __future__ import annotations

import datetime as dt
import json

import duckdb

from tre.dictionary import load_dictionary
from tre.pooled import PooledStore

GROUPS = ["I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX", "X", "XI", "XII"]


def _r(expr: str, seed: int, salt: str) -> str:
    """A pseudo-random non-negative integer from ``expr``."""
    return f"(hash({expr}, {seed}, '{salt}') % 1000000007)::BIGINT"


def build_pooled(
    store: PooledStore,
    sites: dict[str, str],
    patients_per_site: int,
    *,
    seed: int = 1,
    batch_prefix: str = "synth",
) -> dict[str, int]:
    """Add ``patients_per_site`` patients per site (``{site_id: country}``), each with 1-2
    tumours, 2 treatments per tumour, some events and one follow-up, as one batch per site.
    Returns rows per table."""
    groups = "['" + "', '".join(GROUPS) + "']"
    dictionary = load_dictionary()
    with store.writer() as con:
        version = store.current_version(con)
        for n, (site, country) in enumerate(sorted(sites.items())):
            batch = f"{batch_prefix}-{site}-{seed}"
            s = seed * 1000 + n
            prov = (
                f"'{site}' AS site_id, 'ds-{site}' AS source_dataset, "
                f"'v1' AS source_version, '{batch}' AS load_batch"
            )
            con.execute("BEGIN TRANSACTION")
            con.execute(
                f"""CREATE OR REPLACE TEMP TABLE _p AS SELECT
                    md5('{site}-p-' || i::VARCHAR)[:32] AS patient_id,
                    CASE WHEN {_r("i", s, "sex")} % 2 = 0 THEN 'Female' ELSE 'Male' END AS sex,
                    (1990 + {_r("i", s, "by")} % 30)::BIGINT AS birth_year,
                    NULL::VARCHAR AS study_id,
                    '{country}' AS country, 'registry' AS source_type, {prov}, i
                    FROM range({patients_per_site}) t(i)"""
            )
            con.execute(
                f"""CREATE OR REPLACE TEMP TABLE _t AS SELECT
                    md5('{site}-t-' || p.i::VARCHAR || '-' || k::VARCHAR)[:32] AS tumour_id,
                    p.patient_id,
                    (p.birth_year + 1 + {_r("p.i", s, "dy")} % 14)::BIGINT AS diagnosis_year,
                    (365 + {_r("p.i", s, "age")} % 5000)::BIGINT AS age_at_diagnosis_days,
                    8960::BIGINT AS icdo3_morphology, '3' AS icdo3_behaviour,
                    'C64.9' AS icdo3_topography, NULL::VARCHAR AS laterality,
                    NULL::VARCHAR AS basis_of_diagnosis, NULL::VARCHAR AS stage_system,
                    NULL::VARCHAR AS stage,
                    {groups}[1 + ({_r("p.i * 3 + k", s, "g")} % 12)] AS iccc3_group,
                    {groups}[1 + ({_r("p.i * 3 + k", s, "g")} % 12)] || 'a' AS iccc3_subgroup,
                    {prov}
                    FROM _p p, range(1 + {_r("p.i", s, "nt")} % 2) r(k)"""
            )
            con.execute(
                f"""CREATE OR REPLACE TEMP TABLE _tr AS SELECT t.tumour_id,
                    ['Chemotherapy', 'Surgery'][1 + k] AS modality,
                    (t.age_at_diagnosis_days + 10 * k)::BIGINT AS age_at_start_days,
                    NULL::VARCHAR AS protocol, {prov}
                    FROM _t t, range(2) r(k)"""
            )
            con.execute(
                f"""CREATE OR REPLACE TEMP TABLE _e AS SELECT t.tumour_id,
                    'Relapse' AS event_type,
                    (t.age_at_diagnosis_days + 400)::BIGINT AS age_at_event_days, {prov}
                    FROM _t t WHERE {_r("t.tumour_id", s, "ev")} % 4 = 0"""
            )
            con.execute(
                f"""CREATE OR REPLACE TEMP TABLE _f AS SELECT p.patient_id,
                    'Alive' AS vital_status, 6000::BIGINT AS age_at_last_contact_days,
                    NULL::VARCHAR AS cause_of_death, {prov} FROM _p p"""
            )
            counts = {}
            for table, tmp in [
                ("patient", "_p"),
                ("tumour", "_t"),
                ("treatment", "_tr"),
                ("event", "_e"),
                ("followup", "_f"),
            ]:
                exclude = " EXCLUDE (i)" if tmp == "_p" else ""
                exists = con.execute(
                    "SELECT count(*) FROM duckdb_tables() WHERE table_name = $t AND NOT temporary",
                    {"t": table},
                ).fetchone()[0]
                if not exists:  # the column storage `tre data ingest` creates
                    types = con.execute(
                        f"SELECT column_name, column_type FROM (DESCRIBE SELECT *{exclude}"
                        f" FROM {tmp})"
                    ).fetchall()
                    ids = set(dictionary.identifier_columns(table))
                    defs = ", ".join(
                        f'"{c}" {t}' + (" USING COMPRESSION uncompressed" if c in ids else "")
                        for c, t in types
                    )
                    con.execute(f"CREATE TABLE main.{table} ({defs})")
                con.execute(f"INSERT INTO main.{table} BY NAME SELECT *{exclude} FROM {tmp}")
                counts[table] = con.execute(f"SELECT count(*) FROM {tmp}").fetchone()[0]
            version += 1
            now = dt.datetime.now(dt.UTC)
            con.execute(
                "INSERT INTO _batches VALUES ($b, $s, $ds, 'v1', 'loaded', $v, '[]', $rc, 0, 0, "
                "'reject', $t)",
                {
                    "b": batch,
                    "s": site,
                    "ds": f"ds-{site}",
                    "v": version,
                    "rc": json.dumps(counts),
                    "t": now,
                },
            )
            con.execute(
                "INSERT INTO _versions VALUES ($v, $b, $t, '{}')",
                {"v": version, "b": batch, "t": now},
            )
            con.execute("COMMIT")
        return {
            t: con.execute(f"SELECT count(*) FROM main.{t}").fetchone()[0]
            for t in ("patient", "tumour", "treatment", "event", "followup")
        }


def pooled_rows(store: PooledStore, sql: str) -> list[tuple]:
    con = duckdb.connect(str(store.db_path), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()

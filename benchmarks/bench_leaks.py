"""Leak detection: a 100,000-row export against a 10-million-row extract (target < 3 s, < 2 GiB).

The extract (10 M patients + 10 M tumours, built with DuckDB) is cached under the system temp
directory between runs; the export mixes rows copied from the extract, invented rows and ids.
"""

from __future__ import annotations

import resource
import tempfile
import time
from pathlib import Path

import duckdb
import polars as pl

from airlock.checks.context import CheckContext
from airlock.checks.leaks import ExtractIndex, check_rows
from airlock.policy import load_policy

ROWS = 10_000_000
EXPORT_ROWS = 100_000
CACHE = Path(tempfile.gettempdir()) / f"tre-bench-leaks-{ROWS}.duckdb"


def build_extract(path: Path) -> None:
    tmp = path.with_suffix(".building")
    tmp.unlink(missing_ok=True)
    con = duckdb.connect(str(tmp))
    con.execute(
        f"""
        CREATE TABLE patient AS SELECT
            md5('p' || range)[:16] AS patient_id,
            CASE WHEN hash(range) % 2 = 0 THEN 'Female' ELSE 'Male' END AS sex,
            2000 + (hash(range * 3) % 16)::INTEGER AS birth_year,
            ['DE', 'FR', 'GB', 'US', 'IT', 'ES'][1 + (hash(range * 5) % 6)::INTEGER] AS country,
            ['de-gpoh', 'fr-rnce', 'uk-ccr', 'us-nwts'][1 + (hash(range * 7) % 4)::INTEGER]
                AS site_id
        FROM range({ROWS})
        """
    )
    con.execute(
        f"""
        CREATE TABLE tumour AS SELECT
            'T' || md5('p' || range)[:16] AS tumour_id,
            md5('p' || range)[:16] AS patient_id,
            2005 + (hash(range * 11) % 16)::INTEGER AS diagnosis_year,
            (hash(range * 13) % 5400)::INTEGER AS age_at_diagnosis_days,
            ['9836/3', '8960/3', '9500/3', '9510/3', '9180/3'][1 + (hash(range * 17) % 5)::INTEGER]
                AS icdo3_morphology
        FROM range({ROWS})
        """
    )
    con.close()
    tmp.rename(path)


def make_export(path: Path) -> pl.DataFrame:
    con = duckdb.connect(str(path), read_only=True)
    copied = con.sql(
        f"""
        SELECT p.sex, p.birth_year, p.country, t.diagnosis_year, t.age_at_diagnosis_days
        FROM patient p JOIN tumour t USING (patient_id)
        USING SAMPLE {EXPORT_ROWS // 2} ROWS
        """
    ).pl()
    ids = con.sql("SELECT patient_id FROM patient LIMIT 100").pl()
    con.close()
    invented = pl.DataFrame(
        {
            "sex": ["Female"] * (EXPORT_ROWS - copied.height),
            "birth_year": [1990] * (EXPORT_ROWS - copied.height),
            "country": ["XX"] * (EXPORT_ROWS - copied.height),
            "diagnosis_year": [1999] * (EXPORT_ROWS - copied.height),
            "age_at_diagnosis_days": list(range(EXPORT_ROWS - copied.height)),
        }
    )
    export = pl.concat([copied, invented.cast(copied.schema)])
    note = ["-"] * export.height
    for i, pid in enumerate(ids.get_column("patient_id")):
        note[i * 37] = pid
    return export.with_columns(pl.Series("note", note))


def main() -> None:
    if not CACHE.exists():
        t0 = time.perf_counter()
        build_extract(CACHE)
        print(f"built extract ({2 * ROWS:,} rows) in {time.perf_counter() - t0:.1f} s")
    export = make_export(CACHE)
    policy = load_policy()
    t0 = time.perf_counter()
    with ExtractIndex(CACHE) as idx:
        findings = check_rows(export, CheckContext(policy=policy, extract=idx))
        cold = time.perf_counter() - t0
        warm = []
        for _ in range(2):
            t0 = time.perf_counter()
            check_rows(export, CheckContext(policy=policy, extract=idx))
            warm.append(time.perf_counter() - t0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"export {export.height:,} rows x {export.width} cols vs extract {ROWS:,} patients + "
        f"{ROWS:,} tumours"
    )
    for f in findings:
        print(f"  {f.rule}: {f.evidence.get('rows')} rows")
    print(
        f"leak checks: cold (opening the extract) {cold:.2f} s, warm (extract open) best "
        f"{min(warm):.2f} s (target < 3 s); peak RSS {rss:.0f} MiB (target < 2048 MiB)"
    )


if __name__ == "__main__":
    main()

"""Extract build time from a pooled store of ``BENCH_EXTRACT_ROWS`` rows (default 10 million).

The pooled store is generated straight into DuckDB (tests/pooled_synth.py: the pooled schema,
four sites, about 6.9 rows per child) because the point here is the extract build, not ingest.
Each extract is then built in a fresh subprocess whose wall time, CPU time and peak resident
memory (psutil, sampled every 20 ms; the kernel's ru_maxrss is not used because Linux carries it
over from the parent that generated the store) are measured:

* ``everything``: every table, every column, every site (the worst case: a full copy);
* ``wilms``: the shape of the shipped wilms-outcomes project (ICCC-3 group VI, granted columns,
  patient/event/followup restricted to qualifying tumours and patients);
* ``leukaemia``: ICCC-3 group I and a diagnosis-year window.

The full copy is built twice per run, with the default storage of pseudonym columns (zstd) and
with DuckDB's automatic choice (``extract_identifier_compression: auto``), alternating, so the
ratio of the two comes from the same machine state. ``BENCH_EXTRACT_RUNS`` (default 1) repeats
the whole set and prints min / median / max per shape.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bench_ingest import machine, run_measured

REPO = Path(__file__).resolve().parent.parent
ROWS_PER_PATIENT = 6.9
SITES = {"uk-ccr": "GB", "fr-rnce": "FR", "us-nwts": "US", "de-gpoh": "DE"}

CHILD = r"""
import datetime as dt, json, sys, time
from pathlib import Path
from tre.extract import build_extract, extract_info
from tre.registry import Project, Registry, RowFilters, Site, Staff
from tre.settings import Settings

state, which, compression = Path(sys.argv[1]), sys.argv[2], sys.argv[4]
sites = {s: c for s, c in json.loads(sys.argv[3]).items()}
all_tables = {t: ["*"] for t in ("patient", "tumour", "treatment", "event", "followup")}
shapes = {
    "everything": dict(grants=all_tables),
    "wilms": dict(
        grants={"patient": ["patient_id", "site_id", "sex", "birth_year", "country"],
                "tumour": ["*"], "event": ["*"], "followup": ["*"]},
        row_filters=RowFilters(iccc3_groups=["VI"]),
    ),
    "leukaemia": dict(
        grants={"patient": ["patient_id", "site_id", "sex", "birth_year", "country"],
                "tumour": ["tumour_id", "patient_id", "site_id", "diagnosis_year",
                           "age_at_diagnosis_days", "iccc3_group", "iccc3_subgroup"]},
        row_filters=RowFilters(iccc3_groups=["I"], diagnosis_year_min=2000,
                               diagnosis_year_max=2015),
    ),
}
project = Project(id="bench", title="Benchmark", lay_summary="A benchmark project only.",
                  purpose="academic", jurisdiction="GB", members=[{"username": "alice"}],
                  start_date=dt.date(2020, 1, 1), end_date=dt.date(2100, 1, 1), **shapes[which])
registry = Registry(
    sites={s: Site(id=s, name=s, country=c, source_type="registry", source_dataset=s,
                   allowed_purposes=["academic"], allowed_jurisdictions=["*"])
           for s, c in sites.items()},
    projects={"bench": project}, staff=Staff())
settings = Settings(state_dir=state, extract_identifier_compression=compression)
t, c = time.perf_counter(), time.process_time()
path = build_extract(settings, registry, "bench")
wall, cpu = time.perf_counter() - t, time.process_time() - c
info = extract_info(settings, "bench")
rows = {k: v["rows"] for k, v in info["tables"].items()}
print(json.dumps({"wall": wall, "cpu": cpu, "rows": rows, "size_mb": path.stat().st_size / 2**20}))
"""


def main() -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from pooled_synth import build_pooled

    from tre.pooled import PooledStore

    rows = int(os.environ.get("BENCH_EXTRACT_ROWS", 10_000_000))
    per_site = int(rows / ROWS_PER_PATIENT / len(SITES))
    keep = os.environ.get("BENCH_EXTRACT_DIR")  # reuse a generated pooled store between runs
    with tempfile.TemporaryDirectory(prefix="bench-extract-") as tmp:
        state = Path(keep or tmp) / "state"
        t = time.perf_counter()
        store = PooledStore(state / "pooled")
        if keep and store.db_path.exists():
            counts = store.status()["row_counts"]
        else:
            counts = build_pooled(store, SITES, per_site, seed=3)
        total = sum(counts.values())
        size = (state / "pooled" / "pooled.duckdb").stat().st_size / 2**20
        print(f"pooled store: {total:,} rows ({counts}), {size:,.0f} MiB, "
              f"generated in {time.perf_counter() - t:.1f} s")  # fmt: skip
        print(f"machine: {machine()}")
        runs = int(os.environ.get("BENCH_EXTRACT_RUNS", 1))
        shapes = [("everything", "zstd"), ("everything", "auto"), ("wilms", "zstd"),
                  ("leukaemia", "zstd")]  # fmt: skip
        walls: dict[str, list[float]] = {}
        for run in range(runs):
            for which, compression in shapes:
                label = which if compression == "zstd" else f"{which} (ids: auto)"
                t = time.perf_counter()
                out, peak = run_measured(
                    [
                        sys.executable,
                        "-c",
                        CHILD,
                        str(state),
                        which,
                        json.dumps(SITES),
                        compression,
                    ]  # fmt: skip
                )
                proc_wall = time.perf_counter() - t
                res = json.loads(out.strip().splitlines()[-1])
                copied = sum(res["rows"].values())
                walls.setdefault(label, []).append(res["wall"])
                print(f"  run {run + 1} {label}: build {res['wall']:.2f} s wall, "
                      f"{res['cpu']:.2f} s CPU (process incl. start-up {proc_wall:.2f} s), "
                      f"{copied:,} rows into a {res['size_mb']:,.0f} MiB file, peak RSS "
                      f"{peak:,.0f} MiB (targets: < 5 s on 2 cores, < 2048 MiB)")  # fmt: skip
        print("build wall (min / median / max):")
        for label, values in walls.items():
            print(f"  {label}: {min(values):.2f} / {statistics.median(values):.2f} / "
                  f"{max(values):.2f} s")  # fmt: skip
        if runs > 0:
            pairs = zip(walls["everything"], walls["everything (ids: auto)"], strict=True)
            ratio = statistics.median(a / b for a, b in pairs)
            print(f"  full copy, zstd ids / automatic: {ratio:.2f} (median of per-run ratios)")


if __name__ == "__main__":
    main()

"""Data model: synthetic generation, validation and ICCC-3 recode throughput.

``uv run python -m benchmarks datamodel`` (env BENCH_PATIENTS, default 1,000,000).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

from tre.dictionary import load_dictionary, validate_batch
from tre.iccc3 import recode
from tre.synth import generate, read_delivery


def main() -> None:
    patients = int(os.environ.get("BENCH_PATIENTS", "1000000"))
    policies = Path(__file__).resolve().parent.parent / "policies"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        t, c = time.perf_counter(), time.process_time()
        summary = generate(out, 3, patients, seed=1, policies_dir=policies)
        gen, gen_cpu = time.perf_counter() - t, time.process_time() - c
        rows = sum(sum(s["rows"].values()) for s in summary.sites)
        print(
            f"generate {patients:,} children, 3 sites, {rows:,} rows: {gen:.1f} s wall, "
            f"{gen_cpu:.1f} s CPU"
        )
        d = load_dictionary()
        total_rows = total_s = total_cpu = 0.0
        for s in summary.sites:
            tables = read_delivery(out / s["id"])
            n = sum(df.height for df in tables.values())
            t, c = time.perf_counter(), time.process_time()
            res = validate_batch(d, tables)
            el, cpu = time.perf_counter() - t, time.process_time() - c
            assert all(r.ok for r in res.values())
            total_rows += n
            total_s += el
            total_cpu += cpu
            print(
                f"validate {s['id']} ({s['file_format']}, {s['dialect']}): {n:,} rows "
                f"{el:.2f} s wall, {cpu:.2f} s CPU"
            )
        print(
            f"validate overall: {total_rows / total_s:,.0f} rows/s wall, "
            f"{total_rows / total_cpu:,.0f} rows per CPU-second"
        )
    rng = np.random.default_rng(0)
    n = 5_000_000
    df = pl.DataFrame(
        {
            "m": rng.choice([9836, 9861, 9380, 8960, 9500, 9510, 8000, 9260], n),
            "b": np.full(n, 3),
            "t": rng.choice(["C42.1", "C71.9", "C72.3", "C64.9", "C74.0", "C69.2", "C41.4"], n),
        }
    )
    t, c = time.perf_counter(), time.process_time()
    recode(df, "m", "b", "t", extended=True)
    el, cpu = time.perf_counter() - t, time.process_time() - c
    print(f"recode {n:,} rows: {el:.2f} s wall ({n / el:,.0f} rows/s), {cpu:.2f} s CPU")


if __name__ == "__main__":
    main()

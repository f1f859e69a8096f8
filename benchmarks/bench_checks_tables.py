"""How long the airlock takes to check a typical output (a 20 x 10 table) in a warm process.

Target: under 50 ms. Three tables: a clean frequency table with margins, the same table with
suppressed cells (margin algebra + linear programming), and a magnitude table with evidence.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import polars as pl

from airlock.checks.tables import check_table
from airlock.policy import load_policy
from tre import outputs

ROWS, COLS = 20, 10


def cohort(n: int = 20_000, seed: int = 11) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    weights = np.linspace(3, 0.2, COLS)
    return pl.DataFrame(
        {
            "region": [f"region {i:02d}" for i in rng.integers(0, ROWS, n)],
            "grp": [f"g{j}" for j in rng.choice(COLS, n, p=weights / weights.sum())],
            "dose": rng.gamma(2.0, 50.0, n),
        }
    )


def timed(label: str, fn, repeat: int = 30) -> dict:
    fn()  # warm
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    row = {
        "case": label,
        "median_ms": statistics.median(samples),
        "p95_ms": samples[int(0.95 * (len(samples) - 1))],
    }
    print(f"{label:55s} median {row['median_ms']:7.2f} ms   p95 {row['p95_ms']:7.2f} ms")
    return row


def main() -> list[dict]:
    policy = load_policy()
    data = cohort()
    clean = outputs.frequency_table(data, rows="region", columns="grp")
    small = outputs.frequency_table(data.head(1500), rows="region", columns="grp", suppress=True)
    magnitude = outputs.magnitude_table(
        data, rows="region", values="dose", statistics="mean", columns="grp"
    )
    clean_t, small_t = (
        clean.table,
        outputs.pl.read_csv(outputs.io.StringIO(small.csv_text()), infer_schema_length=None),
    )
    mag_t = magnitude.table
    print(
        f"tables: frequency {clean_t.shape} ({clean.status.value}), suppressed "
        f"{small_t.shape} ({small.extra['suppressed']} hidden cells, {small.status.value}), "
        f"magnitude {mag_t.shape} ({magnitude.status.value})"
    )
    results = [
        timed("check_table: 20x10 frequency table + margins", lambda: check_table(clean_t, policy)),
        timed(
            "check_table: 20x10 with suppressed cells + margins",
            lambda: check_table(small_t, policy, small.evidence),
        ),
        timed(
            "check_table: 200-cell magnitude table + evidence",
            lambda: check_table(mag_t, policy, magnitude.evidence),
        ),
        timed(
            "tre.outputs.frequency_table(suppress=True), 20k rows",
            lambda: outputs.frequency_table(
                data.head(1500), rows="region", columns="grp", suppress=True
            ),
            repeat=5,
        ),
    ]
    return results


if __name__ == "__main__":
    main()

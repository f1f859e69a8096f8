"""Ingest throughput, end to end, on synthetic site deliveries.

Generates ``BENCH_INGEST_ROWS`` rows (default 5 million) with the project's synthetic
generator (``tre data generate``: three sites, CSV and Parquet, site dialects), then ingests
every site's batch in a fresh subprocess (read + validate + harmonise + ICCC-3 + pseudonymise +
key checks + write, no quality report) and measures wall time, CPU time and the peak resident
memory of that process (psutil, sampled every 20 ms, plus the kernel's ru_maxrss).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
ROWS_PER_PATIENT = 4.9  # what the generator produces on average (measured, see manifest)

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from tre.ingest import ingest_files
from tre.pseudonymise import init_key
from tre.settings import Settings

state, data = Path(sys.argv[1]), Path(sys.argv[2])
s = Settings(state_dir=state)
init_key(s.hmac_key_file)
out = []
t0, c0 = time.perf_counter(), time.process_time()
for site_dir in sorted(p for p in data.iterdir() if p.is_dir()):
    t, c = time.perf_counter(), time.process_time()
    r = ingest_files(s, site_dir.name, sorted(site_dir.iterdir()), quality_report=False)
    assert r.status == "loaded", (r.status, r.errors)
    out.append({"site": site_dir.name, "rows": sum(r.rows_added.values()),
                "wall": time.perf_counter() - t, "cpu": time.process_time() - c,
                "stages": r.timings, "cpu_stages": r.cpu_timings})
print(json.dumps({"batches": out, "wall": time.perf_counter() - t0,
                  "cpu": time.process_time() - c0,
                  "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[str, float]:
    """Run ``cmd``; return its stdout and its peak RSS in MiB (sampled)."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True, env=env)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.02)
    out = proc.stdout.read() if proc.stdout else ""
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed ({proc.returncode})")
    return out, peak / 2**20


def machine() -> str:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor(),
    )  # fmt: skip
    mem = psutil.virtual_memory().total / 2**30
    load = os.getloadavg()
    return (
        f"{os.cpu_count()} cores ({cpu}), {mem:.1f} GiB RAM, load average "
        f"{load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}"
    )


def main() -> None:
    rows = int(os.environ.get("BENCH_INGEST_ROWS", 5_000_000))
    patients = int(rows / ROWS_PER_PATIENT)
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        data = Path(tmp) / "deliveries"
        t = time.perf_counter()
        from tre.synth import generate

        summary = generate(data, 3, patients, seed=7)
        delivered = sum(sum(s["rows"].values()) for s in summary.sites)
        print(f"generated {delivered:,} rows ({patients:,} children, 3 sites) "
              f"in {time.perf_counter() - t:.1f} s")  # fmt: skip
        out, peak = run_measured([sys.executable, "-c", CHILD, str(Path(tmp) / "state"), str(data)])
        res = json.loads(out.strip().splitlines()[-1])
    loaded = sum(b["rows"] for b in res["batches"])
    cores = os.cpu_count() or 1
    print(f"machine: {machine()}")
    for b in res["batches"]:
        print(f"  {b['site']}: {b['rows']:,} rows, {b['wall']:.2f} s wall, {b['cpu']:.2f} s CPU")
        print("    wall s: " + ", ".join(f"{k} {v:.2f}" for k, v in b["stages"].items()))
        print("    CPU s:  " + ", ".join(f"{k} {v:.2f}" for k, v in b["cpu_stages"].items()))
    ingest_wall = sum(b["wall"] for b in res["batches"])
    ingest_cpu = sum(b["cpu"] for b in res["batches"])
    print(f"ingested {loaded:,} rows in {ingest_wall:.2f} s wall, {ingest_cpu:.2f} s CPU")
    print(f"  throughput: {loaded / ingest_wall:,.0f} rows/s wall = "
          f"{loaded / ingest_wall / cores:,.0f} rows/s per core ({cores} cores); "
          f"{loaded / ingest_cpu:,.0f} rows per CPU-second "
          f"({ingest_cpu / loaded * 1e6:.2f} CPU-us per row)")  # fmt: skip
    print(f"  peak RSS: {peak:,.0f} MiB sampled, {res['ru_maxrss_mb']:,.0f} MiB ru_maxrss "
          f"(target: under 2048 MiB)")  # fmt: skip


if __name__ == "__main__":
    main()

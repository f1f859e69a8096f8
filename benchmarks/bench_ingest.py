"""Ingest throughput, end to end, on synthetic site deliveries.

Generates ``BENCH_INGEST_ROWS`` rows (default 5 million) with the project's synthetic
generator (``tre data generate``: three sites, CSV and Parquet, site dialects), then ingests
every site's batch (read + validate + harmonise + ICCC-3 + pseudonymise + key checks + write,
no quality report) into a fresh pooled store and measures wall time, CPU time (all threads of
the ingesting processes) and peak resident memory (psutil, sampled every 20 ms, plus the
kernel's ru_maxrss).

``BENCH_INGEST_RUNS`` (default 1): repeat the whole ingest that many times, each into a fresh
store and fresh processes, and print min / p50 / p99 / max over the runs.
``BENCH_INGEST_PARALLEL`` (default 1): ingest the sites in that many concurrent processes (one
process per site batch, as separate ``tre data ingest`` calls would); validation and
pseudonymisation overlap, writes still take the store's lock one batch at a time. With 1, one
process ingests the batches one after the other.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
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
from tre.settings import Settings

state = Path(sys.argv[1])
s = Settings(state_dir=state)
out = []
t0, c0 = time.perf_counter(), time.process_time()
for site_dir in map(Path, sys.argv[2:]):
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
    outs, peak, _ = run_concurrently([cmd], 1, env)
    return outs[0], peak


def run_concurrently(
    cmds: list[list[str]], parallel: int, env: dict | None = None
) -> tuple[list[str], float, float]:
    """Run ``cmds``, at most ``parallel`` at a time; return their stdouts, the largest peak RSS
    of one process and the peak of the summed RSS of the processes running together (MiB)."""
    pending = list(enumerate(cmds))
    running: dict[int, tuple[subprocess.Popen, psutil.Process, tempfile.SpooledTemporaryFile]] = {}
    outs: dict[int, str] = {}
    peak_one = peak_sum = 0
    while pending or running:
        while pending and len(running) < parallel:
            i, cmd = pending.pop(0)
            buf = tempfile.SpooledTemporaryFile(mode="w+")  # no pipe: a full pipe would block
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=buf, text=True, env=env)
            running[i] = (proc, psutil.Process(proc.pid), buf)
        total = 0
        for i, (proc, ps, buf) in list(running.items()):
            if proc.poll() is not None:
                if proc.returncode != 0:
                    raise RuntimeError(f"benchmark child failed ({proc.returncode})")
                buf.seek(0)
                outs[i] = buf.read()
                del running[i]
                continue
            try:
                rss = ps.memory_info().rss
            except psutil.NoSuchProcess:
                continue
            peak_one = max(peak_one, rss)
            total += rss
        peak_sum = max(peak_sum, total)
        time.sleep(0.02)
    return [outs[i] for i in range(len(cmds))], peak_one / 2**20, peak_sum / 2**20


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


def _pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of ``values``, linear between the closest ranks."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def _spread(name: str, values: list[float], unit: str) -> str:
    return (
        f"{name}: min {min(values):.2f}, p50 {_pct(values, 0.5):.2f}, "
        f"p99 {_pct(values, 0.99):.2f}, max {max(values):.2f} {unit}"
    )


def ingest_once(data: Path, state: Path, parallel: int) -> dict:
    """One measured ingest of every site under ``data`` into a fresh store at ``state``."""
    from tre.pseudonymise import init_key
    from tre.settings import Settings

    init_key(Settings(state_dir=state).hmac_key_file)
    sites = sorted(str(p) for p in data.iterdir() if p.is_dir())
    py = [sys.executable, "-c", CHILD, str(state)]
    cmds = [py + sites] if parallel == 1 else [py + [s] for s in sites]
    t = time.perf_counter()
    outs, peak_one, peak_sum = run_concurrently(cmds, parallel)
    wall = time.perf_counter() - t
    results = [json.loads(o.strip().splitlines()[-1]) for o in outs]
    return {
        "batches": [b for r in results for b in r["batches"]],
        "wall": wall,  # all of it, process start-up included
        "cpu": sum(r["cpu"] for r in results),
        "peak_one": peak_one,
        "peak_sum": peak_sum,
        "ru_maxrss": max(r["ru_maxrss_mb"] for r in results),
    }


def main() -> None:
    rows = int(os.environ.get("BENCH_INGEST_ROWS", 5_000_000))
    runs = int(os.environ.get("BENCH_INGEST_RUNS", 1))
    parallel = int(os.environ.get("BENCH_INGEST_PARALLEL", 1))
    patients = int(rows / ROWS_PER_PATIENT)
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        data = Path(tmp) / "deliveries"
        t = time.perf_counter()
        from tre.synth import generate

        summary = generate(data, 3, patients, seed=7)
        delivered = sum(sum(s["rows"].values()) for s in summary.sites)
        print(f"generated {delivered:,} rows ({patients:,} children, 3 sites) "
              f"in {time.perf_counter() - t:.1f} s")  # fmt: skip
        print(f"machine: {machine()}")
        print(f"{runs} run(s), {parallel} concurrent ingest process(es)")
        done = []
        for i in range(runs):
            res = ingest_once(data, Path(tmp) / f"state-{i}", parallel)
            done.append(res)
            loaded = sum(b["rows"] for b in res["batches"])
            own = sum(b["wall"] for b in res["batches"])
            print(f"run {i + 1}: {loaded:,} rows in {res['wall']:.2f} s wall ({own:.2f} s in "
                  f"ingest_files, summed over batches), {res['cpu']:.2f} s CPU, "
                  f"peak RSS {res['peak_one']:,.0f} MiB")  # fmt: skip
            for b in res["batches"]:
                print(f"  {b['site']}: {b['rows']:,} rows, {b['wall']:.2f} s wall, "
                      f"{b['cpu']:.2f} s CPU")  # fmt: skip
                print("    wall s: " + ", ".join(f"{k} {v:.2f}" for k, v in b["stages"].items()))
                print(
                    "    CPU s:  " + ", ".join(f"{k} {v:.2f}" for k, v in b["cpu_stages"].items())
                )
    loaded = sum(b["rows"] for b in done[0]["batches"])
    walls = [r["wall"] for r in done]
    cpus = [r["cpu"] for r in done]
    wall, cpu = _pct(walls, 0.5), _pct(cpus, 0.5)
    print(f"ingested {loaded:,} rows per run; over {runs} run(s):")
    print("  " + _spread("wall", walls, "s (process start-up included)"))
    print("  " + _spread("CPU", cpus, "s (all threads)"))
    print(f"  throughput (p50): {loaded / wall:,.0f} rows/s wall = "
          f"{loaded / wall / cores:,.0f} rows/s per core by wall ({cores} cores); "
          f"{loaded / cpu:,.0f} rows per CPU-second ({cpu / loaded * 1e6:.2f} CPU-us per row); "
          f"target 1,000,000 rows/s per core = 1 CPU-us per row")  # fmt: skip
    peak = max(r["peak_one"] for r in done)
    peak_sum = max(r["peak_sum"] for r in done)
    maxrss = max(r["ru_maxrss"] for r in done)
    print(f"  peak RSS: {peak:,.0f} MiB sampled (one process), {maxrss:,.0f} MiB ru_maxrss, "
          f"{peak_sum:,.0f} MiB summed over concurrent processes "
          "(target: under 2048 MiB)")  # fmt: skip


if __name__ == "__main__":
    main()

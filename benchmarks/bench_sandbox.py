"""Sandbox start time and memory: the bubblewrap sandbox against a plain local-process server.

Runs a real hub (generated config, real proxy) in a temporary installation, then for each
spawner starts and stops the same (user, project) server ``BENCH_SANDBOX_STARTS`` times (default
20) and records the time from the start request to a ready server (the hub's REST API reports
``ready`` once the server answered the hub's probe and the proxy route is in place). Then it
measures the memory of one idle sandbox: the PSS (and RSS) summed over every process of the
sandbox's pid namespace, without and with an idle kernel.

Run: ``uv run python -m benchmarks sandbox`` (as root, with bwrap and ``npm ci`` done).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tre.hub.harness import HubInstance, Kernel
from tre.settings import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "tests" / "hub"))
from conftest import make_state  # noqa: E402 - the same test installation as the hub tests

USER, PROJECT = "alice", "wilms-outcomes"
GIB = 1024**3
# the plain LocalProcessSpawner baseline: the same single-user server, no sandbox, TCP port
BASELINE_CONFIG = f"""
c.JupyterHub.spawner_class = 'simple'
c.SimpleLocalProcessSpawner.home_dir_template = '/tmp/tre-bench-{{username}}'
c.Spawner.cmd = [{str(Path(sys.executable).parent / "jupyterhub-singleuser")!r}]
c.Spawner.args = ['--allow-root']
"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def time_starts(hub: HubInstance, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = hub.api("POST", f"/users/{USER}/servers/{PROJECT}")
        if r.status_code not in (201, 202):
            raise RuntimeError(f"start: {r.status_code} {r.text}")
        while True:
            model = hub.api("GET", f"/users/{USER}/servers/{PROJECT}").json()
            if model.get("ready"):
                break
            time.sleep(0.02)
        times.append(time.perf_counter() - t0)
        hub.stop_server(USER, PROJECT)
    return times


def namespace_memory(inode: int) -> dict[str, float]:
    pss = rss = 0
    count = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}/ns/pid").st_ino != inode:
                continue
            fields = dict(
                line.split(":", 1)
                for line in Path(f"/proc/{entry}/smaps_rollup").read_text().splitlines()[1:]
            )
        except OSError:
            continue
        pss += int(fields["Pss"].split()[0])
        rss += int(fields["Rss"].split()[0])
        count += 1
    return {"processes": count, "pss_mib": pss / 1024, "rss_mib": rss / 1024}


def keeper_memory(pid: int) -> float:
    """The keeper (setsid) and bwrap monitor live outside the sandbox's pid namespace."""
    total = 0
    for p in [pid, *[int(c) for c in _children(pid)]]:
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def _children(pid: int) -> list[str]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return out.split()


def measure_memory(hub: HubInstance) -> dict[str, object]:
    hub.start_server(USER, PROJECT)
    time.sleep(3)  # let the server settle
    state = hub.api("GET", f"/users/{USER}?include_stopped_servers=1").json()["servers"][PROJECT]
    inode, pid = state["state"]["pidns"], state["state"]["pid"]
    idle = namespace_memory(inode)
    outside = keeper_memory(pid)
    kernel = Kernel(hub, USER, PROJECT, hub.user_token(USER))
    kernel.run("x = 1")
    time.sleep(2)
    with_kernel = namespace_memory(inode)
    kernel.shutdown()
    hub.stop_server(USER, PROJECT)
    return {"idle": idle, "idle_with_kernel": with_kernel, "keeper_and_monitor_pss_mib": outside}


def run_hub(extra: str, n: int, memory: bool) -> dict[str, object]:
    root = Path(tempfile.mkdtemp(prefix="trebench-", dir="/tmp"))
    hub = HubInstance(make_state(root, airlock_service="none"), extra_config=extra)
    try:
        hub.start()
        hub.create_user(USER)
        time_starts(hub, 1)  # warm-up (page cache), not counted
        times = time_starts(hub, n)
        result: dict[str, object] = {
            "starts": n,
            "p50_s": statistics.median(times),
            "p95_s": percentile(times, 0.95),
            "min_s": min(times),
            "max_s": max(times),
        }
        if memory:
            result["memory"] = measure_memory(hub)
        return result
    finally:
        hub.stop()
        shutil.rmtree(root, ignore_errors=True)


def machine() -> dict[str, str]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    free = subprocess.run(["free", "-h"], capture_output=True, text=True).stdout
    load = Path("/proc/loadavg").read_text().split()[:3]
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "memory": free.splitlines()[1].split()[1],
        "loadavg_at_start": " ".join(load),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def main() -> None:
    from tre.hub.sandbox_env import build_sandbox_env, ensure_sandbox_user

    n = int(os.environ.get("BENCH_SANDBOX_STARTS", "20"))
    ensure_sandbox_user("tre-sandbox")
    build_sandbox_env(Path(os.environ.get("TRE_TEST_SANDBOX_ENV", REPO_ROOT / "var/sandbox-env")))
    report: dict[str, object] = {"machine": machine()}
    report["bubblewrap"] = run_hub("", n, memory=True)
    report["local_process_baseline"] = run_hub(BASELINE_CONFIG, n, memory=False)
    bw, base = report["bubblewrap"], report["local_process_baseline"]
    report["p50_ratio_bubblewrap_to_baseline"] = bw["p50_s"] / base["p50_s"]  # type: ignore[index]
    idle_pss = bw["memory"]["idle"]["pss_mib"] + bw["memory"]["keeper_and_monitor_pss_mib"]  # type: ignore[index]
    kernel_pss = (
        bw["memory"]["idle_with_kernel"]["pss_mib"] + bw["memory"]["keeper_and_monitor_pss_mib"]  # type: ignore[index]
    )
    usable_mib = (24 * GIB - 2 * GIB) / 2**20  # 2 GiB kept for the OS, hub, proxy, airlock
    report["estimate_24gib"] = {
        "idle_sandboxes": int(usable_mib // idle_pss),
        "idle_sandboxes_with_a_kernel": int(usable_mib // kernel_pss),
    }
    print(json.dumps(report, indent=2))
    out = REPO_ROOT / "benchmarks" / "out"
    out.mkdir(exist_ok=True)
    (out / "sandbox.json").write_text(json.dumps(report, indent=2))

"""`airlock serve --workers 2`: the workers serve on the shared socket, a worker killed with
SIGKILL is replaced, and SIGTERM stops the parent, the workers and their check processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import psutil
import yaml

from tests.hubfixture import free_port


def _children(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=False)


def test_workers_share_the_socket_are_restarted_and_stop(tmp_path):
    port = free_port()
    config = tmp_path / "tre.yaml"
    config.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state")}))
    env = {
        **os.environ,
        "TRE_CONFIG": str(config),
        # never asked: /api/health needs no token
        "JUPYTERHUB_API_URL": "http://127.0.0.1:9/hub/api",
        "JUPYTERHUB_API_TOKEN": "unused",
    }
    cmd = [sys.executable, "-m", "airlock.cli", "serve", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--workers", "2", "--check-processes", "1"]
    proc = subprocess.Popen([*cmd, "--log-level", "warning"], env=env)
    everything: set[int] = set()
    try:
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}/services/airlock/", timeout=10)

        def wait_healthy_with(n_workers: int) -> list[psutil.Process]:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                assert proc.poll() is None, "airlock serve exited"
                workers = _children(proc.pid)
                try:
                    ok = http.get("api/health").status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok and len(workers) == n_workers:
                    return workers
                time.sleep(0.3)
            raise AssertionError("the workers did not come up")

        workers = wait_healthy_with(2)
        everything |= {p.pid for w in workers for p in [w, *w.children(recursive=True)]}
        os.kill(workers[0].pid, signal.SIGKILL)
        time.sleep(1)
        replaced = wait_healthy_with(2)
        assert workers[0].pid not in {w.pid for w in replaced}
        everything |= {p.pid for w in replaced for p in [w, *w.children(recursive=True)]}
        for _ in range(20):
            assert http.get("api/health").status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    deadline = time.monotonic() + 30
    left = everything
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = {p for p in left if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"}
    # nothing is left, not even the check process of the worker killed outright
    assert not left, [psutil.Process(p).cmdline() for p in left]

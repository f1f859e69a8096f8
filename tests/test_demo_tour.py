"""`tre demo --tour` runs the whole story through the real HTTP interfaces and exits 0.

It starts everything for real in a fresh state directory on free loopback ports: the ingest of
synthetic sites and the NWTS cohort, provisioning, JupyterHub with the proxy and a bubblewrap
sandbox, the airlock as a hub service; then logs in, queries, requests, reviews, downloads and
verifies. The sandbox's Python environment is shared with the demo (built once, reused).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.provision_hub import free_port
from tre.settings import default_state_dir

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.hub
@pytest.mark.sandbox
@pytest.mark.timeout(900)
def test_tour_runs_the_whole_story(require_proxy, require_bwrap):
    # The sandbox user must be able to traverse to the extract and the workspace (pytest's own
    # tmp_path lives under a 0700 directory), and unix socket paths must stay short.
    root = Path(tempfile.mkdtemp(prefix="tre-tour-", dir="/tmp"))
    root.chmod(0o755)
    try:
        _run_tour(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _run_tour(root: Path) -> None:
    tmp_path, runtime = root, root / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRE_", "JUPYTERHUB_"))}
    env.update(
        TRE_STATE_DIR=str(tmp_path / "state"),
        TRE_HUB_PORT=str(free_port()),
        TRE_AIRLOCK_PORT=str(free_port()),
        TRE_HUB__PROXY_API_PORT=str(free_port()),
        TRE_HUB__RUNTIME_DIR=str(runtime),
        TRE_HUB__SANDBOX_ENV_DIR=os.environ.get(
            "TRE_TEST_SANDBOX_ENV", str(default_state_dir() / "sandbox-env")
        ),
        TRE_ENFORCE_INTERVAL_SECONDS="5",
    )
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "tre"),
            "demo",
            "--tour",
            "--patients",
            "300",
            "--skip-quality-reports",
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=850,
    )
    output = proc.stdout + proc.stderr
    hub_log = tmp_path / "state" / "demo" / "jupyterhub.log"
    tail = hub_log.read_text(errors="replace")[-4000:] if hub_log.exists() else "(no hub log)"
    assert proc.returncode == 0, f"{output}\n--- hub log ---\n{tail}"
    assert "Tour complete" in output
    # the demo stopped everything it started: nothing listens on its port any more
    assert "Stopped." in output
    _assert_port_closed(int(env["TRE_HUB_PORT"]))
    # `tre demo` again reuses the data, runs until Ctrl-C, then stops everything cleanly
    _run_until_ctrl_c(env, root)


def _assert_port_closed(port: int) -> None:
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


def _run_until_ctrl_c(env: dict, root: Path) -> None:
    log = root / "second-run.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "tre"), "demo"],
            cwd=REPO_ROOT,
            env={**env, "PYTHONUNBUFFERED": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 300
        while "Ctrl-C stops" not in log.read_text(errors="replace"):
            assert proc.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, "the demo did not come up again"
            time.sleep(0.5)
        hub = f"http://127.0.0.1:{env['TRE_HUB_PORT']}"
        assert httpx.get(f"{hub}/hub/login", timeout=10).status_code == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text(errors="replace")
    assert "reusing the pooled store" in text  # no regeneration, no re-ingest
    assert "Stopping" in text and "Stopped." in text
    _assert_port_closed(int(env["TRE_HUB_PORT"]))

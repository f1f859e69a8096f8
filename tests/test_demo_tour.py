"""`tre demo --tour` runs the whole story through the real HTTP interfaces and exits 0.

It starts everything for real in a fresh state directory on free loopback ports: the ingest of
synthetic sites and the NWTS cohort, provisioning, JupyterHub with the proxy and a bubblewrap
sandbox, the airlock as a hub service; then logs in, queries, requests, reviews, downloads and
verifies. The sandbox's Python environment is shared with the demo (built once, reused).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.provision_hub import free_port

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
            "TRE_TEST_SANDBOX_ENV_DIR", str(REPO_ROOT / "var" / "sandbox-env")
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
    with (
        pytest.raises(OSError),
        socket.create_connection(("127.0.0.1", int(env["TRE_HUB_PORT"])), timeout=2),
    ):
        pass

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


def test_shared_socket_connections_get_tcp_nodelay():
    """The pre-bound socket must say it is TCP, or asyncio leaves Nagle on for its connections
    and every sync endpoint's response waits 40 ms for the client's delayed ACK."""
    import asyncio
    import socket

    from airlock.service.runner import _tcp_socket

    async def accepted_nodelay() -> int:
        sock = _tcp_socket("127.0.0.1", 0)
        seen: list[int] = []

        def on_connect(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            conn = writer.get_extra_info("socket")
            seen.append(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_connect, sock=sock)
        async with server:
            _r, w = await asyncio.open_connection(*sock.getsockname()[:2])
            while not seen:
                await asyncio.sleep(0.01)
            w.close()
        return seen[0]

    assert asyncio.run(accepted_nodelay()) != 0

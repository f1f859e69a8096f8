"""`airlock serve` as a real process: one process, two uvicorn servers (TCP for the proxy and
browsers, a unix socket for sandboxes), migrations applied on start, clean exit on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
import yaml

from tests.hubfixture import free_port

from .conftest import postgres_db

pytestmark = [pytest.mark.hub, pytest.mark.postgres]


@pytest.fixture
def db(request, tmp_path):
    return postgres_db(request, tmp_path)


def test_serve_tcp_and_unix_socket(live, tre_settings, db, tmp_path):
    port, sock = free_port(), tmp_path / "run" / "airlock.sock"
    config = tmp_path / "tre.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "state_dir": str(tre_settings.state_dir),
                "policies_dir": str(tre_settings.policies_dir),
                "airlock_db_url": db.url,
            }
        )
    )
    env = {
        **os.environ,
        "TRE_CONFIG": str(config),
        "PGOPTIONS": f"-csearch_path={db.schema}",
        "JUPYTERHUB_API_URL": live.identity.config.api_url,
        "JUPYTERHUB_API_TOKEN": live.identity.config.api_token,
        "JUPYTERHUB_SERVICE_NAME": "airlock",
        "JUPYTERHUB_SERVICE_PREFIX": "/services/airlock/",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "airlock.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--uds",
            str(sock),
            "--log-level",
            "warning",
        ],
        env=env,
    )
    try:
        tcp = httpx.Client(base_url=f"http://127.0.0.1:{port}/services/airlock/", timeout=10)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if tcp.get("api/health").status_code == 200 and sock.exists():
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, "airlock serve exited"
            time.sleep(0.3)
        uds = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(sock)),
            base_url="http://airlock/services/airlock/",
            timeout=10,
        )
        token = live.tokens["sandbox:alice/wilms-outcomes"]
        me = uds.get("api/me", headers={"Authorization": f"token {token}"})
        assert me.status_code == 200 and me.json()["sandbox_project"] == "wilms-outcomes"
        r = uds.post(
            "api/requests",
            headers={"Authorization": f"token {token}"},
            json={"project": "wilms-outcomes", "files": [{"path": "notes.txt"}], "submit": True},
        )
        assert r.status_code == 201 and r.json()["state"] == "submitted"
        # the same request is visible over TCP to a checker: one service, two listeners
        checker = {"Authorization": f"token {live.tokens['checker1']}"}
        assert tcp.get(f"api/requests/{r.json()['id']}", headers=checker).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0

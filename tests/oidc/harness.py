"""Real processes for the login tests: a registry on disk, an OIDC provider, a JupyterHub.

Everything listens on 127.0.0.1 at free ports, under a temporary directory.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import secrets
import shutil
import subprocess
import textwrap
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

from tre.hub.harness import free_port, launch_hub, stop_hub_process

REPO_ROOT = Path(__file__).resolve().parents[2]
PROVIDER_JS = Path(__file__).with_name("provider.js")


def write_policies(root: Path) -> Path:
    """A registry: alice+bob in an active project, carol only in a closed one, checker1, admin.

    Dates are relative to today so the test never depends on the calendar.
    """
    today = dt.date.today()
    policies = root / "policies"
    shutil.copytree(REPO_ROOT / "policies" / "sites", policies / "sites")
    (policies / "projects").mkdir(parents=True)

    def project(
        pid: str, members: list[str], start: dt.date, end: dt.date, **extra: object
    ) -> None:
        doc = {
            "id": pid,
            "title": f"Project {pid}",
            "lay_summary": "A project used by the login tests only.",
            "purpose": "academic",
            "jurisdiction": "GB",
            "members": [{"username": m} for m in members],
            "grants": {"patient": ["*"]},
            "start_date": start.isoformat(),
            "end_date": end.isoformat(),
            **extra,
        }
        (policies / "projects" / f"{pid}.yaml").write_text(yaml.safe_dump(doc))

    project(
        "wilms-outcomes",
        ["alice", "bob"],
        today - dt.timedelta(days=30),
        today + dt.timedelta(days=300),
    )
    project(
        "neuro-survival",
        ["alice", "frank"],
        today - dt.timedelta(days=30),
        today + dt.timedelta(days=300),
    )
    project("old-study", ["carol"], today - dt.timedelta(days=400), today - dt.timedelta(days=1))
    project(
        "paused-study",
        ["erin"],
        today - dt.timedelta(days=30),
        today + dt.timedelta(days=30),
        status="suspended",
    )
    (policies / "staff.yaml").write_text(
        yaml.safe_dump({"output_checkers": ["checker1"], "admins": ["admin"]})
    )
    return policies


@dataclass
class Process:
    proc: subprocess.Popen
    log: Path
    session: bool = False  # the hub leads a session of its own (with its proxy)

    def stop(self) -> None:
        if self.session:
            stop_hub_process(self.proc)
        elif self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def start_provider(tmp: Path, clients: list[dict], accounts: list[dict]) -> tuple[Process, str]:
    port = free_port()
    log = tmp / "oidc-provider.log"
    proc = subprocess.Popen(
        [
            "node",
            str(PROVIDER_JS),
            "--port",
            str(port),
            "--clients",
            json.dumps(clients),
            "--accounts",
            json.dumps(accounts),
        ],
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        cwd=REPO_ROOT,
        text=True,
    )
    line = proc.stdout.readline() if proc.stdout else ""
    if not line.startswith("READY "):
        proc.kill()
        raise RuntimeError(f"OIDC provider did not start: {line!r}\n{log.read_text()}")
    return Process(proc, log), line.split(" ", 1)[1].strip()


@dataclass
class Hub:
    process: Process
    url: str
    api_token: str

    def api(self, path: str) -> httpx.Response:
        return httpx.get(
            f"{self.url}/hub/api{path}",
            headers={"Authorization": f"token {self.api_token}"},
            timeout=10,
        )


def start_hub(tmp: Path, proxy_path: str, auth_config: str, port: int | None = None) -> Hub:
    """A real JupyterHub 6 behind a real configurable-http-proxy, with ``auth_config`` appended."""
    hub_dir = tmp / "hub"
    hub_dir.mkdir()
    port = port or free_port()
    hub_port, api_port = free_port(), free_port()
    token = secrets.token_hex(16)
    config = hub_dir / "jupyterhub_config.py"
    config.write_text(
        textwrap.dedent(
            f"""
            c = get_config()  # noqa
            c.JupyterHub.bind_url = "http://127.0.0.1:{port}"
            c.JupyterHub.hub_bind_url = "http://127.0.0.1:{hub_port}"
            c.JupyterHub.db_url = "sqlite:///{hub_dir}/jupyterhub.sqlite"
            c.JupyterHub.cookie_secret_file = "{hub_dir}/cookie_secret"
            c.JupyterHub.pid_file = "{hub_dir}/jupyterhub.pid"
            c.JupyterHub.default_url = "/hub/home"
            c.JupyterHub.cleanup_servers = True
            c.ConfigurableHTTPProxy.command = ["{proxy_path}"]
            c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{api_port}"
            c.ConfigurableHTTPProxy.auth_token = "{secrets.token_hex(16)}"
            c.JupyterHub.services = [{{"name": "tests", "api_token": "{token}"}}]
            c.JupyterHub.load_roles = [{{
                "name": "tests",
                "scopes": ["list:users", "read:users", "list:groups", "read:groups"],
                "services": ["tests"],
            }}]
            """
        )
        + textwrap.dedent(auth_config)
    )
    log = tmp / "jupyterhub.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("JUPYTERHUB_CRYPT_KEY", None)
    proc = launch_hub(
        config,
        log_path=log,
        # through the proxy: proves the proxy routes to the hub
        ready_url=f"http://127.0.0.1:{port}/hub/health",
        env=env,
        timeout=120,  # generous: CI machines can be busy
    )
    return Hub(Process(proc, log, session=True), f"http://127.0.0.1:{port}", token)


def xsrf_from(html: str) -> str:
    m = re.search(r'name="_xsrf"\s+value="([^"]+)"', html)
    assert m, "no _xsrf field in the login form"
    return m.group(1)

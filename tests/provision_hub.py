"""A real JupyterHub 6 + configurable-http-proxy on free loopback ports, for provisioning tests.

The hub registers the service ``tre-provision`` with the token and scopes provisioning needs
(exactly what the generated production config must grant). Single-user servers are real
``jupyterhub-singleuser`` processes (SimpleLocalProcessSpawner: no system users needed), so
"stop the running sandboxes" is tested against real running servers.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tre.hub.harness import free_port, launch_hub, stop_hub_process

PROVISION_SCOPES = ["admin:users", "admin:groups", "admin:servers"]


def proxy_or_skip() -> str:
    """The proxy from node_modules (module-scoped fixtures cannot use ``require_proxy``)."""
    from tests.conftest import REPO_ROOT, require_component

    path = REPO_ROOT / "node_modules" / ".bin" / "configurable-http-proxy"
    require_component(path.exists(), "configurable-http-proxy (npm ci)")
    return str(path)


@dataclass
class RunningHub:
    api_url: str
    token: str
    proc: subprocess.Popen
    workdir: Path

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.api_url,
            headers={"Authorization": f"token {self.token}"},
            timeout=30,
            trust_env=False,
        )

    def start_server(self, user: str, name: str, timeout: float = 60) -> None:
        with self.client() as c:
            if c.get(f"/users/{user}").status_code == 404:
                c.post(f"/users/{user}").raise_for_status()
            r = c.post(f"/users/{user}/servers/{name}")
            assert r.status_code in (201, 202), r.text
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                info = c.get(f"/users/{user}").json()
                if (info.get("servers") or {}).get(name, {}).get("ready"):
                    return
                time.sleep(0.3)
        raise TimeoutError(f"server {user}/{name} did not start")

    def stop(self) -> None:
        stop_hub_process(self.proc)


def start_hub(workdir: Path, proxy: str) -> RunningHub:
    workdir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(32)
    public, hub_port, proxy_api = free_port(), free_port(), free_port()
    bindir = Path(sys.executable).parent
    config = workdir / "jupyterhub_config.py"
    config.write_text(
        f"""
c = get_config()  # noqa
c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = {public}
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = {hub_port}
c.ConfigurableHTTPProxy.command = [{proxy!r}]
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{proxy_api}"
c.ConfigurableHTTPProxy.auth_token = {secrets.token_hex(16)!r}
c.JupyterHub.db_url = "sqlite:///{workdir}/hub.sqlite"
c.JupyterHub.cookie_secret_file = "{workdir}/cookie_secret"
c.JupyterHub.pid_file = "{workdir}/hub.pid"
c.JupyterHub.allow_named_servers = True
c.JupyterHub.cleanup_servers = True
c.JupyterHub.authenticator_class = "dummy"
c.DummyAuthenticator.password = {secrets.token_hex(8)!r}
c.JupyterHub.spawner_class = "jupyterhub.spawner.SimpleLocalProcessSpawner"
c.SimpleLocalProcessSpawner.home_dir_template = "{workdir}/home/{{username}}"
c.Spawner.cmd = [{str(bindir / "jupyterhub-singleuser")!r}]
c.Spawner.args = ["--allow-root", "--ServerApp.ip=127.0.0.1"]
c.Spawner.start_timeout = 60
c.JupyterHub.services = [{{"name": "tre-provision", "api_token": {token!r}}}]
c.JupyterHub.load_roles = [
    {{"name": "tre-provision", "scopes": {PROVISION_SCOPES!r}, "services": ["tre-provision"]}}
]
"""
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTERHUB_", "JPY_"))}
    env["PATH"] = f"{bindir}:{env.get('PATH', '')}"
    api_url = f"http://127.0.0.1:{public}/hub/api"

    def groups_api_ready() -> bool:
        with RunningHub(api_url, token, None, workdir).client() as c:  # type: ignore[arg-type]
            return c.get("/groups").status_code == 200

    proc = launch_hub(
        config,
        log_path=workdir / "hub.log",
        ready_url=f"{api_url}/",
        env=env,
        ready=groups_api_ready,
    )
    return RunningHub(api_url, token, proc, workdir)

"""A real JupyterHub 6 + configurable-http-proxy for tests (reusable by every area).

``start_hub(workdir, proxy_path, services=[...])`` runs ``python -m jupyterhub`` on free loopback
ports in ``workdir`` with the DummyAuthenticator (password ``HUB_PASSWORD``), named servers on,
and an admin service ``tre-test-admin`` whose token (``Hub.admin_token``) creates users and
tokens through the REST API. Named servers are spawned with ``SimpleLocalProcessSpawner`` running
``tests/hub_fake_server.py``: a tiny HTTP server that records the JUPYTERHUB_API_TOKEN the hub
gave it, so tests hold the very token a sandbox would hold.

Use it from a session fixture::

    hub = start_hub(tmp_path_factory.mktemp("hub"), require_proxy, services=[...])
    yield hub
    hub.stop()
"""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tre.hub.harness import free_port, launch_hub, stop_hub_process

HUB_PASSWORD = "tre-test-password"  # noqa: S105 (DummyAuthenticator in tests only)
FAKE_SERVER = Path(__file__).resolve().parent / "hub_fake_server.py"


@dataclass
class Hub:
    workdir: Path
    url: str  # public (proxy) URL, e.g. http://127.0.0.1:PORT
    api_url: str  # hub API, e.g. http://127.0.0.1:HUBPORT/hub/api
    admin_token: str
    process: subprocess.Popen
    token_dir: Path
    log_path: Path
    services: list[dict[str, Any]] = field(default_factory=list)

    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"token {self.admin_token}"}
        return httpx.request(method, f"{self.api_url}{path}", headers=headers, timeout=30, **kwargs)

    def create_user(self, name: str) -> None:
        r = self.api("POST", f"/users/{name}")
        if r.status_code not in (201, 409):
            raise RuntimeError(f"cannot create user {name}: {r.status_code} {r.text}")

    def user_token(self, name: str, scopes: list[str] | None = None, note: str = "test") -> str:
        """A token the hub issues for ``name`` (all of the user's permissions unless ``scopes``)."""
        body: dict[str, Any] = {"note": note, "expires_in": 3600}
        if scopes is not None:
            body["scopes"] = scopes
        r = self.api("POST", f"/users/{name}/tokens", json=body)
        if r.status_code != 201:
            raise RuntimeError(f"cannot create a token for {name}: {r.status_code} {r.text}")
        return r.json()["token"]

    def start_server(self, user: str, server_name: str, timeout: float = 60) -> str:
        """Spawn ``user``'s named server; return the API token the hub gave that server."""
        token_file = self.token_dir / f"{user}-{server_name}.token"
        token_file.unlink(missing_ok=True)
        r = self.api("POST", f"/users/{user}/servers/{server_name}")
        if r.status_code not in (201, 202, 400):
            raise RuntimeError(f"cannot start {user}/{server_name}: {r.status_code} {r.text}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            model = self.api("GET", f"/users/{user}").json()
            server = model.get("servers", {}).get(server_name) or {}
            if server.get("ready") and token_file.exists():
                return token_file.read_text().strip()
            time.sleep(0.2)
        raise TimeoutError(f"server {user}/{server_name} did not start; see {self.log_path}")

    def stop_server(self, user: str, server_name: str) -> None:
        self.api("DELETE", f"/users/{user}/servers/{server_name}")

    def stop(self) -> None:
        stop_hub_process(self.process)


def start_hub(
    workdir: Path,
    proxy_path: str,
    services: list[dict[str, Any]] | None = None,
    extra_config: str = "",
    timeout: float = 60,
    port: int | None = None,
    hub_port: int | None = None,
    user_scopes: tuple[str, ...] = ("self",),
) -> Hub:
    """Start the hub. Start external services (``url`` set) BEFORE the hub: it waits up to 30 s
    for each of them. Choose ``hub_port`` first when a service must know the hub API URL."""
    workdir.mkdir(parents=True, exist_ok=True)
    proxy_path = str(Path(proxy_path).resolve())
    token_dir = workdir / "server-tokens"
    token_dir.mkdir(exist_ok=True)
    port, hub_port = port or free_port(), hub_port or free_port()
    proxy_api_port = free_port()
    admin_token = secrets.token_hex(32)
    all_services = [{"name": "tre-test-admin", "api_token": admin_token}, *(services or [])]
    config = f"""
import sys
c = get_config()  # noqa
c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = {port}
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = {hub_port}
c.ConfigurableHTTPProxy.command = [{proxy_path!r}]
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{proxy_api_port}"
c.ConfigurableHTTPProxy.should_start = True
c.JupyterHub.db_url = "sqlite:///{workdir / "jupyterhub.sqlite"}"
c.JupyterHub.cookie_secret_file = {str(workdir / "cookie_secret")!r}
c.JupyterHub.pid_file = {str(workdir / "hub.pid")!r}
c.JupyterHub.authenticator_class = "dummy"
c.DummyAuthenticator.password = {HUB_PASSWORD!r}
c.Authenticator.allow_all = True
c.JupyterHub.allow_named_servers = True
c.JupyterHub.spawner_class = "simple"
c.Spawner.cmd = [sys.executable, {str(FAKE_SERVER)!r}]
c.Spawner.environment = {{"FAKE_TOKEN_DIR": {str(token_dir)!r}}}
c.Spawner.start_timeout = 30
c.Spawner.http_timeout = 30
c.SimpleLocalProcessSpawner.home_dir_template = {str(workdir / "home" / "{username}")!r}
# what a sandbox token may do: post activity, reach its own server, and use the airlock
c.Spawner.server_token_scopes = [
    "users:activity!user", "access:servers!server", "access:services!service=airlock"
]
c.JupyterHub.services = {all_services!r}
c.JupyterHub.load_roles = [
    {{"name": "user", "scopes": {list(user_scopes)!r}}},
    {{"name": "tre-test-admin", "scopes": ["admin:users", "admin:servers", "tokens",
      "read:users", "list:users", "access:servers", "read:roles"],
      "services": ["tre-test-admin"]}},
]
c.JupyterHub.cleanup_servers = True
c.JupyterHub.log_level = "INFO"
{extra_config}
"""
    (workdir / "jupyterhub_config.py").write_text(config)
    log_path = workdir / "hub.log"
    proc = launch_hub(
        workdir / "jupyterhub_config.py",
        log_path=log_path,
        ready_url=f"http://127.0.0.1:{port}/hub/api/",
        env={**os.environ, "PATH": f"{Path(proxy_path).parent}:{os.environ.get('PATH', '')}"},
        timeout=timeout,
    )
    return Hub(
        workdir=workdir,
        url=f"http://127.0.0.1:{port}",
        api_url=f"http://127.0.0.1:{hub_port}/hub/api",
        admin_token=admin_token,
        process=proc,
        token_dir=token_dir,
        log_path=log_path,
        services=all_services,
    )

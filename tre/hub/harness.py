"""Run a real JupyterHub (generated config, real proxy, real sandboxes) in a directory of its own.

``launch_hub``/``stop_hub_process`` start and stop any hub configuration (the test hubs with
their own small configs use them too); ``HubInstance`` runs the generated one.

Used by the tests, the benchmark and the demo: ``HubInstance.start()`` writes the config with
``tre.hub.config.write_config`` for the given settings, appends the caller's extra lines (tests
add an admin service token and a test authenticator there), starts ``jupyterhub`` as a child
process and waits until the hub answers through the proxy. ``Kernel`` runs code in a live
sandbox kernel through the proxy (REST + websocket), as a browser would.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tre.hub.config import public_airlock_url, public_server_url, write_config
from tre.settings import Settings


class LoopbackTransport(httpx.HTTPTransport):
    """Connects to 127.0.0.1 whatever the URL's host, which stays in the Host header.

    The hub serves each user's servers and the airlock on host names of their own below its
    public host (``alice.tre.localhost``, ``airlock--service.tre.localhost``). Browsers resolve
    ``*.localhost`` to this machine themselves; Python would ask the system's DNS resolver, so
    tests, the demo and the benchmarks send such requests through this transport instead:
    nothing is looked up, and a URL whose host is not loopback is refused (tests and demos
    talk to this machine only)."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        if not (host == "localhost" or host.endswith(".localhost") or _is_loopback(host)):
            raise httpx.ConnectError(f"{host} is not this machine: refused", request=request)
        wire = httpx.Request(
            request.method,
            request.url.copy_with(host="127.0.0.1"),
            headers=request.headers,  # keeps Host: <public host>
            stream=request.stream,
            extensions=request.extensions,
        )
        return super().handle_request(wire)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def loopback_client(**kwargs: Any) -> httpx.Client:
    """An httpx client that reaches ``*.localhost`` public URLs on this machine (see above)."""
    return httpx.Client(transport=LoopbackTransport(), **kwargs)


def loopback_request(method: str, url: str, **kwargs: Any) -> httpx.Response:
    kwargs.setdefault("timeout", 60)
    with loopback_client() as client:
        return client.request(method, url, **kwargs)


# Chromium: resolve the hub's host names to the proxy on 127.0.0.1 without any lookup (it
# resolves *.localhost to loopback by itself, possibly as ::1 where the proxy does not listen).
CHROMIUM_LOOPBACK_RULES = "--host-resolver-rules=MAP *.localhost 127.0.0.1, MAP localhost 127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_hub(
    config: Path,
    *,
    log_path: Path,
    ready_url: str,
    env: dict[str, str] | None = None,
    timeout: float = 60,
    ready: Callable[[], bool] | None = None,
) -> subprocess.Popen:
    """Start ``python -m jupyterhub -f config`` in a session of its own (so that stopping it
    takes its proxy too), logging to ``log_path``; return once ``ready_url`` answers 200 and
    ``ready()`` (if given) holds. RuntimeError with the log's tail if it exits or times out."""
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterhub", "-f", str(config)],
            cwd=config.parent,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env if env is not None else dict(os.environ),
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the hub exited ({proc.returncode}):\n{_tail(log_path)}")
        try:
            if httpx.get(ready_url, timeout=2).status_code == 200 and (ready is None or ready()):
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_hub_process(proc)
    raise RuntimeError(f"the hub did not answer in {timeout}s:\n{_tail(log_path)}")


def stop_hub_process(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM to the hub's session (hub, proxy, spawned local processes), SIGKILL if needed."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    except ProcessLookupError:
        proc.wait(5)


def _tail(path: Path, chars: int = 6000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


# configurable-http-proxy answers 503 ("write EPIPE" in its log) for a request with a body that
# the hub refused: the hub had answered (403, logged) and closed the connection while the proxy
# was still writing to it (tornado closes a connection when it answers before it has read the
# whole request). The hub's answer is lost; the request changed nothing, so it is sent again
# (measured here: 15-20 % of refused POSTs and DELETEs with a JSON body, none of the accepted
# ones, none of the GETs).
PROXY_EPIPE_ATTEMPTS = 5


@dataclass
class HubInstance:
    settings: Settings
    extra_config: str = ""
    admin_token: str = field(default_factory=lambda: secrets.token_hex(24))
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        """The proxy on loopback: the hub's pages and API (the hub answers any host name)."""
        return f"http://127.0.0.1:{self.settings.hub_port}"

    @property
    def public_url(self) -> str:
        """The hub's public origin (what a browser uses: its cookies are set for this host)."""
        return str(self.settings.hub.public_url)

    def server_url(self, user: str, server: str) -> str:
        """Public URL of a user's named server (on the user's own host)."""
        return public_server_url(self.settings, user, server)

    @property
    def airlock_url(self) -> str:
        """Public URL of the airlock (on a host of its own)."""
        return public_airlock_url(self.settings)

    def write(self) -> Path:
        path = write_config(self.settings)
        admin = (
            "\n# -- added by tre.hub.harness (tests/benchmarks only) --\n"
            "c.JupyterHub.services.append({'name': 'tre-harness-admin', "
            f"'api_token': {self.admin_token!r}}})\n"
            "c.JupyterHub.load_roles.append({'name': 'tre-harness-admin', "
            "'scopes': ['admin:users', "
            "'admin:servers', 'tokens', 'admin-ui', 'list:users', 'read:users', "
            "'access:servers', 'read:servers', 'delete:servers', 'servers', "
            "'admin:server_state'], "
            "'services': ['tre-harness-admin']})\n"
        )
        with path.open("a") as fh:
            fh.write(admin + self.extra_config + "\n")
        return path

    def start(self, timeout: float = 60) -> HubInstance:
        path = self.write()
        self.log_path = path.parent / "jupyterhub.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TRE_", "JUPYTERHUB_"))}
        self.proc = launch_hub(
            path, log_path=self.log_path, ready_url=f"{self.url}/hub/api/", env=env, timeout=timeout
        )
        return self

    def log(self, tail: int = 6000) -> str:
        """The tail of the hub's log, then of each sandbox's own (they are not in the hub's)."""
        text = _tail(self.log_path, tail) if self.log_path else ""
        for path in sorted((self.settings.hub.runtime_dir / "logs").glob("*.log")):
            text += f"\n--- sandbox {path.stem} ---\n" + _tail(path, tail // 2)
        return text

    def stop(self) -> None:
        """Stop the hub (and its proxy); sandboxes keep running (cleanup_servers is False)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        # the hub's managed services (idle culler, airlock) and proxy run in sessions of their
        # own: remember them, so none is left behind if the hub does not stop them
        # (sandboxes excepted: they outlive a hub restart by design)
        children = [pid for pid in _children(self.proc.pid) if not _is_sandbox(pid)]
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            alive = [pid for pid in children if _alive(pid)]
            for pid in alive:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 5
            while any(_alive(pid) for pid in alive) and time.monotonic() < deadline:
                time.sleep(0.1)

    # -- REST API -----------------------------------------------------------------------------

    def api(
        self, method: str, path: str, token: str | None = None, **kwargs: Any
    ) -> httpx.Response:
        headers = {"Authorization": f"token {token or self.admin_token}"}
        for _ in range(PROXY_EPIPE_ATTEMPTS):
            r = httpx.request(
                method, f"{self.url}/hub/api{path}", headers=headers, timeout=60, **kwargs
            )
            if r.status_code != 503:
                break
        return r

    def create_user(self, name: str) -> None:
        r = self.api("POST", f"/users/{name}")
        if r.status_code not in (201, 409):
            raise RuntimeError(f"creating {name}: {r.status_code} {r.text}")

    def user_token(self, name: str) -> str:
        r = self.api("POST", f"/users/{name}/tokens", json={"note": "harness"})
        r.raise_for_status()
        return r.json()["token"]

    def start_server(self, user: str, project: str, timeout: float = 90) -> httpx.Response:
        """Start (user, project) and wait until it is ready; return the POST response."""
        r = self.api("POST", f"/users/{user}/servers/{project}")
        if r.status_code >= 500:
            raise RuntimeError(f"starting {user}/{project}: {r.text}\n{self.log()}")
        if r.status_code >= 400:
            return r
        self.wait_ready(user, project, timeout)
        return r

    def wait_ready(self, user: str, project: str, timeout: float = 90) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            model = self.api("GET", f"/users/{user}/servers/{project}")
            if model.status_code == 200:
                data = model.json()
                if data.get("ready"):
                    return data
                if not data.get("pending") and not data.get("ready") and data.get("stopped"):
                    raise RuntimeError(f"{user}/{project} stopped while starting:\n{self.log()}")
            time.sleep(0.1)
        raise RuntimeError(f"{user}/{project} not ready after {timeout}s:\n{self.log()}")

    def stop_server(self, user: str, project: str, timeout: float = 30) -> None:
        r = self.api("DELETE", f"/users/{user}/servers/{project}")
        if r.status_code not in (202, 204, 404):
            raise RuntimeError(f"stopping {user}/{project}: {r.status_code} {r.text}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            model = self.api("GET", f"/users/{user}/servers/{project}")
            if model.status_code == 404 or not model.json().get("pending"):
                return
            time.sleep(0.1)


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
        text = out
    return [int(p) for p in text.split()]


def _is_sandbox(pid: int) -> bool:
    try:
        return b"bwrap" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in {"Z", "X"}


class Kernel:
    """A kernel in a live sandbox, driven through the proxy like JupyterLab drives it."""

    def __init__(self, hub: HubInstance, user: str, project: str, token: str) -> None:
        self.base = hub.server_url(user, project)
        self.token = token
        self.headers = {"Authorization": f"token {token}"}
        r = loopback_request(
            "POST", f"{self.base}/api/kernels", headers=self.headers, json={"name": "python3"}
        )
        r.raise_for_status()
        self.kernel_id = r.json()["id"]

    def run(self, code: str, timeout: float = 60) -> dict[str, Any]:
        """Execute ``code``; return {"stdout", "stderr", "error", "result"}."""
        return execute_in_kernel(self.base, self.kernel_id, self.headers, code, timeout)

    def shutdown(self) -> None:
        loopback_request(
            "DELETE", f"{self.base}/api/kernels/{self.kernel_id}", headers=self.headers, timeout=30
        )


def execute_in_kernel(
    server_url: str, kernel_id: str, headers: dict[str, str], code: str, timeout: float = 60
) -> dict[str, Any]:
    """Execute ``code`` in a running kernel over its websocket, as JupyterLab does; return
    {"stdout", "stderr", "error", "result"}. Raises TimeoutError or RuntimeError."""
    return asyncio.run(_execute_in_kernel(server_url, kernel_id, headers, code, timeout))


async def _execute_in_kernel(
    server_url: str, kernel_id: str, headers: dict[str, str], code: str, timeout: float
) -> dict[str, Any]:
    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    # to the proxy on loopback, with the server's public host name in the Host header
    public = httpx.URL(server_url)
    wire = public.copy_with(scheme="ws", host="127.0.0.1")
    ws_url = str(wire).rstrip("/") + f"/api/kernels/{kernel_id}/channels"
    host = public.host + (f":{public.port}" if public.port else "")
    conn = await websocket_connect(HTTPRequest(ws_url, headers={**headers, "Host": host}))
    msg_id = uuid.uuid4().hex
    conn.write_message(
        json.dumps(
            {
                "header": {
                    "msg_id": msg_id,
                    "username": "tre",
                    "session": uuid.uuid4().hex,
                    "msg_type": "execute_request",
                    "version": "5.3",
                },
                "parent_header": {},
                "metadata": {},
                "content": {"code": code, "silent": False, "allow_stdin": False},
                "channel": "shell",
            }
        )
    )
    out: dict[str, Any] = {"stdout": "", "stderr": "", "error": None, "result": None}
    deadline = time.monotonic() + timeout
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no answer from the kernel in {timeout:.0f}s: {out}")
            raw = await asyncio.wait_for(conn.read_message(), remaining)
            if raw is None:
                raise RuntimeError(f"kernel websocket closed: {out}")
            msg = json.loads(raw)
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                out[content["name"]] += content["text"]
            elif kind == "execute_result":
                out["result"] = content["data"].get("text/plain")
            elif kind == "error":
                out["error"] = f"{content['ename']}: {content['evalue']}"
            elif kind == "status" and content["execution_state"] == "idle":
                return out
    finally:
        conn.close()

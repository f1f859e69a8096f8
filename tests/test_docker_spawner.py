"""TREDockerSpawner against a Docker Engine API served on a unix socket by the test.

No Docker engine runs on these machines, so the test stands up a small engine-API server (the
endpoints DockerSpawner uses: /version, /images/…, /containers/create, start, json, stop,
delete), points the real docker-py client at it with DOCKER_HOST=unix://…, drives the real
spawner's start()/stop(), and asserts on the exact request bodies the engine would receive.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import json
import re
import secrets
import socketserver
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import parse_qs, unquote, urlparse

import pytest
from jupyterhub import orm
from jupyterhub.objects import Hub
from tornado import web
from traitlets import TraitError

from tests.oidc.harness import write_policies
from tre.hub.access import can_start_project
from tre.hub.docker import TREDockerSpawner
from tre.registry import load_registry

IMAGE = "registry.example.org/tre/notebook@sha256:" + "ab" * 32
SANDBOX_IP = "172.30.0.7"


class FakeEngine:
    """Just enough of the Docker Engine API (v1.45) to run DockerSpawner, recording requests."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self.requests: list[tuple[str, str, dict, object]] = []
        self.images: set[str] = set()
        self.containers: dict[str, dict] = {}  # id -> {"name", "body", "running"}
        self.networks: dict[str, dict] = {}  # name -> {"body", "connected": {container: aliases}}
        engine = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def address_string(self) -> str:
                return "unix"

            def _reply(self, status: int, body: object = None) -> None:
                data = b"" if body is None else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self) -> None:
                url = urlparse(self.path)
                path = re.sub(r"^/v[0-9.]+", "", url.path)
                query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                engine.requests.append((self.command, path, query, body))
                status, payload = engine.route(self.command, unquote(path), query, body)
                self._reply(status, payload)

            do_GET = do_POST = do_DELETE = _handle  # noqa: N815

        class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True

        self.server = Server(str(socket_path), Handler)
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self) -> FakeEngine:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _find(self, ref: str) -> str | None:
        for cid, c in self.containers.items():
            if ref in (cid, c["name"], "/" + c["name"]):
                return cid
        return None

    def route(self, method: str, path: str, query: dict, body: object) -> tuple[int, object]:
        if path == "/version":
            return 200, {"ApiVersion": "1.45", "MinAPIVersion": "1.24", "Version": "26.1.4"}
        if method == "GET" and path.startswith("/images/") and path.endswith("/json"):
            name = path[len("/images/") : -len("/json")]
            if name in self.images:
                return 200, {
                    "Id": "sha256:" + "cd" * 32,
                    "Config": {"Cmd": ["jupyterhub-singleuser"]},
                }
            return 404, {"message": f"No such image: {name}"}
        if method == "POST" and path == "/images/create":
            self.images.add(f"{query['fromImage']}@{query['tag']}")
            return 200, {"status": "Downloaded newer image"}
        if method == "POST" and path == "/networks/create":
            if body["Name"] in self.networks:
                return 409, {"message": f"network with name {body['Name']} already exists"}
            self.networks[body["Name"]] = {"body": body, "connected": {}}
            return 201, {"Id": body["Name"], "Warning": ""}
        n = re.fullmatch(r"/networks/([^/]+)(/connect|/disconnect)?", path)
        if n:
            net = self.networks.get(n.group(1))
            if net is None:
                return 404, {"message": f"network {n.group(1)} not found"}
            if n.group(2) == "/connect":
                if body["Container"] in net["connected"]:
                    return 403, {"message": "endpoint with name x already exists in network"}
                net["connected"][body["Container"]] = body.get("EndpointConfig", {}).get("Aliases")
                return 200, None
            if n.group(2) == "/disconnect":
                net["connected"].pop(body["Container"], None)
                return 200, None
            if method == "DELETE":
                if net["connected"] or any(
                    c["body"]["HostConfig"]["NetworkMode"] == n.group(1)
                    for c in self.containers.values()
                ):
                    return 403, {"message": "error while removing network: has active endpoints"}
                del self.networks[n.group(1)]
                return 204, None
            return 200, {"Name": n.group(1), "Internal": net["body"].get("Internal", False)}
        if method == "POST" and path == "/containers/create":
            cid = secrets.token_hex(32)
            self.containers[cid] = {"name": query["name"], "body": body, "running": False}
            return 201, {"Id": cid, "Warnings": []}
        m = re.fullmatch(r"/containers/([^/]+)(/json|/start|/stop|/wait)?", path)
        if m:
            cid = self._find(m.group(1))
            if cid is None:
                return 404, {"message": f"No such container: {m.group(1)}"}
            c = self.containers[cid]
            action = m.group(2)
            if action == "/json" and method == "GET":
                network = c["body"]["HostConfig"]["NetworkMode"]
                return 200, {
                    "Id": cid,
                    "Name": "/" + c["name"],
                    "State": {
                        "Running": c["running"],
                        "Status": "running" if c["running"] else "created",
                        "ExitCode": 0,
                    },
                    "Config": {"Env": c["body"].get("Env", [])},
                    "NetworkSettings": {"Networks": {network: {"IPAddress": SANDBOX_IP}}},
                }
            if action == "/start" and method == "POST":
                c["running"] = True
                return 204, None
            if action == "/stop" and method == "POST":
                c["running"] = False
                if c["body"]["HostConfig"].get("AutoRemove"):
                    del self.containers[cid]  # the engine removes it itself
                return 204, None
            if action is None and method == "DELETE":
                del self.containers[cid]
                return 204, None
        return 404, {"message": f"fake engine: no route for {method} {path}"}

    def bodies(self, method: str, path: str) -> list[object]:
        return [b for (m, p, _, b) in self.requests if m == method and p == path]


@pytest.fixture
def engine(tmp_path, monkeypatch):
    with FakeEngine(tmp_path / "docker.sock") as fake:
        monkeypatch.setenv("DOCKER_HOST", f"unix://{fake.socket_path}")
        monkeypatch.delenv("DOCKER_TLS_VERIFY", raising=False)
        monkeypatch.delenv("DOCKER_CERT_PATH", raising=False)
        TREDockerSpawner._client = None  # docker-py client is cached per class
        yield fake
        TREDockerSpawner._client = None


@pytest.fixture
def policies(tmp_path):
    policies = write_policies(tmp_path)
    # the hub's view of the extracts volume: every declared project has its extract
    extracts = tmp_path / "hub-extracts"
    extracts.mkdir()
    for project in (policies / "projects").glob("*.yaml"):
        (extracts / f"{project.stem}.duckdb").write_bytes(b"")
    return policies


@functools.cache
def hub_db():
    # creating the hub schema takes seconds (alembic): once per test session
    return orm.new_session_factory("sqlite://")()


def make_spawner(policies: Path, username: str, server: str, **config) -> TREDockerSpawner:
    user = SimpleNamespace(
        name=username,
        url=f"/user/{username}/",
        escaped_name=username,
        id=1,
        settings={},
        orm_user=None,
        groups=[],
    )
    # a real (in-memory) hub database row for the named server, as the hub would hand over
    db = hub_db()
    orm_user = db.query(orm.User).filter_by(name=username).first() or orm.User(name=username)
    db.add(orm_user)
    orm_spawner = orm.Spawner(user=orm_user, name=server)
    db.add(orm_spawner)
    db.commit()
    hub = Hub(ip="hub", port=8081, base_url="/hub/")
    hub.connect_url = "http://hub:8081/hub/"
    config.setdefault("image", IMAGE)
    config.setdefault("extracts_local_dir", str(policies.parent / "hub-extracts"))
    spawner = TREDockerSpawner(
        user=user,
        orm_spawner=orm_spawner,
        hub=hub,
        policies_dir=str(policies),
        api_token=secrets.token_hex(16),
        oauth_client_id=f"jupyterhub-user-{username}-{server}",
        **config,
    )
    return spawner


def test_start_sends_the_sandbox_policy_and_stop_removes(engine, policies):
    spawner = make_spawner(policies, "alice", "wilms-outcomes", mem_limit="2G", cpu_limit=1.5)
    ip, port = asyncio.run(spawner.start())
    assert (ip, port) == (SANDBOX_IP, 8888)

    # the pinned image is pulled by digest, not by a mangled tag
    pulls = [q for (m, p, q, _) in engine.requests if p == "/images/create"]
    assert pulls == [
        {"fromImage": "registry.example.org/tre/notebook", "tag": "sha256:" + "ab" * 32}
    ]

    [body] = engine.bodies("POST", "/containers/create")
    name = [q for (m, p, q, _) in engine.requests if p == "/containers/create"][0]["name"]
    assert name == "tre-alice--wilms-2doutcomes"  # escaped: "--" stays an unambiguous separator
    assert body["Image"] == IMAGE
    assert body["User"] == "1000:100"
    assert body["Labels"]["org.tre.project"] == "wilms-outcomes"
    hc = body["HostConfig"]
    assert hc["CapDrop"] == ["ALL"]
    assert "CapAdd" not in hc or not hc["CapAdd"]
    assert hc["SecurityOpt"] == ["no-new-privileges:true"]
    assert hc["ReadonlyRootfs"] is True
    assert not hc.get("Privileged")
    assert set(hc["Tmpfs"]) == {"/tmp", "/home/jovyan"}  # the workspace is mounted inside home
    assert "uid=1000" in hc["Tmpfs"]["/home/jovyan"]
    assert "noexec" in hc["Tmpfs"]["/tmp"] and "size=" in hc["Tmpfs"]["/tmp"]
    assert hc["PidsLimit"] == 512
    assert hc["Memory"] == 2 * 1024**3 and hc["MemorySwap"] == 2 * 1024**3
    assert hc["CpuQuota"] == int(1.5 * hc["CpuPeriod"])
    # its own internal network, joined only by the hub, the airlock and the proxy
    network = "tre-sandboxes-alice--wilms-2doutcomes"
    assert hc["NetworkMode"] == network
    assert engine.networks[network]["body"]["Internal"] is True
    assert engine.networks[network]["connected"] == {
        "tre-hub": ["hub"],
        "tre-airlock": ["airlock"],
        "tre-proxy": None,
    }
    assert hc["Dns"] == ["127.0.0.1"] and hc["DnsSearch"] == ["."]
    assert hc["AutoRemove"] is True
    assert hc["Init"] is True
    assert hc["IpcMode"] == "private"
    assert not hc.get("Binds") and not hc.get("PortBindings") and not hc.get("Links")
    assert not hc.get("Devices") and not hc.get("ExtraHosts")
    mounts = {m["Target"]: m for m in hc["Mounts"]}
    assert set(mounts) == {"/data/wilms-outcomes.duckdb", "/home/jovyan/work"}
    data = mounts["/data/wilms-outcomes.duckdb"]
    assert data["Type"] == "volume" and data["Source"] == "tre-extracts"
    assert data["ReadOnly"] is True
    assert data["VolumeOptions"]["Subpath"] == "wilms-outcomes.duckdb"  # only this project's file
    work = mounts["/home/jovyan/work"]
    assert (
        work["Source"] == "tre-workspaces" and work["VolumeOptions"]["Subpath"] == "wilms-outcomes"
    )
    assert work["ReadOnly"] is False
    env = dict(e.split("=", 1) for e in body["Env"])
    assert env["TRE_PROJECT"] == "wilms-outcomes"
    assert env["TRE_DATA_PATH"] == "/data/wilms-outcomes.duckdb"
    assert env["JUPYTERHUB_API_URL"].startswith("http://hub:8081/")
    assert "JUPYTERHUB_API_TOKEN" in env

    [cid] = engine.containers
    assert ("POST", f"/containers/{cid}/start") in [(m, p) for (m, p, _, _) in engine.requests]
    assert asyncio.run(spawner.poll()) is None  # running

    asyncio.run(spawner.stop())
    assert ("POST", f"/containers/{cid}/stop") in [(m, p) for (m, p, _, _) in engine.requests]
    assert ("DELETE", f"/containers/{cid}") in [(m, p) for (m, p, _, _) in engine.requests]
    assert engine.containers == {}
    assert engine.networks == {}  # the sandbox's network is gone with it
    assert spawner.object_id == ""


def test_two_sandboxes_never_share_a_network(engine, policies):
    alice = make_spawner(policies, "alice", "wilms-outcomes")
    bob = make_spawner(policies, "bob", "wilms-outcomes")
    asyncio.run(alice.start())
    asyncio.run(bob.start())
    modes = [b["HostConfig"]["NetworkMode"] for b in engine.bodies("POST", "/containers/create")]
    assert len(set(modes)) == 2 and set(modes) == set(engine.networks)
    asyncio.run(alice.stop())
    asyncio.run(bob.stop())
    assert engine.networks == {}


def test_shared_network_mode(engine, policies):
    spawner = make_spawner(policies, "alice", "wilms-outcomes", isolate_sandboxes=False)
    assert asyncio.run(spawner.start()) == (SANDBOX_IP, 8888)
    hc = engine.bodies("POST", "/containers/create")[0]["HostConfig"]
    assert hc["NetworkMode"] == "tre-sandboxes"
    assert engine.networks == {}
    asyncio.run(spawner.stop())


def test_policy_wins_over_extra_config_and_a_restart_rechecks(engine, policies):
    spawner = make_spawner(
        policies,
        "bob",
        "wilms-outcomes",
        extra_host_config={"shm_size": "128m", "mem_limit": "64G"},
    )
    asyncio.run(spawner.start())
    hc = engine.bodies("POST", "/containers/create")[-1]["HostConfig"]
    assert hc["ShmSize"] == 128 * 1024**2  # harmless extras pass through
    assert hc["CapDrop"] == ["ALL"]
    asyncio.run(spawner.stop())
    assert spawner.extra_host_config == {"shm_size": "128m", "mem_limit": "64G"}
    asyncio.run(spawner.start())  # a second start of the same spawner works the same way
    assert engine.bodies("POST", "/containers/create")[-1]["HostConfig"]["CapDrop"] == ["ALL"]
    asyncio.run(spawner.stop())


@pytest.mark.parametrize(
    "extra",
    [
        {"extra_host_config": {"privileged": True}},
        {"extra_host_config": {"cap_add": ["NET_ADMIN"]}},
        {"extra_host_config": {"network_mode": "bridge"}},
        {"extra_host_config": {"binds": {"/": {"bind": "/host", "mode": "rw"}}}},
        {"extra_host_config": {"dns": ["8.8.8.8"]}},
        {"extra_host_config": {"security_opt": ["seccomp=unconfined"]}},
        {"extra_create_kwargs": {"user": "0"}},
    ],
)
def test_extra_config_that_weakens_the_policy_is_refused(engine, policies, extra):
    spawner = make_spawner(policies, "alice", "wilms-outcomes", **extra)
    with pytest.raises(web.HTTPError, match="weaken the policy"):
        asyncio.run(spawner.start())
    assert engine.bodies("POST", "/containers/create") == []


@pytest.mark.parametrize(
    "username,server,status",
    [
        ("alice", "", 400),  # the default server: sandboxes are per project
        ("alice", "no-such-project", 403),  # same answer as "not a member": no name disclosed
        ("bob", "neuro-survival", 403),  # not a member
        ("carol", "old-study", 403),  # project ended
        ("erin", "paused-study", 403),  # project suspended
        ("dave", "wilms-outcomes", 403),  # not registered at all
    ],
)
def test_refused_servers_never_reach_the_engine(engine, policies, username, server, status):
    spawner = make_spawner(policies, username, server)
    with pytest.raises(web.HTTPError) as err:
        asyncio.run(spawner.start())
    assert err.value.status_code == status
    assert [r for r in engine.requests if r[1] != "/version"] == []


def test_user_chosen_image_or_options_are_refused(engine, policies):
    spawner = make_spawner(policies, "alice", "wilms-outcomes")
    spawner.user_options = {"image": "evil/image:latest"}
    with pytest.raises(web.HTTPError, match="cannot be chosen"):
        asyncio.run(spawner.start())
    assert engine.bodies("POST", "/containers/create") == []
    assert spawner.options_form == ""


@pytest.mark.parametrize(
    "config",
    [
        {"image": "quay.io/jupyter/base-notebook:latest"},
        {"image": "tre/notebook@sha256:short"},
        {"allowed_images": ["a@sha256:" + "0" * 64]},
        {"remove": False},
        {"volumes": {"/srv/all-extracts": "/data"}},
        {"read_only_volumes": {"/srv/all-extracts": "/data"}},
        {"links": {"tre-postgres": "db"}},
        {"use_internal_ip": False},
    ],
)
def test_unsafe_configuration_is_refused_at_load(policies, config):
    with pytest.raises(TraitError, match="pinned by digest|must stay"):
        make_spawner(policies, "alice", "wilms-outcomes", **config)


def test_project_rule_is_the_shared_one(policies, monkeypatch):
    """The spawner applies tre.hub.access, the rule of the bubblewrap spawner and home page."""
    import tre.hub.docker as docker_module

    registry = load_registry(policies)
    extracts = policies.parent / "hub-extracts"
    assert can_start_project(registry, "alice", "wilms-outcomes", extracts)
    assert not can_start_project(registry, "alice", "old-study", extracts)
    end = registry.projects["wilms-outcomes"].end_date
    day_after = end + dt.timedelta(days=1)
    assert not can_start_project(registry, "bob", "wilms-outcomes", extracts, on=day_after)
    spawner = make_spawner(policies, "bob", "wilms-outcomes")
    assert spawner.can_start()
    # the same spawner, evaluated on the day after the project ends, is refused
    shared_rule = docker_module.check_can_start_project
    monkeypatch.setattr(
        docker_module,
        "check_can_start_project",
        lambda *args, **kwargs: shared_rule(*args, **kwargs, on=day_after),
    )
    assert not spawner.can_start()


def test_project_without_an_extract_is_refused_and_workspace_is_prepared(
    engine, policies, tmp_path
):
    extracts = tmp_path / "extracts"
    workspaces = tmp_path / "workspaces"
    extracts.mkdir()
    workspaces.mkdir()
    config = {"extracts_local_dir": str(extracts), "workspaces_local_dir": str(workspaces)}
    spawner = make_spawner(policies, "alice", "wilms-outcomes", **config)
    with pytest.raises(web.HTTPError) as err:
        asyncio.run(spawner.start())
    assert err.value.status_code == 409
    assert engine.bodies("POST", "/containers/create") == [] and engine.networks == {}
    (extracts / "wilms-outcomes.duckdb").write_bytes(b"")
    asyncio.run(spawner.start())
    assert (workspaces / "wilms-outcomes").is_dir()
    asyncio.run(spawner.stop())

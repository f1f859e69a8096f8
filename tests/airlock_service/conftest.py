"""Fixtures of the airlock-service tests: a database per test on SQLite AND PostgreSQL, a TRE
with its own policies (staff, projects) and workspaces, and the service on top."""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from sqlalchemy import Engine, text

from airlock.service.core import AirlockService
from airlock.service.db import make_engine, upgrade
from tre.registry import load_registry
from tre.settings import Settings

STAFF = {"output_checkers": ["checker1", "checker2", "checker3"], "admins": ["admin"]}
REPO_ROOT = Path(__file__).resolve().parents[2]
USERS = ["alice", "bob", "carol", "checker1", "checker2", "checker3", "admin", "dave"]


def make_policies(root: Path) -> Path:
    """The repository's policies plus a third checker, who is also a member of
    leukaemia-incidence (so the 'members cannot check their own project' rule is exercised)."""
    policies = root / "policies"
    shutil.copytree(REPO_ROOT / "policies", policies)
    (policies / "staff.yaml").write_text(yaml.safe_dump(STAFF))
    leuk = policies / "projects" / "leukaemia-incidence.yaml"
    data = yaml.safe_load(leuk.read_text())
    data["members"].append({"username": "checker3", "role": "researcher"})
    # alice is in both projects, so a sandbox token of one project must not reach the other
    data["members"].append({"username": "alice", "role": "researcher"})
    leuk.write_text(yaml.safe_dump(data))
    return policies


def write_workspace_files(workspaces: Path) -> None:
    for project in ("wilms-outcomes", "leukaemia-incidence"):
        ws = workspaces / project
        (ws / "outputs").mkdir(parents=True, exist_ok=True)
        (ws / "outputs" / "table.csv").write_text("group,count\na,25\nb,30\n")
        (ws / "outputs" / "small.csv").write_text("group,count\na,3\nb,30\n")
        (ws / "notes.txt").write_text(f"notes of {project}\n")


@dataclass
class DB:
    url: str
    schema: str | None
    engine: Engine


def _make_db(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> DB:
    if kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'airlock.sqlite'}"
        engine = make_engine(url)
        return DB(url, None, engine)
    pg_url = request.getfixturevalue("require_postgres")
    schema = f"airlock_t_{uuid.uuid4().hex[:12]}"
    admin = make_engine(pg_url)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    admin.dispose()
    engine = make_engine(pg_url, schema=schema)
    db = DB(pg_url, schema, engine)

    def _drop() -> None:
        engine.dispose()
        cleanup = make_engine(pg_url)
        with cleanup.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        cleanup.dispose()

    request.addfinalizer(_drop)
    return db


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> DB:
    """A fresh, migrated airlock database: every storage test runs on both backends."""
    d = _make_db(request.param, tmp_path, request)
    upgrade(d.engine)
    return d


def postgres_db(request: pytest.FixtureRequest, tmp_path: Path) -> DB:
    """For end-to-end modules that override ``db``: the production store only (the storage
    behaviour itself is proven on both backends by the other modules)."""
    d = _make_db("postgres", tmp_path, request)
    upgrade(d.engine)
    return d


@pytest.fixture
def tre_settings(tmp_path: Path, db: DB) -> Settings:
    policies = make_policies(tmp_path)
    settings = Settings(state_dir=tmp_path / "state", policies_dir=policies, airlock_db_url=db.url)
    write_workspace_files(settings.workspaces_dir)
    return settings


@pytest.fixture
def service(tre_settings: Settings, db: DB) -> AirlockService:
    registry = load_registry(tre_settings.policies_dir)
    return AirlockService(tre_settings, db.engine, registry)


# --- a real JupyterHub with the airlock registered as its service -------------------------

SANDBOX_PROJECTS = ("wilms-outcomes", "leukaemia-incidence")


class AppHolder:
    """The ASGI app uvicorn serves; each test swaps in an app over its own database."""

    def __init__(self) -> None:
        self.app = None

    async def __call__(self, scope, receive, send) -> None:
        if self.app is None:  # between tests (the hub probes its services): not available
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b"no airlock app installed"})
            return
        await self.app(scope, receive, send)


@dataclass
class Live:
    hub: object
    holder: AppHolder
    identity: object
    prefix: str
    base: str  # airlock through the hub's proxy, e.g. http://127.0.0.1:PORT/services/airlock/
    tokens: dict  # role or user -> token (None = anonymous)
    direct: str = ""  # the airlock's own uvicorn, not through the proxy


@pytest.fixture(scope="session")
def live(tmp_path_factory, request) -> Live:
    """JupyterHub 6 + proxy + the airlock (uvicorn, loopback) for the whole test session."""
    import secrets
    import threading
    import time

    import uvicorn

    from airlock.service.auth import HubConfig, HubIdentityProvider
    from tests.conftest import require_component  # tests/conftest.py (skips locally, fails in CI)
    from tests.hubfixture import free_port, start_hub

    proxy = str(REPO_ROOT / "node_modules" / ".bin" / "configurable-http-proxy")
    require_component(Path(proxy).exists(), "configurable-http-proxy (npm ci)")
    airlock_port, hub_port = free_port(), free_port()
    service_token = secrets.token_hex(32)
    holder = AppHolder()
    server = uvicorn.Server(
        uvicorn.Config(
            holder, host="127.0.0.1", port=airlock_port, lifespan="off", log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    hub = start_hub(
        tmp_path_factory.mktemp("hub"),
        proxy,
        services=[
            {
                "name": "airlock",
                "url": f"http://127.0.0.1:{airlock_port}",
                "api_token": service_token,
                "oauth_no_confirm": True,
            }
        ],
        hub_port=hub_port,
        user_scopes=("self", "access:services!service=airlock"),
    )
    try:
        config = HubConfig(
            api_url=f"http://127.0.0.1:{hub_port}/hub/api",
            api_token=service_token,
            hub_host=hub.url,
        )
        identity = HubIdentityProvider(config)
        tokens: dict = {None: None}
        for user in USERS:
            hub.create_user(user)
            tokens[user] = hub.user_token(user)
        for project in SANDBOX_PROJECTS:
            tokens[f"sandbox:alice/{project}"] = hub.start_server("alice", project)
        yield Live(
            hub,
            holder,
            identity,
            config.prefix,
            f"{hub.url}{config.prefix}",
            tokens,
            direct=f"http://127.0.0.1:{airlock_port}{config.prefix}",
        )
    finally:
        hub.stop()
        server.should_exit = True
        thread.join(10)


class Client:
    def __init__(self, live: Live, service: AirlockService) -> None:
        import httpx

        self.live, self.service = live, service
        self.http = httpx.Client(base_url=live.base, timeout=30)

    def call(self, who, method: str, path: str, **kwargs):
        token = self.live.tokens[who]
        headers = kwargs.pop("headers", {})
        if token:
            headers["Authorization"] = f"token {token}"
        return self.http.request(method, path.lstrip("/"), headers=headers, **kwargs)


@pytest.fixture
def client(live: Live, service: AirlockService):
    from airlock.service.app import create_app

    live.holder.app = create_app(
        service, live.identity, prefix=live.prefix, session_secret="test-secret"
    )
    c = Client(live, service)
    yield c
    c.http.close()
    live.holder.app = None

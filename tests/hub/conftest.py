"""Fixtures for the hub tests: a real JupyterHub + proxy + bubblewrap sandboxes in /tmp.

The state directory is made under /tmp with mode 0755 (not under pytest's 0700 tmp dir): the
unprivileged sandbox user must traverse the paths bubblewrap binds. One hub serves the whole
session; tests that restart or reconfigure a hub start their own.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest
import yaml

from tre.extract import METADATA_TABLE
from tre.hub.auth import PasswordFile
from tre.hub.config import password_file
from tre.hub.harness import HubInstance, Kernel, free_port
from tre.hub.sandbox_env import build_sandbox_env, ensure_sandbox_user
from tre.settings import REPO_ROOT, Settings, default_state_dir, load_settings

SANDBOX_ENV = Path(os.environ.get("TRE_TEST_SANDBOX_ENV", default_state_dir() / "sandbox-env"))
TEST_AUTH = ""  # the real TRELocalAuthenticator, with the passwords below
PASSWORDS = {
    u: f"{u}-correct-horse-battery" for u in ("alice", "bob", "carol", "mallory", "checker1")
}
TODAY = dt.date.today()
# kernel code: an httpx client of the airlock's API through its unix socket, with the
# sandbox's own token (as tre.outputs calls it)
AIRLOCK_CLIENT = """
import json, os, httpx
airlock = httpx.Client(
    transport=httpx.HTTPTransport(uds=os.environ["TRE_AIRLOCK_SOCKET"]),
    base_url="http://airlock/services/airlock/api",
    headers={"Authorization": "token " + os.environ["JUPYTERHUB_API_TOKEN"]},
    timeout=60,
)
"""


def _project(pid: str, members: list[str], **extra: object) -> dict:
    data = {
        "id": pid,
        "title": f"Test project {pid}",
        "lay_summary": "A project used by the hub tests only.",
        "purpose": "academic",
        "jurisdiction": "GB",
        "members": [{"username": m} for m in members],
        "grants": {"patient": ["*"]},
        "start_date": (TODAY - dt.timedelta(days=30)).isoformat(),
        "end_date": (TODAY + dt.timedelta(days=365)).isoformat(),
    }
    data.update(extra)
    return data


PROJECTS = [
    _project("wilms-outcomes", ["alice", "bob"]),
    # mallory is registered (so she can log in) but only in a project that has ended
    _project(
        "old-study",
        ["mallory"],
        start_date=(TODAY - dt.timedelta(days=400)).isoformat(),
        end_date=(TODAY - dt.timedelta(days=2)).isoformat(),
    ),
    _project("leukaemia-incidence", ["carol"]),
    # alice's second active project: one user in two projects' sandboxes at once
    _project("second-study", ["alice"]),
    _project("paused-study", ["alice"], status="suspended"),
    _project(
        "ended-study",
        ["alice"],
        start_date=(TODAY - dt.timedelta(days=400)).isoformat(),
        end_date=(TODAY - dt.timedelta(days=1)).isoformat(),
    ),
    _project("no-extract", ["alice"]),
]


def make_extract(path: Path, project: str) -> None:
    """A small extract with the record a real build writes (``_extract``): the enforcer
    withdraws an extract whose record says it holds more than the project may see, or that
    has none (``tre.extract.extract_exceeds``)."""
    con = duckdb.connect(str(path))
    con.execute(
        "CREATE TABLE patient AS SELECT i AS patient_id, "
        "CASE WHEN i % 2 = 0 THEN 'F' ELSE 'M' END AS sex, 2005 + i % 10 AS birth_year, "
        f"'{project}' AS project FROM range(200) t(i)"
    )
    tables = {"patient": {"columns": ["patient_id", "sex", "birth_year", "project"], "rows": 200}}
    con.execute(
        f"CREATE TABLE {METADATA_TABLE} AS SELECT $p AS project_id, 0::BIGINT AS pooled_version, "
        "[]::VARCHAR[] AS sites, []::VARCHAR[] AS contributing_sites, "
        "now() AS built_at, current_date AS built_for_date, 'academic' AS purpose, "
        "'GB' AS jurisdiction, NULL::DATE AS end_date, '{}' AS row_filters, $t AS tables",
        {"p": project, "t": json.dumps(tables)},
    )
    con.close()
    os.chmod(path, 0o644)


def make_state(root: Path, **hub: object) -> Settings:
    """A TRE installation in ``root``: policies, extracts, workspaces, a secret key."""
    os.chmod(root, 0o755)
    policies = root / "policies"
    shutil.copytree(REPO_ROOT / "policies" / "sites", policies / "sites")
    shutil.copy(REPO_ROOT / "policies" / "disclosure.yaml", policies / "disclosure.yaml")
    (policies / "staff.yaml").write_text(
        yaml.safe_dump({"output_checkers": ["checker1", "checker2"], "admins": ["admin"]})
    )
    (policies / "projects").mkdir()
    for p in PROJECTS:
        (policies / "projects" / f"{p['id']}.yaml").write_text(yaml.safe_dump(p))
    state = root / "state"
    settings = load_settings(
        state_dir=state,
        **({"hub_db_url": hub.pop("db_url")} if "db_url" in hub else {}),
        policies_dir=policies,
        hub_port=free_port(),
        airlock_port=free_port(),
        hub={
            "proxy_api_port": free_port(),
            "sandbox_env_dir": str(SANDBOX_ENV),
            "runtime_dir": str(root / "run"),
            "airlock_service": "managed",
            "max_file_size_mb": 64,
            "sandbox_max_pids": 64,
            "sandbox_memory_mb": 2048,
            **hub,
        },
    )
    for d in (state, settings.extracts_dir, settings.workspaces_dir):
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o755)
    for p in PROJECTS:
        if p["id"] != "no-extract":
            make_extract(settings.extracts_dir / f"{p['id']}.duckdb", p["id"])
    settings.hmac_key_file.parent.mkdir(mode=0o700)
    settings.hmac_key_file.write_text("HMAC-SECRET-DO-NOT-LEAK")
    os.chmod(settings.hmac_key_file, 0o600)
    accounts = PasswordFile(password_file(settings))
    for user, password in PASSWORDS.items():
        accounts.set_password(user, password)
    return settings


@pytest.fixture(scope="session")
def sandbox_env() -> Path:
    require_hub_components()
    ensure_sandbox_user("tre-sandbox")
    build_sandbox_env(SANDBOX_ENV)
    return SANDBOX_ENV


def require_hub_components() -> None:
    """Session-scoped equivalent of the require_bwrap / require_proxy fixtures."""
    ci = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
    proxy = REPO_ROOT / "node_modules" / ".bin" / "configurable-http-proxy"
    for ok, what in (
        (shutil.which("bwrap") is not None, "bubblewrap (bwrap)"),
        (proxy.exists(), "configurable-http-proxy (npm ci)"),
        (os.geteuid() == 0, "root (to run sandboxes as the tre-sandbox user)"),
    ):
        if not ok:
            if ci:
                pytest.fail(f"{what} is required in CI but is not available")
            pytest.skip(f"{what} not available")


@pytest.fixture(scope="session")
def alice_token(hub: HubInstance) -> str:
    return hub.user_token("alice")


@pytest.fixture(scope="session")
def alice_server(hub: HubInstance) -> str:
    """alice's running wilms-outcomes sandbox; returns the server name."""
    r = hub.start_server("alice", "wilms-outcomes")
    assert r.status_code in (201, 202), r.text
    return "wilms-outcomes"


@pytest.fixture(scope="session")
def alice_kernel(hub: HubInstance, alice_server: str, alice_token: str) -> Iterator[Kernel]:
    kernel = Kernel(hub, "alice", alice_server, alice_token)
    yield kernel
    kernel.shutdown()


@pytest.fixture(scope="session")
def alice_second_kernel(hub: HubInstance, alice_token: str) -> Iterator[Kernel]:
    """A kernel in alice's second-study sandbox (beside her wilms-outcomes one)."""
    r = hub.start_server("alice", "second-study")
    assert r.status_code in (201, 202), r.text
    kernel = Kernel(hub, "alice", "second-study", alice_token)
    yield kernel
    kernel.shutdown()


@pytest.fixture(scope="session")
def carol_server(hub: HubInstance) -> str:
    r = hub.start_server("carol", "leukaemia-incidence")
    assert r.status_code in (201, 202), r.text
    return "leukaemia-incidence"


@pytest.fixture(scope="session")
def hub(sandbox_env: Path) -> Iterator[HubInstance]:
    """One running hub for the session, with users alice, bob, carol and mallory."""
    root = Path(tempfile.mkdtemp(prefix="trehub-", dir="/tmp"))
    instance = HubInstance(make_state(root), extra_config=TEST_AUTH)
    instance.start()
    for name in ("alice", "bob", "carol", "mallory"):
        instance.create_user(name)
    try:
        yield instance
    finally:
        stop_everything(instance)
        shutil.rmtree(root, ignore_errors=True)


def stop_everything(instance: HubInstance) -> None:
    """Stop every server the hub knows, then the hub."""
    try:
        users = instance.api("GET", "/users").json()
        for u in users:
            for name in u.get("servers", {}):
                instance.stop_server(u["name"], name)
    except Exception:  # noqa: BLE001 - best effort at teardown; the hub may be down
        pass
    instance.stop()

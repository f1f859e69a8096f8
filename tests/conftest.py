"""Shared test fixtures.

Tests that need a real component (bubblewrap, Chromium, PostgreSQL, the proxy) use
``require_component``: outside CI a missing component skips the test; in CI (``CI=true``)
it fails it, because CI must run everything.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
POSTGRES_URL = os.environ.get(
    "TRE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    """In CI a skipped test is a failed one: CI must run everything (a skip that slips in,
    e.g. a backend-specific case, would otherwise pass silently)."""
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI ({report.longrepr}): CI must run every test"


def require_component(available: bool, what: str) -> None:
    if available:
        return
    if IN_CI:
        pytest.fail(f"{what} is required in CI but is not available")
    pytest.skip(f"{what} not available")


def postgres_available() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture
def require_bwrap() -> str:
    path = shutil.which("bwrap")
    require_component(path is not None, "bubblewrap (bwrap)")
    return path  # type: ignore[return-value]


@pytest.fixture
def require_chromium() -> str:
    path = shutil.which("chromium") or "/usr/bin/chromium"
    require_component(Path(path).exists(), "Chromium (/usr/bin/chromium)")
    return path


@pytest.fixture
def require_postgres() -> str:
    require_component(postgres_available(), "PostgreSQL on 127.0.0.1:5432")
    return POSTGRES_URL


@pytest.fixture
def require_proxy() -> str:
    path = REPO_ROOT / "node_modules" / ".bin" / "configurable-http-proxy"
    require_component(path.exists(), "configurable-http-proxy (npm ci)")
    return str(path)


@pytest.fixture
def policies_dir() -> Path:
    return REPO_ROOT / "policies"

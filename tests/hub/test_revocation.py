"""Revocation on a real TRE hub: when access ends in the declarations, it ends in practice,
promptly and everywhere.

A hub of its own (generated config, real proxy, bubblewrap sandboxes, the hub-managed airlock
and enforcer `tre project enforce --loop`), whose declarations are then edited by hand as an
admin's editor or a pull of the policies repository would: no `tre project apply`, no hub
restart. The enforcer's periodic pass is set to an hour, so whatever happens within
``BOUND`` seconds is the enforcer's change watch (``enforce_poll_seconds``, 5 s) or the
request-time checks (spawn gate, airlock), never a coincidental periodic pass.

Each story first shows the access is there (the attack has a target), then takes it away in
the declarations and attacks again with what the person still holds: a browser session, API
tokens, a running sandbox and its kernel, the sandbox's own token at the airlock socket.
"""

from __future__ import annotations

# ruff: noqa: E501 - the kernel code in strings reads better unwrapped
import json
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import AIRLOCK_CLIENT, PASSWORDS, make_state, stop_everything
from tornado.httpclient import HTTPClientError

from tre.hub.auth import ADMINS_GROUP, CHECKERS_GROUP, PasswordFile
from tre.hub.config import password_file
from tre.hub.harness import HubInstance, Kernel, loopback_client, loopback_request
from tre.project_edit import remove_member, set_status

pytestmark = [pytest.mark.hub, pytest.mark.sandbox]

BOUND = 30.0  # seconds: enforce_poll_seconds (5) + one pass (stopping a sandbox) + slack
ADMIN_PASSWORD = "admin-correct-horse-battery"
NEW_REQUEST = """
r = airlock.post("/requests", json={"project": os.environ["TRE_PROJECT"], "title": "t", "context": "c", "controls": "c", "files": [], "submit": False})
print(json.dumps({"status": r.status_code}))
"""
READ_EXTRACT = """
import duckdb, os
print(duckdb.connect(os.environ["TRE_EXTRACT"], read_only=True).execute("SELECT count(*) FROM patient").fetchone()[0])
"""


def eventually(check: Callable[[], bool], bound: float = BOUND) -> float:
    """Seconds until ``check()`` held; AssertionError if it did not within ``bound``."""
    start = time.monotonic()
    while time.monotonic() - start < bound:
        if check():
            return time.monotonic() - start
        time.sleep(0.5)
    raise AssertionError(f"not within {bound:.0f} s")


class Browser:
    """Someone logged in through the hub's login form (cookies, as a browser keeps them)."""

    def __init__(self, hub: HubInstance, username: str, password: str) -> None:
        self.client = loopback_client(base_url=hub.public_url, follow_redirects=True, timeout=60)
        page = self.client.get("/hub/login")
        xsrf = re.search(r'name="_xsrf"[^>]*value="([^"]+)"', page.text)
        data = {"username": username, "password": password}
        if xsrf:
            data["_xsrf"] = xsrf.group(1)
        r = self.client.post("/hub/login?next=/hub/home", data=data)
        assert r.status_code == 200 and "/hub/home" in str(r.url), r.text[:500]
        # an API token of their own, as the token page gives it
        r = self.api("POST", f"/users/{username}/tokens", json={"note": "own"})
        assert r.status_code == 201, r.text
        self.token = r.json()["token"]

    def api(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        """The hub API as the hub's own pages call it: session cookie + XSRF header."""
        xsrf = self.client.cookies.get("_xsrf", path="/hub/")
        headers = {"X-XSRFToken": xsrf} if xsrf else {}
        return self.client.request(method, f"/hub/api{path}", headers=headers, **kwargs)


@pytest.fixture(scope="module")
def hub(sandbox_env: Path) -> Iterator[HubInstance]:
    root = Path(tempfile.mkdtemp(prefix="trerevoke-", dir="/tmp"))
    settings = make_state(root)
    settings.enforce_interval_seconds = 3600  # only the change watch can act within BOUND
    PasswordFile(password_file(settings)).set_password("admin", ADMIN_PASSWORD)
    instance = HubInstance(settings)
    instance.start()
    for name in ("alice", "bob", "carol", "checker1", "admin"):
        instance.create_user(name)
    try:
        yield instance
    finally:
        stop_everything(instance)
        shutil.rmtree(root, ignore_errors=True)


def groups_of(hub: HubInstance, user: str) -> list[str]:
    return hub.api("GET", f"/users/{user}").json()["groups"]


def running(hub: HubInstance, user: str, server: str) -> bool:
    model = hub.api("GET", f"/users/{user}/servers/{server}")
    return model.status_code == 200 and bool(
        model.json().get("ready") or model.json().get("pending")
    )


def run_json(kernel: Kernel, code: str) -> dict:
    out = kernel.run(code, timeout=120)
    assert out["error"] is None, out
    return json.loads(out["stdout"].strip().splitlines()[-1])


def test_an_admin_removed_from_staff_loses_the_admin_role_on_every_token_and_session(hub):
    """The tre-admin role (list users, read servers, stop them) comes from the hub group
    tre-admins. JupyterHub refreshes a user's groups only on a request, at most every
    auth_refresh_age (300 s), and for someone the registry no longer knows at all it never
    refreshes a token-authenticated request ("stale auth info. Cannot refresh on API
    requests"): before the enforcer removed leavers from the group, the ex-admin's API token
    listed every user for as long as it lived (measured on this hub with auth_refresh_age = 3 s:
    still 200 after four times that age, each request logged "Cannot refresh"), and a session
    or the token of an ex-admin still registered otherwise kept the role up to 300 s."""
    admin = Browser(hub, "admin", ADMIN_PASSWORD)
    assert ADMINS_GROUP in groups_of(hub, "admin")
    assert hub.api("GET", "/users", token=admin.token).status_code == 200
    assert hub.api("GET", "/users/alice", token=admin.token).status_code == 200
    assert admin.api("GET", "/users").status_code == 200
    audit = f"{hub.airlock_url}api/audit"
    auth = {"Authorization": f"token {admin.token}"}
    assert loopback_request("GET", audit, headers=auth).status_code == 200

    staff = hub.settings.policies_dir / "staff.yaml"
    staff.write_text(yaml.safe_dump({"output_checkers": ["checker1", "checker2"], "admins": []}))

    assert loopback_request("GET", audit, headers=auth).status_code == 403  # the airlock: at once
    took = eventually(lambda: hub.api("GET", "/users", token=admin.token).status_code == 403)
    print(f"ex-admin's API token lost the admin role after {took:.1f} s")
    assert ADMINS_GROUP not in groups_of(hub, "admin")
    # the other admin powers, with the token and with the browser session
    assert hub.api("GET", "/users/alice", token=admin.token).status_code in (403, 404)
    assert admin.api("GET", "/users").status_code == 403
    page = admin.client.get("/hub/admin")
    assert page.status_code == 403 or "/hub/login" in str(page.url), (page.status_code, page.url)


def test_an_output_checker_removed_from_staff_can_no_longer_check(hub):
    """The airlock caches a token's validation by the hub (per worker) but takes roles from
    the registry on every request: a checker removed from staff.yaml is refused at once,
    with the token they hold. Their hub group goes too (the enforcer)."""
    checker = Browser(hub, "checker1", PASSWORDS["checker1"])
    assert CHECKERS_GROUP in groups_of(hub, "checker1")
    queue = f"{hub.airlock_url}api/queue"
    auth = {"Authorization": f"token {checker.token}"}
    assert loopback_request("GET", queue, headers=auth).status_code == 200  # validation cached

    staff = hub.settings.policies_dir / "staff.yaml"
    current = yaml.safe_load(staff.read_text())
    staff.write_text(yaml.safe_dump({**current, "output_checkers": ["checker2"]}))

    assert loopback_request("GET", queue, headers=auth).status_code == 403  # at once
    took = eventually(lambda: CHECKERS_GROUP not in groups_of(hub, "checker1"))
    print(f"ex-checker left {CHECKERS_GROUP} after {took:.1f} s")


def test_a_member_removed_from_a_project_loses_the_running_sandbox_and_everything_else(hub):
    """bob, member of wilms-outcomes only, has its sandbox running and a kernel reading the
    extract, a browser session and an API token. He is removed from the declaration.

    At once: the airlock refuses a request from his sandbox's own token (the registry says he
    is no member), and the hub refuses to start his server again. Within BOUND: the sandbox is
    stopped (before, it ran until an admin ran `tre project apply`, or forever if none did),
    so neither his kernel nor his token reaches it, and his project group is gone. What is
    left of a user removed from everything: a stopped server record and tokens that carry
    only his own scopes, which start nothing and see nothing at the airlock."""
    bob = Browser(hub, "bob", PASSWORDS["bob"])
    assert "project-wilms-outcomes" in groups_of(hub, "bob")
    r = hub.start_server("bob", "wilms-outcomes")
    assert r.status_code in (201, 202), r.text
    kernel = Kernel(hub, "bob", "wilms-outcomes", bob.token)
    out = kernel.run(READ_EXTRACT)
    assert out["stdout"].strip() == "200", out
    server = hub.server_url("bob", "wilms-outcomes")
    auth = {"Authorization": f"token {bob.token}"}
    assert loopback_request("GET", f"{server}/api/contents/", headers=auth).status_code == 200

    remove_member(hub.settings.policies_dir, "wilms-outcomes", "bob")

    assert run_json(kernel, AIRLOCK_CLIENT + NEW_REQUEST)["status"] == 403  # at once
    took = eventually(lambda: not running(hub, "bob", "wilms-outcomes"))
    print(f"removed member's sandbox stopped after {took:.1f} s")
    with pytest.raises((HTTPClientError, RuntimeError, TimeoutError, OSError)):
        kernel.run(READ_EXTRACT, timeout=20)
    gone = loopback_request("GET", f"{server}/api/contents/", headers=auth, follow_redirects=False)
    assert gone.status_code != 200
    restart = hub.api("POST", "/users/bob/servers/wilms-outcomes", token=bob.token)
    assert restart.status_code == 403 and "not a member" in restart.json()["message"]
    assert not running(hub, "bob", "wilms-outcomes")
    # nothing left that grants anything
    assert groups_of(hub, "bob") == []
    assert not (hub.settings.hub.runtime_dir / "sandboxes" / "bob.wilms-outcomes").exists()
    mine = loopback_request("GET", f"{hub.airlock_url}api/requests", headers=auth)
    assert mine.status_code in (200, 403) and (mine.status_code == 403 or mine.json() == [])
    # alice, still a member, keeps the project and its data
    assert "project-wilms-outcomes" not in groups_of(hub, "bob")
    assert (hub.settings.extracts_dir / "wilms-outcomes.duckdb").exists()


def test_a_suspended_project_loses_its_sandboxes_and_its_extract(hub):
    """carol's leukaemia-incidence sandbox runs with a kernel on the extract; the project is
    suspended in its declaration. At once: no new start, no airlock request from the sandbox.
    Within BOUND: the sandbox is stopped and the extract removed (before: at the next periodic
    pass, 300 s by default, here an hour)."""
    carol = Browser(hub, "carol", PASSWORDS["carol"])
    r = hub.start_server("carol", "leukaemia-incidence")
    assert r.status_code in (201, 202), r.text
    kernel = Kernel(hub, "carol", "leukaemia-incidence", carol.token)
    out = kernel.run(READ_EXTRACT)
    assert out["stdout"].strip() == "200", out
    extract = hub.settings.extracts_dir / "leukaemia-incidence.duckdb"

    set_status(hub.settings.policies_dir, "leukaemia-incidence", "suspended")

    assert run_json(kernel, AIRLOCK_CLIENT + NEW_REQUEST)["status"] == 403  # at once
    took = eventually(
        lambda: not running(hub, "carol", "leukaemia-incidence") and not extract.exists()
    )
    print(f"suspended project's sandbox stopped and extract removed after {took:.1f} s")
    restart = hub.api("POST", "/users/carol/servers/leukaemia-incidence", token=carol.token)
    assert restart.status_code == 403 and "suspended" in restart.json()["message"]
    server = hub.server_url("carol", "leukaemia-incidence")
    gone = loopback_request(
        "GET",
        f"{server}/api/contents/",
        headers={"Authorization": f"token {carol.token}"},
        follow_redirects=False,
    )
    assert gone.status_code != 200
    assert "project-leukaemia-incidence" not in groups_of(hub, "carol")

"""Which servers a user may start: only active projects they are a member of, with an extract.

Driven through the real hub REST API (POST /hub/api/users/<u>/servers/<project>) and the real
home page (logged in through the hub's login form)."""

from __future__ import annotations

import re

import httpx
import pytest
from conftest import PASSWORDS

from tre.hub.harness import loopback_client

pytestmark = [pytest.mark.hub, pytest.mark.sandbox]


@pytest.mark.parametrize(
    ("user", "project", "status", "message"),
    [
        ("mallory", "wilms-outcomes", 403, "not a member"),
        ("alice", "leukaemia-incidence", 403, "not a member"),
        ("alice", "no-such-project", 403, "not a member"),
        ("alice", "paused-study", 403, "suspended"),
        ("alice", "ended-study", 403, "expired"),
        ("alice", "no-extract", 409, "no data extract"),
        ("alice", "", 400, "named after a project"),
    ],
)
def test_refused_spawns_answer_4xx_with_a_message_and_leave_nothing(
    hub, user, project, status, message
):
    before = hub.api("GET", f"/users/{user}").json()["servers"]
    r = hub.api("POST", f"/users/{user}/servers/{project}")
    assert r.status_code == status, r.text
    assert message in r.json()["message"]
    after = hub.api("GET", f"/users/{user}").json()["servers"]
    # no server record was created and nothing runs
    assert set(after) - {""} == set(before) - {""}
    refused = after.get(project, {})
    assert not refused.get("ready") and not refused.get("pending")
    sockets = hub.settings.hub.runtime_dir / "sandboxes" / f"{user}.{project}"
    assert not sockets.exists()


def test_suspending_a_project_takes_effect_without_restarting_the_hub(hub):
    """The registry is read at each spawn: a project suspended now cannot start now.

    The project is no-extract (active, so its refusal was 409 "no data extract"): the hub's
    enforcer acts within seconds of a declaration change, and suspending a project whose
    sandboxes and extract other tests of the session use could stop or remove them."""
    path = hub.settings.policies_dir / "projects" / "no-extract.yaml"
    original = path.read_text()
    assert hub.api("POST", "/users/alice/servers/no-extract").status_code == 409
    try:
        path.write_text(original + "status: suspended\n")
        r = hub.api("POST", "/users/alice/servers/no-extract")
        assert r.status_code == 403 and "suspended" in r.json()["message"]
    finally:
        path.write_text(original)


def login(hub, username: str) -> httpx.Client:
    client = loopback_client(base_url=hub.public_url, follow_redirects=True, timeout=30)
    page = client.get("/hub/login")
    xsrf = re.search(r'name="_xsrf"[^>]*value="([^"]+)"', page.text)
    data = {"username": username, "password": PASSWORDS[username]}
    if xsrf:
        data["_xsrf"] = xsrf.group(1)
    r = client.post("/hub/login?next=/hub/home", data=data)
    assert r.status_code == 200, r.text[:500]
    assert client.cookies.get("jupyterhub-session-id") or "jupyterhub-hub-login" in client.cookies
    return client


def test_a_user_whose_only_project_ended_cannot_log_in(hub):
    client = loopback_client(base_url=hub.public_url, timeout=30)
    page = client.get("/hub/login")
    xsrf = re.search(r'name="_xsrf"[^>]*value="([^"]+)"', page.text)
    r = client.post(
        "/hub/login",
        data={"username": "mallory", "password": PASSWORDS["mallory"], "_xsrf": xsrf.group(1)},
    )
    assert r.status_code == 403


def test_wrong_password_is_refused(hub):
    client = loopback_client(base_url=hub.public_url, timeout=30)
    page = client.get("/hub/login")
    xsrf = re.search(r'name="_xsrf"[^>]*value="([^"]+)"', page.text)
    r = client.post(
        "/hub/login", data={"username": "alice", "password": "wrong", "_xsrf": xsrf.group(1)}
    )
    assert r.status_code == 403
    assert "jupyterhub-hub-login" not in client.cookies


def test_home_page_lists_only_the_users_active_projects(hub):
    html = login(hub, "alice").get("/hub/home").text
    listed = set(re.findall(r'data-project="([^"]+)"', html))
    assert listed == {"wilms-outcomes", "second-study", "no-extract"}
    assert "no data extract yet" in html  # no-extract cannot be started from the page
    html = login(hub, "carol").get("/hub/home").text
    assert set(re.findall(r'data-project="([^"]+)"', html)) == {"leukaemia-incidence"}
    # an output checker is registered but member of no project
    html = login(hub, "checker1").get("/hub/home").text
    assert not re.findall(r'data-project="([^"]+)"', html)
    assert "not a member of any active project" in html


def test_the_spawn_page_refuses_a_project_of_someone_else(hub):
    r = login(hub, "carol").get("/hub/spawn/carol/wilms-outcomes")
    assert r.status_code == 403
    assert "not a member" in r.text

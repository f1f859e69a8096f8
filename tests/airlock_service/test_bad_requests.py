"""Bad requests get clear 4xx answers and change nothing (real hub tokens, real proxy)."""

from __future__ import annotations

import re

import httpx
import pytest

from airlock.service.core import FileSpec
from tests.hubfixture import HUB_PASSWORD
from tre.audit import export_events

pytestmark = [pytest.mark.hub]


def snapshot_state(service):
    with service.factory() as s:
        return service.count_requests(), len(list(export_events(s)))


@pytest.mark.parametrize(
    "path",
    [
        "../leukaemia-incidence/notes.txt",
        "/etc/passwd",
        "outputs/../../../etc/passwd",
        "outputs",
        "nope.csv",
        "a\\b.csv",
        "link.csv",
        "linkdir/secret.csv",
    ],
)
def test_bad_paths(client, tre_settings, tmp_path, path):
    ws = tre_settings.workspaces_dir / "wilms-outcomes"
    (tmp_path / "secret.csv").write_text("id\n1\n")
    (ws / "link.csv").symlink_to(tmp_path / "secret.csv")
    (ws / "linkdir").symlink_to(tmp_path)
    before = snapshot_state(client.service)
    r = client.call(
        "alice",
        "POST",
        "api/requests",
        json={"project": "wilms-outcomes", "files": [{"path": path}]},
    )
    assert r.status_code == 400, r.text
    assert r.json()["detail"]
    assert snapshot_state(client.service) == before


def test_unknown_ids(client):
    rid = client.service.create_request(
        client.service.who("alice"), "wilms-outcomes", [FileSpec("notes.txt")]
    )
    for path in [
        "api/requests/" + "0" * 32,
        "api/requests/short",
        f"api/requests/{rid}/files/999999/download",
        "api/requests/..%2F..%2Fetc%2Fpasswd",
    ]:
        assert client.call("alice", "GET", path).status_code == 404, path
    r = client.call("alice", "POST", f"api/requests/{rid}/files/999999/withdraw")
    assert r.status_code == 404
    r = client.call("alice", "POST", f"api/requests/{rid}/files/notanint/withdraw")
    assert r.status_code == 422


def test_malformed_and_oversized_bodies(client):
    before = snapshot_state(client.service)
    url = "api/requests"
    headers = {"Content-Type": "application/json"}
    bad = [
        b"{not json",
        b'{"project": 5}',
        b'{"project": "wilms-outcomes", "files": "x"}',
        b'{"project": "wilms-outcomes", "unexpected": 1}',
        b"[]",
        b'{"project": "wilms-outcomes", "files": [{"path": ""}]}',
    ]
    for body in bad:
        r = client.call("alice", "POST", url, content=body, headers=dict(headers))
        assert r.status_code == 422, (body, r.status_code, r.text)
    big = b'{"project": "wilms-outcomes", "context": "' + b"x" * (2 * 1024 * 1024) + b'"}'
    r = client.call("alice", "POST", url, content=big, headers=dict(headers))
    assert r.status_code == 413

    # a body streamed without Content-Length is cut off too
    def chunks():
        yield b'{"project": "wilms-outcomes", "context": "'
        for _ in range(40):
            yield b"y" * 65536
        yield b'"}'

    # (straight to the airlock's uvicorn: node's http-proxy may reset a refused chunked upload)
    r = httpx.post(
        client.live.direct + url,
        content=chunks(),
        headers={**headers, "Authorization": f"token {client.live.tokens['alice']}"},
        timeout=30,
    )
    assert r.status_code == 413
    r = client.call(
        "checker1",
        "POST",
        "api/requests/" + "0" * 32 + "/files/1/votes",
        json={"decision": "maybe"},
    )
    assert r.status_code == 422
    assert snapshot_state(client.service) == before


def test_vote_rules_over_http(client):
    service = client.service
    alice = service.who("alice")
    rid = service.create_request(alice, "wilms-outcomes", [FileSpec("outputs/table.csv")])
    service.submit(alice, rid)
    fid = service.view(alice, rid)["files"][0]["id"]
    path = f"api/requests/{rid}/files/{fid}/votes"
    r = client.call("checker1", "POST", path, json={"decision": "reject"})
    assert r.status_code == 400 and "comment" in r.json()["detail"]
    assert client.call("checker1", "POST", path, json={"decision": "approve"}).status_code == 201
    r = client.call("checker1", "POST", path, json={"decision": "approve"})
    assert r.status_code == 409


def login(live, user: str) -> httpx.Client:
    """Log ``user`` in to the airlock pages through the hub's login form and OAuth."""
    http = httpx.Client(base_url=live.hub.url, follow_redirects=True, timeout=30)
    r = http.get(live.prefix + "requests")
    assert "/hub/login" in str(r.url), r.url
    xsrf = re.search(r'name="_xsrf" value="([^"]+)"', r.text).group(1)
    r = http.post(str(r.url), data={"username": user, "password": HUB_PASSWORD, "_xsrf": xsrf})
    assert r.status_code == 200 and str(r.url).endswith(live.prefix + "requests"), (
        r.url,
        r.text[:300],
    )
    return http


def test_csrf_on_forms(client):
    service = client.service
    alice = service.who("alice")
    rid = service.create_request(alice, "wilms-outcomes", [FileSpec("notes.txt")])
    http = login(client.live, "alice")
    page = http.get(f"{client.live.prefix}requests/{rid}")
    assert page.status_code == 200
    assert "default-src 'self'" in page.headers["content-security-policy"]
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    url = f"{client.live.prefix}requests/{rid}/submit"
    for data in ({}, {"csrf_token": "forged"}):
        r = http.post(url, data=data, follow_redirects=False)
        assert r.status_code == 403, r.text
        assert service.view(alice, rid)["state"] == "pending"
    r = http.post(url, data={"csrf_token": token}, follow_redirects=False)
    assert r.status_code == 303
    assert service.view(alice, rid)["state"] == "submitted"
    # the session cookie never authenticates the API (so the API needs no CSRF token)
    assert http.get(f"{client.live.prefix}api/me").status_code == 401
    http.close()


def test_a_session_cookie_sent_twice_is_refused_and_the_parent_domain_copies_expired(client):
    """Cookie tossing (http): a page on a sibling host can set ``airlock-session`` for the
    parent domain; the browser then sends the name twice. Neither copy counts (the POST fails
    its CSRF check even with the right token, nothing changes) and the answer expires the name
    for each parent domain on each path that could have sent it. Chromium attack:
    tests/hub/test_origin_separation.py."""
    service = client.service
    alice = service.who("alice")
    rid = service.create_request(alice, "wilms-outcomes", [FileSpec("notes.txt")])
    http = login(client.live, "alice")
    page = http.get(f"{client.live.prefix}requests/{rid}")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    mine = next(c.value for c in http.cookies.jar if c.name == "airlock-session")
    url = f"{client.live.hub.url}{client.live.prefix}requests/{rid}/submit"
    host = {"Host": "airlock--service.tre.example.org"}
    for cookies in (
        f"airlock-session={mine}; airlock-session={mine}",
        f"a=1; airlock-session={mine};airlock-session=x",
    ):
        r = httpx.post(url, data={"csrf_token": token}, headers={**host, "Cookie": cookies})
        assert r.status_code == 403, r.text
        assert service.view(alice, rid)["state"] == "pending"
        expired = {
            (a["domain"], a["path"])
            for a in (
                dict(p.strip().split("=", 1) for p in c.lower().split(";")[1:] if "=" in p)
                for c in r.headers.get_list("set-cookie")
                if c.startswith("airlock-session=;")
            )
        }
        paths = {"/", "/services", "/services/", f"{client.live.prefix}requests/{rid}/submit"}
        for domain in ("tre.example.org", "example.org"):
            assert {(domain, p) for p in paths} <= expired, expired
        assert all(d in ("tre.example.org", "example.org") for d, _ in expired), expired
    # the cookie once, the same token: accepted
    r = httpx.post(
        url, data={"csrf_token": token}, headers={**host, "Cookie": f"airlock-session={mine}"}
    )
    assert r.status_code == 303, r.text
    assert service.view(alice, rid)["state"] == "submitted"
    http.close()


def test_pages_refuse_anonymous_and_sandbox(client):
    r = client.http.get("requests", follow_redirects=False)
    assert r.status_code == 303 and "login" in r.headers["location"]

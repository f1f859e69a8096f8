"""Every API endpoint x every role, with REAL hub-issued tokens through the real proxy.

Roles: anonymous, other (carol: member of another project only), author (alice), member (bob:
same project, not the author), checker (checker1), admin, sandbox (the token the hub gave
alice's `wilms-outcomes` server) and sandbox_other (alice's `leukaemia-incidence` server: alice
is a member of both projects, so only the token's server scope keeps it out).
Each role acts on a fresh request in the state the endpoint needs, so one role's success
cannot change another's answer.
"""

from __future__ import annotations

import pytest

from airlock.service.core import FileSpec

pytestmark = [pytest.mark.hub]

ROLES = {
    "anonymous": None,
    "other": "carol",
    "author": "alice",
    "member": "bob",
    "checker": "checker1",
    "admin": "admin",
    "sandbox": "sandbox:alice/wilms-outcomes",
    "sandbox_other": "sandbox:alice/leukaemia-incidence",
}
P = "wilms-outcomes"


def make_request(service, state: str) -> tuple[str, int]:
    """A request by alice on wilms-outcomes in ``state``; returns (request id, file id)."""
    alice = service.who("alice")
    rid = service.create_request(alice, P, [FileSpec("outputs/table.csv", "t")], title="t")
    fid = service.view(alice, rid)["files"][0]["id"]
    if state == "pending":
        return rid, fid
    service.submit(alice, rid)
    if state == "submitted":
        return rid, fid
    if state == "voted":  # checker1 (the checker role) has cast the file's first vote
        service.vote(service.who("checker1"), rid, fid, "approve")
        return rid, fid
    c1, c2 = service.who("checker2"), service.who("checker3")
    if state == "reviewed":
        service.vote(c1, rid, fid, "request_changes", comment="round")
        service.vote(c2, rid, fid, "approve")
        return rid, fid
    if state == "released":
        service.vote(c1, rid, fid, "approve")
        assert service.vote(c2, rid, fid, "approve") == "released"
        return rid, fid
    raise AssertionError(state)


# endpoint -> (method, path template, body, state, {role: expected status})
A, O, AU, M, C, AD, S, SO = ROLES  # noqa: E741 (short names keep the table readable)
MATRIX = {
    "health": ("GET", "api/health", None, None, dict.fromkeys(ROLES, 200)),
    "me": ("GET", "api/me", None, None, {**dict.fromkeys(ROLES, 200), A: 401}),
    "list": ("GET", "api/requests", None, None, {**dict.fromkeys(ROLES, 200), A: 401}),
    "create": (
        "POST",
        "api/requests",
        {"project": P, "files": [{"path": "notes.txt"}]},
        None,
        {A: 401, O: 403, AU: 201, M: 201, C: 403, AD: 403, S: 201, SO: 403},
    ),
    "get": (
        "GET",
        "api/requests/{rid}",
        None,
        "submitted",
        {A: 401, O: 404, AU: 200, M: 200, C: 200, AD: 200, S: 200, SO: 404},
    ),
    "edit": (
        "PATCH",
        "api/requests/{rid}",
        {"context": "new context"},
        "pending",
        {A: 401, O: 404, AU: 200, M: 403, C: 404, AD: 403, S: 200, SO: 404},
    ),
    "add_file": (
        "POST",
        "api/requests/{rid}/files",
        {"path": "notes.txt", "group": "g"},
        "pending",
        {A: 401, O: 404, AU: 201, M: 403, C: 404, AD: 403, S: 201, SO: 404},
    ),
    "withdraw_file": (
        "POST",
        "api/requests/{rid}/files/{fid}/withdraw",
        None,
        "pending",
        {A: 401, O: 404, AU: 200, M: 403, C: 404, AD: 403, S: 200, SO: 404},
    ),
    "submit": (
        "POST",
        "api/requests/{rid}/submit",
        None,
        "pending",
        {A: 401, O: 404, AU: 200, M: 403, C: 404, AD: 403, S: 200, SO: 404},
    ),
    "withdraw": (
        "POST",
        "api/requests/{rid}/withdraw",
        None,
        "submitted",
        {A: 401, O: 404, AU: 200, M: 403, C: 403, AD: 403, S: 200, SO: 404},
    ),
    "vote": (
        "POST",
        "api/requests/{rid}/files/{fid}/votes",
        {"decision": "approve"},
        "submitted",
        {A: 401, O: 404, AU: 403, M: 403, C: 201, AD: 403, S: 403, SO: 404},
    ),
    "change_vote": (
        "PUT",
        "api/requests/{rid}/files/{fid}/votes/mine",
        {"decision": "reject", "comment": "on reflection"},
        "voted",
        {A: 401, O: 404, AU: 403, M: 403, C: 200, AD: 403, S: 403, SO: 404},
    ),
    "comment": (
        "POST",
        "api/requests/{rid}/comments",
        {"body": "a comment"},
        "submitted",
        {A: 401, O: 404, AU: 201, M: 403, C: 201, AD: 201, S: 201, SO: 404},
    ),
    "decision": (
        "POST",
        "api/requests/{rid}/decision",
        {"action": "return", "comment": "please round"},
        "reviewed",
        {A: 401, O: 404, AU: 403, M: 403, C: 200, AD: 403, S: 403, SO: 404},
    ),
    "release": (
        "POST",
        "api/requests/{rid}/release",
        None,
        "released",
        {A: 401, O: 404, AU: 403, M: 403, C: 200, AD: 200, S: 403, SO: 404},
    ),
    "download": (
        "GET",
        "api/requests/{rid}/files/{fid}/download",
        None,
        "released",
        {A: 401, O: 404, AU: 200, M: 200, C: 403, AD: 403, S: 403, SO: 404},
    ),
    "queue": (
        "GET",
        "api/queue",
        None,
        None,
        {A: 401, O: 403, AU: 403, M: 403, C: 200, AD: 403, S: 403, SO: 403},
    ),
    "audit": (
        "GET",
        "api/audit",
        None,
        None,
        {A: 401, O: 403, AU: 403, M: 403, C: 403, AD: 200, S: 403, SO: 403},
    ),
    "audit_verify": (
        "GET",
        "api/audit/verify",
        None,
        None,
        {A: 401, O: 403, AU: 403, M: 403, C: 403, AD: 200, S: 403, SO: 403},
    ),
}


def test_matrix_covers_every_api_route(client):
    spec = client.call(None, "GET", "openapi.json").json()
    routes = {
        (method.upper(), path)
        for path, ops in spec["paths"].items()
        for method, op in ops.items()
        if not {"admin", "public"} & set(op.get("tags", []))  # tests/.../test_admin_api.py
    }
    covered = {
        (m, client.live.prefix + p.replace("{rid}", "{request_id}").replace("{fid}", "{file_id}"))
        for m, p, *_ in MATRIX.values()
    }
    assert routes == covered


@pytest.mark.parametrize("endpoint", sorted(MATRIX))
def test_authorisation_matrix(client, endpoint):
    method, template, body, state, expected = MATRIX[endpoint]
    assert set(expected) == set(ROLES)
    answers = {}
    for role, who in ROLES.items():
        rid, fid = make_request(client.service, state) if state else ("", 0)
        path = template.format(rid=rid, fid=fid)
        r = client.call(who, method, path, json=body)
        answers[role] = r.status_code
    assert answers == expected


def test_sandbox_sees_only_its_own_requests(client):
    service = client.service
    mine = make_request(service, "submitted")[0]
    bob = service.who("bob")
    bobs = service.create_request(bob, P, [FileSpec("notes.txt")])
    listed = {
        r["id"] for r in client.call("sandbox:alice/wilms-outcomes", "GET", "api/requests").json()
    }
    assert mine in listed and bobs not in listed
    assert (
        client.call("sandbox:alice/wilms-outcomes", "GET", f"api/requests/{bobs}").status_code
        == 404
    )
    me = client.call("sandbox:alice/wilms-outcomes", "GET", "api/me").json()
    assert me["sandbox_project"] == "wilms-outcomes"
    # the same user's own (non-sandbox) token is not restricted
    assert client.call("alice", "GET", "api/me").json()["sandbox_project"] is None


def test_unknown_and_forged_tokens_are_refused(client):
    r = client.http.get("api/me", headers={"Authorization": "token not-a-real-token"})
    assert r.status_code == 401
    r = client.http.get("api/me", headers={"Authorization": "Basic YWxpY2U6cHc="})
    assert r.status_code == 401
    # a token without access to the airlock service (hub scopes) is refused
    hub = client.live.hub
    limited = hub.user_token("alice", scopes=["read:users:name!user"])
    client.live.tokens["limited"] = limited
    assert client.call("limited", "GET", "api/me").status_code == 403
    # a hub service token is not a person
    client.live.tokens["service"] = hub.admin_token
    assert client.call("service", "GET", "api/me").status_code == 401

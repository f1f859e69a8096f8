"""A checker changes their own vote while the file waits for its second review (SQLite and
PostgreSQL): the vote rules still apply, the change is audited, independence holds, and the
change is refused once the file has both reviews or the request has left review."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from airlock.permissions import PermissionDenied
from airlock.service.core import BadInput, Conflict, FileSpec, NotFound
from airlock.service.models import RequestFile, Vote
from airlock.workflow import TransitionError
from tre.audit import AuditEvent, verify_chain


def submitted(service, paths=("outputs/table.csv",)):
    alice = service.who("alice")
    rid = service.create_request(alice, "wilms-outcomes", [FileSpec(p, "t") for p in paths])
    service.submit(alice, rid)
    return rid, [f["id"] for f in service.view(alice, rid)["files"]]


def votes_of(service, fid):
    with service.factory() as s:
        return {
            v.reviewer: (v.decision, v.comment, v.justification)
            for v in s.execute(select(Vote).where(Vote.file_id == fid)).scalars()
        }


def events(service, action):
    with service.factory() as s:
        rows = s.execute(select(AuditEvent).where(AuditEvent.action == action)).scalars()
        return [(e.actor, e.target, json.loads(e.details)) for e in rows]


def test_change_before_second_vote_is_audited_then_counts(service):
    rid, [fid] = submitted(service)
    c1, c2 = service.who("checker1"), service.who("checker2")
    service.vote(c1, rid, fid, "request_changes", comment="round cell a")
    assert service.view(c1, rid)["files"][0]["can_change_vote"] is True
    state = service.change_vote(c1, rid, fid, "approve", comment="rounded after all")
    assert state == "partially_reviewed"
    assert votes_of(service, fid) == {"checker1": ("approve", "rounded after all", "")}
    assert events(service, "vote_change") == [
        (
            "checker1",
            f"file:{fid}",
            {"request": rid, "round": 1, "from": "request_changes", "to": "approve"},
        )
    ]
    # the changed vote is the one that counts: a second approve releases
    assert service.vote(c2, rid, fid, "approve") == "released"
    with service.factory() as s:
        assert verify_chain(s) == []


def test_vote_rules_apply_to_a_change(service):
    rid, [fid] = submitted(service)
    c1 = service.who("checker1")
    service.vote(c1, rid, fid, "approve")
    with pytest.raises(BadInput, match="comment is required"):
        service.change_vote(c1, rid, fid, "reject")
    with pytest.raises(BadInput, match="decision must be"):
        service.change_vote(c1, rid, fid, "maybe", comment="x")
    with pytest.raises(BadInput, match="already your vote"):
        service.change_vote(c1, rid, fid, "approve")
    service.change_vote(c1, rid, fid, "reject", comment="identifiable")
    with service.factory() as s, s.begin():
        s.get(RequestFile, fid).check_status = "fail"
    with pytest.raises(BadInput, match="justification"):
        service.change_vote(c1, rid, fid, "approve")
    # nothing changed by the refused attempts
    assert votes_of(service, fid) == {"checker1": ("reject", "identifiable", "")}
    service.change_vote(c1, rid, fid, "approve", justification="structural zero")
    assert votes_of(service, fid)["checker1"] == ("approve", "", "structural zero")
    assert [d["to"] for _a, _t, d in events(service, "vote_change")] == ["reject", "approve"]


def test_refused_once_the_file_has_both_reviews(service):
    rid, [fid, other] = submitted(service, ("outputs/table.csv", "notes.txt"))
    c1, c2 = service.who("checker1"), service.who("checker2")
    service.vote(c1, rid, fid, "request_changes", comment="round")
    service.vote(c2, rid, fid, "approve")
    # the request is still in review (the other file waits), but this file is fully reviewed
    assert service.view(c1, rid)["state"] == "partially_reviewed"
    assert service.view(c1, rid)["files"][0]["can_change_vote"] is False
    for checker in (c1, c2):
        with pytest.raises(Conflict, match="two independent reviews"):
            service.change_vote(checker, rid, fid, "approve")
    assert votes_of(service, fid)["checker1"][0] == "request_changes"
    assert events(service, "vote_change") == []


def test_refused_once_the_request_left_review(service):
    rid, [fid] = submitted(service)
    c1, c2 = service.who("checker1"), service.who("checker2")
    service.vote(c1, rid, fid, "request_changes", comment="round")
    service.vote(c2, rid, fid, "approve")
    assert service.view(c1, rid)["state"] == "reviewed"
    with pytest.raises(TransitionError, match="no longer in review"):
        service.change_vote(c1, rid, fid, "approve")
    # withdrawn while one vote is in: no change either
    rid2, [fid2] = submitted(service)
    service.vote(c1, rid2, fid2, "approve")
    service.withdraw(service.who("alice"), rid2)
    with pytest.raises(TransitionError, match="no longer in review"):
        service.change_vote(c1, rid2, fid2, "reject", comment="too late")


def test_only_my_own_vote_and_only_eligible_checkers(service):
    rid, [fid] = submitted(service)
    c1, c2 = service.who("checker1"), service.who("checker2")
    service.vote(c1, rid, fid, "approve")
    # a checker who has not voted cannot change (and so cannot overwrite) the other's vote
    with pytest.raises(Conflict, match="not voted"):
        service.change_vote(c2, rid, fid, "reject", comment="overwrite")
    for name, sandbox in (
        ("alice", None),
        ("bob", None),
        ("admin", None),
        ("alice", "wilms-outcomes"),
    ):
        with pytest.raises((PermissionDenied, NotFound)):
            service.change_vote(service.who(name, sandbox), rid, fid, "reject", comment="x")
    assert votes_of(service, fid) == {"checker1": ("approve", "", "")}


def test_a_change_stays_hidden_from_the_other_checker_and_the_author(service):
    rid, [fid] = submitted(service)
    c1, c2 = service.who("checker1"), service.who("checker2")
    service.vote(c1, rid, fid, "request_changes", comment="round")
    service.change_vote(c1, rid, fid, "reject", comment="identifiable")
    for who in (c2, service.who("alice")):
        view = service.view(who, rid)
        assert view["files"][0]["votes"] == []
        assert not {"vote", "vote_change"} & {h["action"] for h in view["history"]}
        assert view["files"][0]["can_change_vote"] is False
    # once both voted, the other checker sees the current vote and the audited change
    service.vote(c2, rid, fid, "approve")
    view = service.view(c2, rid)
    assert {v["reviewer"]: v["decision"] for v in view["files"][0]["votes"]} == {
        "checker1": "reject",
        "checker2": "approve",
    }
    changes = [h for h in view["history"] if h["action"] == "vote_change"]
    assert [(h["details"]["from"], h["details"]["to"]) for h in changes] == [
        ("request_changes", "reject")
    ]


def test_votes_of_an_earlier_round_cannot_change(service):
    rid, [fid] = submitted(service)
    c1, c2 = service.who("checker1"), service.who("checker2")
    service.vote(c1, rid, fid, "request_changes", comment="round")
    service.vote(c2, rid, fid, "approve")
    service.decide(c1, rid, "return", "please round")
    service.submit(service.who("alice"), rid)  # round 2: no vote of mine in this round
    with pytest.raises(Conflict, match="not voted"):
        service.change_vote(c1, rid, fid, "approve")
    assert votes_of(service, fid)["checker1"][0] == "request_changes"


# --- over HTTP: the API and the page form (real hub tokens and login, real proxy) -----------


@pytest.mark.hub
def test_change_vote_over_http(client):
    service = client.service
    rid, [fid] = submitted(service)
    path = f"api/requests/{rid}/files/{fid}/votes/mine"
    r = client.call("checker1", "PUT", path, json={"decision": "approve"})
    assert r.status_code == 409 and "not voted" in r.json()["detail"]
    client.call(
        "checker1", "POST", f"api/requests/{rid}/files/{fid}/votes", json={"decision": "approve"}
    )
    r = client.call("checker1", "PUT", path, json={"decision": "reject"})
    assert r.status_code == 400 and "comment" in r.json()["detail"]
    r = client.call("checker1", "PUT", path, json={"decision": "reject", "comment": "too small"})
    assert r.status_code == 200 and r.json() == {"state": "partially_reviewed"}
    client.call(
        "checker2",
        "POST",
        f"api/requests/{rid}/files/{fid}/votes",
        json={"decision": "approve"},
    )
    r = client.call("checker1", "PUT", path, json={"decision": "approve"})
    assert r.status_code == 409 and "no longer in review" in r.json()["detail"]
    assert votes_of(service, fid)["checker1"] == ("reject", "too small", "")


@pytest.mark.hub
def test_change_vote_form_on_the_request_page(client):
    import re

    from tests.airlock_service.test_bad_requests import login

    service = client.service
    rid, [fid] = submitted(service)
    service.vote(service.who("checker1"), rid, fid, "request_changes", comment="round it")
    prefix = client.live.prefix
    other = login(client.live, "checker2")  # has not voted: a vote form, no change form
    page = other.get(f"{prefix}requests/{rid}").text
    assert "vote-form" in page and "change-vote-form" not in page and "round it" not in page
    other.close()
    http = login(client.live, "checker1")
    page = http.get(f"{prefix}requests/{rid}").text
    form = re.search(r'<form[^>]*class="change-vote-form".*?</form>', page, re.S).group(0)
    assert 'value="request_changes" required checked' in form and "round it" in form
    token = re.search(r'name="csrf_token" value="([^"]+)"', form).group(1)
    url = f"{prefix}requests/{rid}/files/{fid}/vote/change"
    r = http.post(url, data={"decision": "approve"}, follow_redirects=False)
    assert r.status_code == 403  # no CSRF token
    r = http.post(url, data={"csrf_token": token, "decision": "approve"}, follow_redirects=False)
    assert r.status_code == 303
    assert votes_of(service, fid)["checker1"] == ("approve", "", "")
    history = http.get(f"{prefix}requests/{rid}").text
    assert "vote_change: request_changes → approve" in history
    # after the second vote the form is gone and a forged post is refused
    service.vote(service.who("checker2"), rid, fid, "approve")
    page = http.get(f"{prefix}requests/{rid}").text
    assert "change-vote-form" not in page
    r = http.post(
        url,
        data={"csrf_token": token, "decision": "reject", "comment": "x"},
        follow_redirects=False,
    )
    assert r.status_code == 409
    http.close()

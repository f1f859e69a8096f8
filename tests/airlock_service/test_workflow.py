"""The request workflow through the service layer, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest

from airlock.permissions import PermissionDenied
from airlock.service.core import BadInput, Conflict, FileSpec, NotFound
from airlock.storage import sha256_file
from airlock.workflow import TransitionError
from tre.audit import verify_chain


def submit_one(service, path="outputs/table.csv", who="alice"):
    author = service.who(who)
    rid = service.create_request(
        author, "wilms-outcomes", [FileSpec(path, "tables")], context="ctx", controls="rounded"
    )
    service.submit(author, rid)
    return rid


def only_file(service, rid, who="checker1"):
    return service.view(service.who(who), rid)["files"][0]["id"]


def test_two_approvals_release_the_exact_snapshot(service, tre_settings):
    ws = tre_settings.workspaces_dir / "wilms-outcomes"
    original = (ws / "outputs" / "table.csv").read_bytes()
    rid = submit_one(service)
    # editing the workspace after submission changes nothing under review
    (ws / "outputs" / "table.csv").write_text("group,count\na,1\n")
    fid = only_file(service, rid)
    assert service.vote(service.who("checker1"), rid, fid, "approve") == "partially_reviewed"
    assert service.vote(service.who("checker2"), rid, fid, "approve") == "released"
    path, name = service.download(service.who("bob"), rid, fid)
    assert name == "table.csv"
    assert path.read_bytes() == original
    view = service.view(service.who("alice"), rid)
    assert view["files"][0]["sha256"] == sha256_file(path)
    actions = [h["action"] for h in view["history"]]
    assert actions.count("state_change") == 5  # submit, first_vote, complete, approve, release
    with service.factory() as s:
        assert verify_chain(s) == []


def test_no_self_review_and_members_cannot_check(service):
    # checker3 is a member of leukaemia-incidence; carol is its author
    carol = service.who("carol")
    rid = service.create_request(carol, "leukaemia-incidence", [FileSpec("notes.txt")])
    service.submit(carol, rid)
    fid = service.view(carol, rid)["files"][0]["id"]
    with pytest.raises(PermissionDenied, match="members of the project"):
        service.vote(service.who("checker3"), rid, fid, "approve")
    with pytest.raises((PermissionDenied, NotFound)):
        service.vote(carol, rid, fid, "approve")


def test_checker_cannot_vote_twice_nor_third_checker(service):
    rid = submit_one(service)
    fid = only_file(service, rid)
    service.vote(service.who("checker1"), rid, fid, "request_changes", comment="round it")
    with pytest.raises(Conflict):
        service.vote(service.who("checker1"), rid, fid, "approve")
    service.vote(service.who("checker2"), rid, fid, "approve")
    assert service.view(service.who("alice"), rid)["state"] == "reviewed"
    with pytest.raises(TransitionError):
        service.vote(service.who("checker3"), rid, fid, "approve")


def test_comment_required_and_fail_needs_justification(service, monkeypatch):
    rid = submit_one(service)
    fid = only_file(service, rid)
    with pytest.raises(BadInput, match="comment is required"):
        service.vote(service.who("checker1"), rid, fid, "reject")
    # force the file's automated status to fail to exercise the justification rule
    from airlock.service.models import RequestFile

    with service.factory() as s, s.begin():
        s.get(RequestFile, fid).check_status = "fail"
    with pytest.raises(BadInput, match="justification"):
        service.vote(service.who("checker1"), rid, fid, "approve")
    assert (
        service.vote(service.who("checker1"), rid, fid, "approve", justification="structural zero")
        == "partially_reviewed"
    )


def test_independent_reviews_hidden_until_both_voted(service):
    rid = submit_one(service)
    fid = only_file(service, rid)
    c1, c2 = service.who("checker1"), service.who("checker2")
    service.vote(c1, rid, fid, "request_changes", comment="cell a is small")
    service.comment(c1, rid, "private note of checker1", "private")
    seen_by_c2 = service.view(c2, rid)
    assert seen_by_c2["files"][0]["votes"] == []
    assert all(c["author"] != "checker1" for c in seen_by_c2["comments"])
    seen_by_author = service.view(service.who("alice"), rid)
    assert seen_by_author["files"][0]["votes"] == []
    service.vote(c2, rid, fid, "approve")
    seen_by_c2 = service.view(c2, rid)
    assert {v["reviewer"] for v in seen_by_c2["files"][0]["votes"]} == {"checker1", "checker2"}
    assert any(c["body"] == "private note of checker1" for c in seen_by_c2["comments"])
    # authors never see private comments
    assert all(
        c["visibility"] == "public" for c in service.view(service.who("alice"), rid)["comments"]
    )


def test_return_replace_resubmit_then_release_new_snapshot(service, tre_settings):
    rid = submit_one(service)
    fid = only_file(service, rid)
    c1, c2, alice = service.who("checker1"), service.who("checker2"), service.who("alice")
    service.vote(c1, rid, fid, "request_changes", comment="suppress small cells")
    service.vote(c2, rid, fid, "approve")
    with pytest.raises(PermissionDenied):
        service.decide(alice, rid, "return", "please")
    assert service.decide(c1, rid, "return", "see comments") == "returned"
    # the author sees the votes now
    assert len(service.view(alice, rid)["files"][0]["votes"]) == 2
    ws = tre_settings.workspaces_dir / "wilms-outcomes" / "outputs"
    (ws / "table.csv").write_text("group,count\na,<10\nb,30\n")
    new_fid = service.add_file(alice, rid, FileSpec("outputs/table.csv", "tables"))
    assert service.submit(alice, rid) == "submitted"
    view = service.view(c1, rid)
    assert view["round"] == 2
    assert [f["active"] for f in view["files"]] == [False, True]
    # old votes stay in the history but do not count
    service.vote(c1, rid, new_fid, "approve")
    assert service.vote(c2, rid, new_fid, "approve") == "released"
    path, _ = service.download(alice, rid, new_fid)
    assert path.read_text() == "group,count\na,<10\nb,30\n"
    with pytest.raises(NotFound):
        service.download(alice, rid, fid)  # the replaced file is never released


def test_withdrawn_and_rejected_are_never_released(service):
    alice = service.who("alice")
    rid = submit_one(service)
    assert service.withdraw(alice, rid) == "withdrawn"
    with pytest.raises(TransitionError):
        service.vote(service.who("checker1"), rid, only_file(service, rid), "approve")
    rid2 = submit_one(service)
    fid = only_file(service, rid2)
    service.vote(service.who("checker1"), rid2, fid, "reject", comment="identifiable")
    service.vote(service.who("checker2"), rid2, fid, "approve")
    assert service.decide(service.who("checker2"), rid2, "reject", "no") == "rejected"
    for r in (rid, rid2):
        with pytest.raises((Conflict, PermissionDenied)):
            service.download(alice, r, only_file(service, r))
    assert not any(service.released_root.glob("*/manifest.json"))


@pytest.mark.parametrize(
    "path",
    [
        "../leukaemia-incidence/notes.txt",
        "/etc/passwd",
        "outputs/../../x",
        "missing.csv",
        "",
        "outputs",
    ],
)
def test_bad_paths_change_nothing(service, path):
    from airlock.storage import StorageError

    with pytest.raises(StorageError):
        service.create_request(service.who("alice"), "wilms-outcomes", [FileSpec(path)])
    assert service.count_requests() == 0


def test_symlink_out_of_workspace_refused(service, tre_settings, tmp_path):
    from airlock.storage import StorageError

    secret = tmp_path / "secret.csv"
    secret.write_text("id\n1\n")
    ws = tre_settings.workspaces_dir / "wilms-outcomes"
    (ws / "link.csv").symlink_to(secret)
    (ws / "linkdir").symlink_to(tmp_path)
    for p in ("link.csv", "linkdir/secret.csv"):
        with pytest.raises(StorageError, match="symbolic link"):
            service.create_request(service.who("alice"), "wilms-outcomes", [FileSpec(p)])
    assert service.count_requests() == 0


def test_non_members_cannot_create_or_see(service):
    with pytest.raises(PermissionDenied):
        service.create_request(service.who("carol"), "wilms-outcomes", [FileSpec("notes.txt")])
    rid = submit_one(service)
    with pytest.raises(NotFound):
        service.view(service.who("carol"), rid)
    with pytest.raises(NotFound):
        service.view(service.who("dave"), "0" * 32)


def test_researchers_see_status_and_latest_public_comment(service):
    rid = submit_one(service)
    fid = only_file(service, rid)
    c1, c2 = service.who("checker1"), service.who("checker2")
    service.comment(c1, rid, "checker-only remark", "private")
    service.vote(c1, rid, fid, "request_changes", comment="round to 5")
    service.vote(c2, rid, fid, "approve")
    service.decide(c2, rid, "return", "please round the counts")
    for who in ("alice", "bob"):
        (row,) = [r for r in service.list_requests(service.who(who)) if r["id"] == rid]
        assert row["state"] == "returned"
        assert row["latest_comment"] == {"author": "checker2", "body": "please round the counts"}


def test_a_checker_who_was_a_member_of_an_ended_project_is_not_its_checker():
    """Membership is what makes a checker ineligible, also once the project has ended (its
    requests are frozen, but they must not appear in that checker's queue as work to do)."""
    from types import SimpleNamespace

    from airlock import permissions as perm

    req = SimpleNamespace(id="r", project="p", author="alice", state="submitted")
    former = perm.Who("carl", is_checker=True, ended_projects=frozenset({"p"}))
    current = perm.Who("carl", is_checker=True, projects=frozenset({"p"}))
    outsider = perm.Who("carl", is_checker=True)
    assert not perm.is_eligible_checker(former, req)
    assert not perm.is_eligible_checker(current, req)
    assert perm.is_eligible_checker(outsider, req)


def test_the_row_read_of_a_request_equals_the_orm_read_at_every_step(service, tre_settings):
    """`view` reads rows, not ORM objects (`AirlockService._read`, for CPU): at every step of
    a story with votes, private and public comments, a return, a replaced file and a release,
    and for every kind of viewer, it must answer exactly what the ORM-loaded request gives
    (`_load` + `_view`), and refuse exactly whom `_load` refuses."""
    viewers = ["alice", "bob", "carol", "checker1", "checker2", "checker3", "admin"]

    def same(rid: str) -> None:
        for name in viewers:
            who = service.who(name)
            try:
                with service.factory() as session:
                    expected = service._view(session, who, service._load(session, who, rid, False))
            except NotFound:
                with pytest.raises(NotFound):
                    service.view(who, rid)
                continue
            assert service.view(who, rid) == expected, name

    alice, c1, c2 = service.who("alice"), service.who("checker1"), service.who("checker2")
    rid = service.create_request(
        alice, "wilms-outcomes", [FileSpec("outputs/table.csv", "tables")], title="t"
    )
    same(rid)  # pending: the author's draft
    service.submit(alice, rid)
    fid = only_file(service, rid)
    service.vote(c1, rid, fid, "request_changes", comment="cell a is small")
    service.comment(c1, rid, "private note", "private")
    service.comment(c1, rid, "public note", "public")
    same(rid)
    service.vote(c2, rid, fid, "approve")
    service.decide(c1, rid, "return", "see comments")
    same(rid)
    ws = tre_settings.workspaces_dir / "wilms-outcomes" / "outputs"
    (ws / "table.csv").write_text("group,count\na,<10\nb,30\n")
    new_fid = service.add_file(alice, rid, FileSpec("outputs/table.csv", "tables"))
    service.submit(alice, rid)
    service.vote(c1, rid, new_fid, "approve")
    same(rid)
    service.vote(c2, rid, new_fid, "approve")
    same(rid)  # released
    with pytest.raises(NotFound):
        service.view(alice, "0" * 32)
    with pytest.raises(NotFound):
        service.view(alice, "short")

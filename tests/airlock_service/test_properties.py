"""Property-based tests: random sequences of actions by random users (and sandbox tokens).

Whatever happens: nothing is released without two approvals by distinct checkers who are
neither the author nor project members, released bytes equal the reviewed snapshot, withdrawn,
replaced, returned or rejected files never appear in the released store, and the audit chain
verifies."""

from __future__ import annotations

import hashlib

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import select

from airlock.permissions import PermissionDenied
from airlock.release import ReleaseError, released_dir
from airlock.service.core import BadInput, Conflict, FileSpec, NotFound
from airlock.service.models import ReleaseRequest
from airlock.storage import StorageError, sha256_file
from airlock.workflow import TransitionError
from tre.audit import verify_chain

from .conftest import USERS

EXPECTED = (PermissionDenied, NotFound, Conflict, TransitionError, BadInput, StorageError)
PATHS = ["outputs/table.csv", "outputs/small.csv", "notes.txt"]
PROJECTS = ["wilms-outcomes", "leukaemia-incidence"]
# members are over-represented so that requests get created, submitted and reviewed
IDENTITIES = (
    [(u, None) for u in USERS]
    + [("alice", None), ("bob", None), ("carol", None)]
    + [
        ("alice", "wilms-outcomes"),
        ("alice", "leukaemia-incidence"),
        ("bob", "wilms-outcomes"),
    ]
)

# mostly checkers, but also the author, a member-checker, an admin and a sandbox token
REVIEWERS = [
    ("checker1", None),
    ("checker2", None),
    ("checker3", None),
    ("alice", None),
    ("admin", None),
    ("bob", "wilms-outcomes"),
]


def reset(service, workspaces):
    import shutil

    from sqlalchemy import text

    from .conftest import write_workspace_files

    with service.factory() as s, s.begin():
        for table in (
            "airlock_release",
            "airlock_comment",
            "airlock_vote",
            "airlock_file",
            "airlock_request",
            "audit_event",
        ):
            s.execute(text(f"DELETE FROM {table}"))
        s.execute(text("UPDATE audit_head SET seq = 0, hash = :h"), {"h": "0" * 64})
    shutil.rmtree(service.released_root, ignore_errors=True)
    write_workspace_files(workspaces)


SEEN_RELEASED: set[str] = set()
SEEN_CHANGED: list[str] = []  # requests on which a vote change succeeded


def make_machine(service, workspaces):
    class AirlockMachine(RuleBasedStateMachine):
        requests = Bundle("requests")

        @initialize()
        def setup(self):
            # every example starts from an empty airlock, so draws depend only on the example
            reset(service, workspaces)
            self.snap_sha: dict[int, str] = {}  # file id -> sha of the bytes at snapshot time
            self.rids: list[str] = []

        def who(self, ident):
            return service.who(ident[0], ident[1])

        @rule(
            ident=st.sampled_from(IDENTITIES),
            project=st.sampled_from(PROJECTS),
            paths=st.lists(st.sampled_from(PATHS), min_size=1, max_size=2, unique=True),
            submit=st.booleans(),
        )
        def create(self, ident, project, paths, submit):
            try:
                before = {p: sha256_file(workspaces / project / p) for p in paths}
                rid = service.create_request(self.who(ident), project, [FileSpec(p) for p in paths])
            except EXPECTED:
                return
            self.rids.append(rid)
            if submit:
                service.submit(self.who(ident), rid)
            for f in service.view(self.who(ident), rid)["files"]:
                assert f["sha256"] == before[f["path"]]
                self.snap_sha[f["id"]] = before[f["path"]]

        @rule(
            project=st.sampled_from(PROJECTS),
            path=st.sampled_from(PATHS),
            content=st.binary(min_size=1, max_size=64),
        )
        def edit_workspace(self, project, path, content):
            (workspaces / project / path).write_bytes(content)

        def some_request(self, data):
            if not self.rids:
                return None
            return data.draw(st.sampled_from(self.rids))

        def some_file(self, data, rid):
            with service.factory() as s:
                req = s.get(ReleaseRequest, rid)
                ids = sorted(f.id for f in req.files)
            return data.draw(st.sampled_from(ids)) if ids else 0

        @precondition(lambda self: self.rids)
        @rule(data=st.data(), ident=st.sampled_from(IDENTITIES), path=st.sampled_from(PATHS))
        def add_file(self, data, ident, path):
            rid = self.some_request(data)
            if rid is None:
                return
            with service.factory() as s:
                project = s.get(ReleaseRequest, rid).project
            before = sha256_file(workspaces / project / path)
            try:
                fid = service.add_file(self.who(ident), rid, FileSpec(path))
            except EXPECTED:
                return
            self.snap_sha[fid] = before

        @precondition(lambda self: self.rids)
        @rule(data=st.data(), ident=st.sampled_from(IDENTITIES))
        def withdraw_file(self, data, ident):
            rid = self.some_request(data)
            if rid is not None:
                try:
                    service.withdraw_file(self.who(ident), rid, self.some_file(data, rid))
                except EXPECTED:
                    pass

        @precondition(lambda self: self.rids)
        @rule(
            data=st.data(),
            ident=st.sampled_from(IDENTITIES),
            action=st.sampled_from(["submit", "withdraw"]),
        )
        def author_action(self, data, ident, action):
            rid = self.some_request(data)
            if rid is not None:
                try:
                    getattr(service, action)(self.who(ident), rid)
                except EXPECTED:
                    pass

        @precondition(lambda self: self.rids)
        @rule(
            data=st.data(),
            ident=st.sampled_from(IDENTITIES),
            decision=st.sampled_from(["approve", "approve", "reject", "request_changes"]),
            comment=st.sampled_from(["", "needs rounding"]),
            justification=st.sampled_from(["", "structural zero"]),
        )
        def vote(self, data, ident, decision, comment, justification):
            rid = self.some_request(data)
            if rid is None:
                return
            try:
                service.vote(
                    self.who(ident),
                    rid,
                    self.some_file(data, rid),
                    decision,
                    comment,
                    justification,
                )
            except EXPECTED:
                pass

        @precondition(lambda self: self.rids)
        @rule(
            data=st.data(),
            ident=st.sampled_from(REVIEWERS),
            decision=st.sampled_from(["approve", "approve", "reject", "request_changes"]),
            comment=st.sampled_from(["", "on reflection"]),
            justification=st.sampled_from(["", "structural zero"]),
        )
        def change_vote(self, data, ident, decision, comment, justification):
            """Anyone (eligible or not) tries to change a vote, in any state of the request."""
            rid = self.some_request(data)
            if rid is None:
                return
            fid = self.some_file(data, rid)
            if data.draw(st.booleans()):  # often a first vote by the same identity to change
                try:
                    service.vote(self.who(ident), rid, fid, "request_changes", "first thought")
                except EXPECTED:
                    pass
            with service.factory() as s:
                before = {
                    (v.reviewer, v.decision)
                    for v in s.get(ReleaseRequest, rid).votes
                    if v.file_id == fid
                }
            try:
                service.change_vote(self.who(ident), rid, fid, decision, comment, justification)
            except EXPECTED:
                with service.factory() as s:
                    after = {
                        (v.reviewer, v.decision)
                        for v in s.get(ReleaseRequest, rid).votes
                        if v.file_id == fid
                    }
                assert after == before  # a refused change changes nothing
                return
            with service.factory() as s:
                req = s.get(ReleaseRequest, rid)
                current = [v for v in req.votes if v.file_id == fid and v.round == req.round]
            # only my own vote, only while the file waited for its second review
            assert [(v.reviewer, v.decision) for v in current] == [(ident[0], decision)]
            assert ident[1] is None and ident[0] != req.author
            SEEN_CHANGED.append(rid)

        @invariant()
        def every_vote_meets_the_vote_rules(self):
            """First votes and changed votes alike: a comment unless approve, a justification
            to approve a file that failed a check, at most two distinct voters per file."""
            with service.factory() as s:
                for req in s.execute(select(ReleaseRequest)).scalars():
                    status = {f.id: f.check_status for f in req.files}
                    voters: dict[tuple[int, int], list[str]] = {}
                    for v in req.votes:
                        voters.setdefault((v.file_id, v.round), []).append(v.reviewer)
                        assert v.decision == "approve" or v.comment
                        if v.decision == "approve" and status[v.file_id] == "fail":
                            assert v.justification
                    for names in voters.values():
                        assert len(names) == len(set(names)) <= 2

        @precondition(lambda self: self.rids)
        @rule(data=st.data())
        def its_author_submits(self, data):
            rid = self.some_request(data)
            if rid is None:
                return
            with service.factory() as s:
                author = s.get(ReleaseRequest, rid).author
            try:
                service.submit(service.who(author), rid)
            except EXPECTED:
                pass

        @precondition(lambda self: self.rids)
        @rule(
            data=st.data(),
            voters=st.lists(st.sampled_from(REVIEWERS), min_size=2, max_size=3),
            decision=st.sampled_from(["approve", "approve", "approve", "request_changes"]),
        )
        def vote_on_every_file(self, data, voters, decision):
            """Drive requests forward: several identities (eligible or not) vote on every file."""
            rid = self.some_request(data)
            if rid is None:
                return
            with service.factory() as s:
                fids = sorted(f.id for f in s.get(ReleaseRequest, rid).active_files())
            for ident in voters:
                for fid in fids:
                    try:
                        service.vote(self.who(ident), rid, fid, decision, "c", "j")
                    except EXPECTED:
                        pass

        @precondition(lambda self: self.rids)
        @rule(
            data=st.data(),
            ident=st.sampled_from(IDENTITIES),
            action=st.sampled_from(["return", "reject"]),
        )
        def decide(self, data, ident, action):
            rid = self.some_request(data)
            if rid is not None:
                try:
                    service.decide(self.who(ident), rid, action, "see comments")
                except EXPECTED:
                    pass

        @precondition(lambda self: self.rids)
        @rule(data=st.data(), ident=st.sampled_from(IDENTITIES))
        def release(self, data, ident):
            rid = self.some_request(data)
            if rid is not None:
                try:
                    service.release(self.who(ident), rid)
                except (*EXPECTED, ReleaseError):
                    pass

        @invariant()
        def nothing_leaves_without_two_independent_approvals(self):
            registry = service.registry
            checkers = set(registry.staff.output_checkers)
            with service.factory() as s:
                for req in s.execute(select(ReleaseRequest)).scalars():
                    final = released_dir(service.released_root, req.id)
                    if req.state == "released":
                        SEEN_RELEASED.add(req.id)
                    if req.state != "released":
                        assert not final.exists(), f"{req.id} is {req.state} but has released files"
                        continue
                    members = registry.projects[req.project].member_names()
                    released = {
                        int(p.parent.name): p
                        for p in final.rglob("*")
                        if p.is_file() and p.name != "manifest.json"
                    }
                    active = {f.id: f for f in req.active_files()}
                    assert set(released) == set(active)  # withdrawn/replaced never leave
                    for fid, f in active.items():
                        approvers = {
                            v.reviewer
                            for v in req.votes
                            if v.file_id == fid and v.round == req.round and v.decision == "approve"
                        }
                        independent = approvers & checkers - members - {req.author}
                        assert len(independent) >= 2, (req.id, fid, approvers)
                        data = released[fid].read_bytes()
                        assert hashlib.sha256(data).hexdigest() == f.sha256 == self.snap_sha[fid]

        def teardown(self):
            with service.factory() as s:
                assert verify_chain(s) == []

    return AirlockMachine


def test_random_action_sequences_keep_the_invariants(service, tre_settings):
    SEEN_RELEASED.clear()
    SEEN_CHANGED.clear()
    machine = make_machine(service, tre_settings.workspaces_dir)
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=15,
            stateful_step_count=40,
            deadline=None,
            derandomize=True,  # reproducible, so the check below is stable
            suppress_health_check=list(HealthCheck),
        ),
    )
    # the invariant was exercised on real releases, not only vacuously
    assert len(SEEN_RELEASED) >= 2
    assert SEEN_CHANGED  # and a vote change succeeded somewhere

"""The airlock's use cases, shared by the JSON API, the HTML pages, the CLI and the tests.

Every mutating method runs in one transaction that first locks the request's row, checks the
caller's permission and the transition against ``airlock.workflow``, changes the rows and writes
the audit events; a failure anywhere rolls all of it back (bad input changes nothing).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import shutil
import uuid
from collections.abc import Callable
from concurrent.futures import Executor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy import Engine, and_, case, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, lazyload, selectinload, sessionmaker

from airlock import permissions as perm
from airlock.policy import Policy, load_policy
from airlock.release import ReleaseError, release_request, released_dir
from airlock.service.checking import run_checks
from airlock.service.db import session_factory
from airlock.service.models import Comment, Release, ReleaseRequest, RequestFile, Vote
from airlock.storage import FileSystemStore, StorageError, check_workdir, open_workspace_file
from airlock.workflow import (
    Action,
    State,
    TransitionError,
    next_state,
)
from tre.audit import AuditEvent, record_event
from tre.registry import Registry
from tre.settings import Settings

log = logging.getLogger("airlock")

DECISIONS = ("approve", "reject", "request_changes")
GROUP_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 _-.")


class ProjectInactive(TransitionError):
    """The request's project has ended or is suspended: nothing about it may change."""


class NotFound(LookupError):
    """Unknown id, or one the caller may not see (both answer 404, so ids leak nothing)."""


class Conflict(ValueError):
    """The request is valid but clashes with the current state (e.g. a second vote)."""


class BadInput(ValueError):
    """The request is malformed in a way the schema cannot express."""


class Gone(LookupError):
    """The bytes existed but were deleted under the retention policy (410)."""


@dataclass(frozen=True)
class FileSpec:
    path: str
    group: str = "default"


@dataclass
class Snapshot:
    spec: FileSpec
    path: str
    sha256: str
    size: int
    output_class: str
    status: str
    findings: list[dict[str, Any]]


def _check_group(group: str) -> str:
    group = group.strip()
    if not group or len(group) > 64 or not set(group) <= GROUP_CHARS:
        raise BadInput("a group name is 1-64 letters, digits, spaces, '_', '-' or '.'")
    return group


def _text(value: str, what: str, limit: int = 20000) -> str:
    if len(value) > limit:
        raise BadInput(f"{what} is longer than {limit} characters")
    return value


class AirlockService:
    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        registry: Registry | Callable[[], Registry],
        release_hook: Callable[[str, str], None] | None = None,
        check_pool: Executor | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.factory: sessionmaker[Session] = session_factory(engine)
        self._registry = registry
        assert settings.airlock_store_dir is not None and settings.workspaces_dir is not None
        self.store = FileSystemStore(settings.airlock_store_dir / "snapshots")
        self.released_root = settings.airlock_store_dir / "released"
        # working copies of the files being checked, one held directory per check
        self.checking_dir = settings.airlock_store_dir / "checking"
        self.release_hook = release_hook
        # the disclosure checks run here if set (processes at lower priority, see runner.py)
        self.check_pool = check_pool
        self._policies: dict[tuple[str, object], Policy] = {}

    # --- helpers ------------------------------------------------------------------------

    @property
    def registry(self) -> Registry:
        return self._registry() if callable(self._registry) else self._registry

    def who(self, name: str, sandbox_project: str | None = None) -> perm.Who:
        return perm.who_from_registry(self.registry, name, sandbox_project)

    def policy_for(self, project: str) -> Policy:
        proj = self.registry.projects.get(project)
        overrides = dict(proj.disclosure) if proj else {}
        path = self.settings.policies_dir / "disclosure.yaml"
        # parsing the YAML took about half of a snapshot's CPU: reuse the parsed policy until
        # the file (mtime, size) or the project's overrides change
        stat = path.stat()
        key = (
            project,
            (stat.st_mtime_ns, stat.st_size, json.dumps(overrides, sort_keys=True, default=str)),
        )
        policy = self._policies.get(key)
        if policy is None:
            policy = load_policy(path, overrides)
            self._policies = {k: v for k, v in self._policies.items() if k[0] != project}
            self._policies[key] = policy
        return policy

    def eligible_checkers(self, project: str) -> set[str]:
        proj = self.registry.projects.get(project)
        members = proj.member_names() if proj else set()
        return set(self.registry.staff.output_checkers) - members

    def _load(
        self,
        session: Session,
        who: perm.Who,
        request_id: str,
        lock: bool,
        comments: bool = True,
    ) -> ReleaseRequest:
        """The request with its files and votes (and comments unless ``comments`` is False:
        they are then loaded only if touched), checked visible to ``who``."""
        if not isinstance(request_id, str) or len(request_id) != 32:
            raise NotFound("no such request")
        options = _EAGER if comments else (*_EAGER[:2], lazyload(ReleaseRequest.comments))
        stmt = select(ReleaseRequest).where(ReleaseRequest.id == request_id).options(*options)
        if lock:
            stmt = stmt.with_for_update()
        req = session.execute(stmt).scalar_one_or_none()
        if req is None or not perm.can_view_request(who, req):
            raise NotFound("no such request")
        if lock:  # every change to a request goes through here
            self.check_project_active(req.project)
        return req

    def check_project_active(self, project_id: str) -> None:
        """Requests of a project that is not active (ended, suspended, closed) are frozen."""
        project = self.registry.projects.get(project_id)
        if project is None or not project.is_active():
            raise ProjectInactive(
                f"project {project_id} is not active: its release requests are frozen"
            )

    def _transition(
        self, session: Session, req: ReleaseRequest, action: Action, actor: str
    ) -> None:
        target = next_state(req.state, action)
        previous = req.state
        req.state = target.value
        req.updated_at = _now()
        record_event(
            session,
            actor,
            "state_change",
            f"request:{req.id}",
            {"from": previous, "to": target.value, "transition": action.value},
        )

    def snapshot(self, project: str, spec: FileSpec) -> Snapshot:
        """Copy a workspace file into the store and check exactly the stored bytes."""
        assert self.settings.workspaces_dir is not None
        policy = self.policy_for(project)
        workspace = self.settings.workspaces_dir / project
        rel, fh = open_workspace_file(workspace, spec.path)
        with fh:
            sha, size = self.store.put_stream(fh, policy.max_file_bytes)
        # run the checks on a private copy named like the original (checks dispatch on it),
        # in a directory removed even if this process is killed (storage.check_workdir)
        with check_workdir(self.checking_dir) as tmp:
            named = tmp / rel.name
            shutil.copyfile(self.store.path(sha), named)
            extract = self.settings.extracts_dir / f"{project}.duckdb"  # type: ignore[operator]
            extract_path = extract if extract.exists() else None
            if self.check_pool is None:
                report = run_checks(named, policy, extract_path)
            else:  # this thread waits; the event loop and the other requests go on
                try:
                    job = self.check_pool.submit(run_checks, named, policy, extract_path)
                    report = job.result()
                except BrokenProcessPool:
                    # a check process died (or could not start): check here rather than fail
                    log.error("the check processes are broken; checking in the request thread")
                    report = run_checks(named, policy, extract_path)
        findings = [f.model_dump(mode="json") for f in report.findings]
        return Snapshot(
            spec, str(rel), sha, size, report.output_class, report.status.value, findings
        )

    def _add_snapshot(
        self, session: Session, req: ReleaseRequest, snap: Snapshot, actor: str
    ) -> RequestFile:
        group = _check_group(snap.spec.group)
        for old in req.active_files():
            if old.path == snap.path and old.group == group:
                old.withdrawn_round = req.round
                old.withdrawn_reason = "replaced"
                record_event(session, actor, "file_replace", f"file:{old.id}", {"request": req.id})
        row = RequestFile(
            request_id=req.id,
            group=group,
            path=snap.path,
            sha256=snap.sha256,
            size=snap.size,
            output_class=snap.output_class,
            check_status=snap.status,
            findings_json=json.dumps(snap.findings),
            added_round=req.round,
        )
        req.files.append(row)
        session.flush()
        record_event(
            session,
            actor,
            "file_add",
            f"file:{row.id}",
            {
                "request": req.id,
                "path": snap.path,
                "group": group,
                "sha256": snap.sha256,
                "check_status": snap.status,
            },
        )
        return row

    # --- author ---------------------------------------------------------------------------

    def create_request(
        self,
        who: perm.Who,
        project: str,
        files: list[FileSpec],
        title: str = "",
        context: str = "",
        controls: str = "",
    ) -> str:
        perm.check_create_request(who, project)
        _text(title, "title", 200)
        _text(context, "context")
        _text(controls, "controls")
        # pinned: the snapshots cannot be garbage-collected before the rows commit
        with self.store.pinned():
            return self._create_request(who, project, files, title, context, controls)

    def _create_request(
        self,
        who: perm.Who,
        project: str,
        files: list[FileSpec],
        title: str,
        context: str,
        controls: str,
    ) -> str:
        # snapshot and check everything first: a bad file refuses the whole request
        snaps = [self.snapshot(project, spec) for spec in files]
        for spec in files:
            _check_group(spec.group)
        with self.factory() as session, session.begin():
            req = ReleaseRequest(
                id=uuid.uuid4().hex,
                project=project,
                author=who.name,
                state=State.PENDING.value,
                round=1,
                title=title,
                context=context,
                controls=controls,
                created_at=_now(),
                updated_at=_now(),
            )
            session.add(req)
            session.flush()
            record_event(
                session,
                who.name,
                "request_create",
                f"request:{req.id}",
                {"project": project, "sandbox": who.in_sandbox},
            )
            for snap in snaps:
                self._add_snapshot(session, req, snap, who.name)
            return req.id

    def add_file(self, who: perm.Who, request_id: str, spec: FileSpec) -> int:
        with self.factory() as session:
            req = self._load(session, who, request_id, lock=False)
            perm.check_edit_request(who, req)
            project = req.project
        with self.store.pinned():  # until the row commits (see create_request)
            snap = self.snapshot(project, spec)
            with self.factory() as session, session.begin():
                req = self._load(session, who, request_id, lock=True)
                perm.check_edit_request(who, req)
                return self._add_snapshot(session, req, snap, who.name).id

    def withdraw_file(self, who: perm.Who, request_id: str, file_id: int) -> None:
        with self.factory() as session, session.begin():
            req = self._load(session, who, request_id, lock=True)
            perm.check_edit_request(who, req)
            f = _find_file(req, file_id)
            if f.withdrawn_round is not None:
                raise Conflict("the file is already withdrawn")
            f.withdrawn_round = req.round
            f.withdrawn_reason = "withdrawn"
            record_event(session, who.name, "file_withdraw", f"file:{f.id}", {"request": req.id})

    def update_context(
        self, who: perm.Who, request_id: str, context: str | None, controls: str | None
    ) -> None:
        with self.factory() as session, session.begin():
            req = self._load(session, who, request_id, lock=True)
            perm.check_edit_request(who, req)
            if context is not None:
                req.context = _text(context, "context")
            if controls is not None:
                req.controls = _text(controls, "controls")
            record_event(session, who.name, "request_edit", f"request:{req.id}", {})

    def submit(self, who: perm.Who, request_id: str) -> str:
        with self.factory() as session, session.begin():
            req = self._load(session, who, request_id, lock=True)
            perm.check_submit(who, req)
            if not req.active_files():
                raise Conflict("add at least one file before submitting")
            if req.state == State.RETURNED:
                req.round += 1
                self._transition(session, req, Action.RESUBMIT, who.name)
            else:
                self._transition(session, req, Action.SUBMIT, who.name)
            return req.state

    def withdraw(self, who: perm.Who, request_id: str) -> str:
        with self.factory() as session, session.begin():
            req = self._load(session, who, request_id, lock=True)
            perm.check_withdraw(who, req)
            self._transition(session, req, Action.WITHDRAW, who.name)
            return req.state

    # --- comments -------------------------------------------------------------------------

    def comment(self, who: perm.Who, request_id: str, body: str, visibility: str) -> int:
        body = _text(body.strip(), "comment", 10000)
        if not body:
            raise BadInput("a comment cannot be empty")
        if visibility not in ("public", "private"):
            raise BadInput("visibility is 'public' or 'private'")
        with self.factory() as session, session.begin():
            req = self._load(session, who, request_id, lock=True)
            perm.check_comment(who, req)
            if visibility == "private" and not perm.can_comment_privately(who, req):
                raise perm.PermissionDenied("only the request's checkers may comment privately")
            c = Comment(
                request_id=req.id,
                author=who.name,
                body=body,
                visibility=visibility,
                round=req.round,
                created_at=_now(),
            )
            session.add(c)
            session.flush()
            record_event(
                session,
                who.name,
                "comment",
                f"request:{req.id}",
                {"comment": c.id, "visibility": visibility},
            )
            return c.id

    # --- reviewing ------------------------------------------------------------------------

    def vote(
        self,
        who: perm.Who,
        request_id: str,
        file_id: int,
        decision: str,
        comment: str = "",
        justification: str = "",
    ) -> str:
        """Cast one vote; returns the request's state afterwards (released if it completed)."""
        decision, comment, justification = _vote_input(decision, comment, justification)
        try:
            with self.factory() as session, session.begin():
                # a vote reads files and votes only (one round trip less)
                req = self._load(session, who, request_id, lock=True, comments=False)
                perm.check_review(who, req)
                if req.state not in _IN_REVIEW:
                    raise TransitionError(f"a {req.state} request is not open for review")
                f = _find_file(req, file_id)
                _check_votable(f, decision, justification)
                round_votes = [v for v in req.votes if v.file_id == f.id and v.round == req.round]
                if any(v.reviewer == who.name for v in round_votes):
                    raise Conflict("you have already voted on this file in this round")
                if len(round_votes) >= 2:
                    raise Conflict("this file already has its two independent reviews")
                v = Vote(
                    request_id=req.id,
                    file_id=f.id,
                    reviewer=who.name,
                    round=req.round,
                    decision=decision,
                    comment=comment,
                    justification=justification,
                    created_at=_now(),
                )
                req.votes.append(v)
                session.flush()
                record_event(
                    session,
                    who.name,
                    "vote",
                    f"file:{f.id}",
                    {"request": req.id, "round": req.round, "decision": decision},
                )
                if req.state == State.SUBMITTED:
                    self._transition(session, req, Action.FIRST_VOTE, who.name)
                if self._round_complete(req):
                    self._transition(session, req, Action.REVIEWS_COMPLETE, who.name)
                    if self._all_approved(req):
                        self._transition(session, req, Action.APPROVE, who.name)
                state, project = req.state, req.project
        except IntegrityError:
            # the unique constraint caught a concurrent duplicate vote
            raise Conflict("you have already voted on this file in this round") from None
        if state == State.APPROVED:
            # after the vote's commit, in a transaction of its own (see airlock/release.py):
            # the copy and its fsyncs hold only this request's row, never the audit head
            state = self._try_release(who.name, request_id, project)
        return state

    def change_vote(
        self,
        who: perm.Who,
        request_id: str,
        file_id: int,
        decision: str,
        comment: str = "",
        justification: str = "",
    ) -> str:
        """Change my vote on a file while it still waits for its second review (same round).

        The same rules as a vote (comment unless approving, justification to approve a failed
        file); refused once the file has both reviews or the request has left review, so a
        checker never changes a vote after seeing the other checker's. Audited as its own event.
        """
        decision, comment, justification = _vote_input(decision, comment, justification)
        with self.factory() as session, session.begin():
            req = self._load(session, who, request_id, lock=True, comments=False)
            perm.check_change_vote(who, req)
            if req.state not in _IN_REVIEW:
                raise TransitionError(
                    f"a {req.state} request is no longer in review: votes can no longer change"
                )
            f = _find_file(req, file_id)
            _check_votable(f, decision, justification)
            round_votes = [v for v in req.votes if v.file_id == f.id and v.round == req.round]
            mine = next((v for v in round_votes if v.reviewer == who.name), None)
            if mine is None:
                raise Conflict("you have not voted on this file in this round: vote instead")
            if len(round_votes) >= 2:
                raise Conflict(
                    "this file already has its two independent reviews: votes can no longer change"
                )
            if (mine.decision, mine.comment, mine.justification) == (
                decision,
                comment,
                justification,
            ):
                raise BadInput("this is already your vote: nothing to change")
            previous = mine.decision
            mine.decision, mine.comment, mine.justification = decision, comment, justification
            mine.created_at = _now()
            req.updated_at = _now()
            record_event(
                session,
                who.name,
                "vote_change",
                f"file:{f.id}",
                {"request": req.id, "round": req.round, "from": previous, "to": decision},
            )
            return req.state

    def _round_complete(self, req: ReleaseRequest) -> bool:
        for f in req.active_files():
            voters = {v.reviewer for v in req.votes if v.file_id == f.id and v.round == req.round}
            if len(voters) < 2:
                return False
        return bool(req.active_files())

    def _all_approved(self, req: ReleaseRequest) -> bool:
        return all(
            v.decision == "approve"
            for v in req.votes
            if v.round == req.round and v.file_id in {f.id for f in req.active_files()}
        )

    def decide(self, who: perm.Who, request_id: str, action: str, comment: str) -> str:
        """A checker returns (for changes) or rejects a reviewed request, with a comment."""
        if action not in ("return", "reject"):
            raise BadInput("action is 'return' or 'reject'")
        comment = _text(comment.strip(), "comment", 10000)
        if not comment:
            raise BadInput("say why: a comment is required")
        with self.factory() as session, session.begin():
            req = self._load(session, who, request_id, lock=True)
            perm.check_decide(who, req)
            self._transition(session, req, Action(action), who.name)
            c = Comment(
                request_id=req.id,
                author=who.name,
                body=comment,
                visibility="public",
                round=req.round,
                created_at=_now(),
            )
            session.add(c)
            session.flush()
            record_event(
                session,
                who.name,
                "comment",
                f"request:{req.id}",
                {"comment": c.id, "visibility": "public"},
            )
            return req.state

    def _try_release(self, actor: str, request_id: str, project: str) -> str:
        try:
            # True: released now; False: it already was; either way it is released
            self.release_now(actor, request_id, project)
        except (ReleaseError, OSError) as exc:
            log.error("release of %s failed, retry with POST .../release: %s", request_id, exc)
            with self.factory() as session:
                return session.get(ReleaseRequest, request_id).state  # type: ignore[union-attr]
        return State.RELEASED.value

    def release_now(self, actor: str, request_id: str, project: str | None = None) -> bool:
        if project is None:
            with self.factory() as session:
                req = session.get(ReleaseRequest, request_id)
                project = req.project if req else ""
        self.check_project_active(project)
        return release_request(
            self.factory,
            self.store,
            self.released_root,
            request_id,
            actor,
            self.eligible_checkers(project),
            on_step=self.release_hook,
        )

    def release(self, who: perm.Who, request_id: str) -> str:
        with self.factory() as session:
            req = self._load(session, who, request_id, lock=False)
            perm.check_release(who, req)
            if req.state not in (State.APPROVED, State.RELEASED):
                raise TransitionError(f"a {req.state} request cannot be released")
        self.release_now(who.name, request_id)
        return State.RELEASED.value

    def complete_pending_releases(self) -> list[str]:
        """Retry every approved-but-unreleased request (run at start after a crash)."""
        with self.factory() as session:
            ids = list(
                session.execute(
                    select(ReleaseRequest.id).where(ReleaseRequest.state == State.APPROVED)
                ).scalars()
            )
        done = []
        for rid in ids:
            try:
                self.release_now("system", rid)
                done.append(rid)
            except (ReleaseError, TransitionError, OSError) as exc:
                log.error("could not complete release of %s: %s", rid, exc)
        return done

    # --- download -------------------------------------------------------------------------

    def download(self, who: perm.Who, request_id: str, file_id: int) -> tuple[Path, str]:
        """Path of a released file (verified against its sha256) and its download name, for
        callers that read it at once (tests, tools); the service serves ``open_download``."""
        fh, name = self.open_download(who, request_id, file_id)
        fh.close()
        return released_dir(self.released_root, request_id) / str(file_id) / name, name

    def open_download(self, who: perm.Who, request_id: str, file_id: int) -> tuple[BinaryIO, str]:
        """A released file, open and verified against its sha256, and its download name.

        The caller sends the bytes of this open file, never the path again: ``airlock gc``
        may move the released copy away and delete it at any moment (purge, end of the grace
        period), and an open file keeps its bytes until it is closed, so a download either
        gets the whole verified file or, once the copy is gone, 410 (not a 500)."""
        with self.factory() as session:  # committed below, with the file open; else rolled back
            req = self._load(session, who, request_id, lock=False)
            perm.check_download(who, req)
            f = _find_file(req, file_id)
            if req.state != State.RELEASED:
                raise Conflict("this request has not been released")
            if f.withdrawn_round is not None:
                raise NotFound("this file was not released")
            self._check_content_available(session, req.id)
            self._check_released_not_expired(req.project)
            path = released_dir(self.released_root, req.id) / str(f.id) / f.name
            project, name = req.project, f.name
            fh = self._open_verified(path, f.sha256)
            if fh is not None:
                try:
                    record_event(
                        session,
                        who.name,
                        "download",
                        f"file:{f.id}",
                        {"request": req.id, "sha": f.sha256},
                    )
                    session.commit()
                except BaseException:
                    fh.close()
                    raise
                return fh, name
        # taken since the checks above? Its record committed before it moved: say so (after
        # this session ended: on SQLite a second one would wait for its write lock)
        self._check_gone_since(request_id, project)
        raise ReleaseError("the released copy does not match its sha256; not served")

    @staticmethod
    def _open_verified(path: Path, sha256: str) -> BinaryIO | None:
        """The file at ``path`` open and rewound if its bytes hash to ``sha256``, else None."""
        try:
            fh = open(path, "rb")  # noqa: SIM115 (returned open)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            digest = hashlib.sha256()
            while chunk := fh.read(1024 * 1024):
                digest.update(chunk)
            if digest.hexdigest() == sha256:
                fh.seek(0)
                return fh
        except BaseException:
            fh.close()
            raise
        fh.close()
        return None

    def _check_gone_since(self, request_id: str, project: str) -> None:
        """Gone if the request's content was purged (or its project's grace period passed)
        after the caller's checks: read in a transaction of its own, which sees that commit."""
        with self.factory() as session:
            self._check_content_available(session, request_id)
        self._check_released_not_expired(project)

    def _check_content_available(self, session: Session, request_id: str) -> None:
        """410 once the released request's file contents were purged, and from the moment
        they are due to be (see ``_content_expiry``), whether or not ``airlock gc`` ran."""
        from airlock.retention import content_purge, purge_message

        purge = content_purge(session, request_id)
        if purge is not None:
            raise Gone(purge_message(purge))
        expiry = self._content_expiry(session, request_id)
        if expiry is not None:
            raise Gone(expiry["message"])

    def _content_expiry(self, session: Session, request_id: str) -> dict[str, Any] | None:
        """None, or why a released request's contents are past ``released_content_retention_days``
        on this machine's clock (the one ``airlock gc`` and the enforcer use): the period is
        what the policy promises, the collection only deletes, so they are refused from then on
        even before it runs. The policy is read anew each time: a change applies at once, and
        null keeps contents forever. An unreleased request has no such period."""
        from airlock.retention import content_expired, expired_message, load_retention_policy

        released_at = session.execute(
            select(Release.released_at).where(Release.request_id == request_id)
        ).scalar_one_or_none()
        if released_at is None:
            return None
        days = load_retention_policy(self.settings.policies_dir).released_content_retention_days
        if days is None or not content_expired(released_at, days, dt.datetime.now(dt.UTC)):
            return None
        return {
            "released_at": released_at.isoformat(),
            "after_days": days,
            "message": expired_message(released_at, days),
        }

    def _check_released_not_expired(self, project: str) -> None:
        """410 once the project's released files are past their grace period (retention.py)."""
        from airlock.retention import load_retention_policy, project_ended_on, released_expiry

        today = dt.date.today()
        if project_ended_on(self, project, today) is None:
            return  # the project has not ended: no limit
        policy = load_retention_policy(self.settings.policies_dir)
        last_day = released_expiry(self, policy, project, today)
        if last_day is not None and today > last_day:
            raise Gone(
                f"project {project} has ended: its released files could be downloaded until"
                f" {last_day.isoformat()} ({policy.released_grace_days} days after its end)"
                " and are deleted"
            )

    def snapshot_path(
        self, who: perm.Who, request_id: str, file_id: int
    ) -> tuple[Path, RequestFile]:
        """Where the snapshot is, for callers that read it at once (tests, tools); the
        service's previews read ``open_snapshot``'s file."""
        fh, f = self.open_snapshot(who, request_id, file_id)
        fh.close()
        return self.store.path(f.sha256), f

    def open_snapshot(
        self, who: perm.Who, request_id: str, file_id: int
    ) -> tuple[BinaryIO, RequestFile]:
        """The snapshot's bytes, open, for checkers' and authors' previews inside the airlock
        (read from this open file: a collection may delete the blob meanwhile)."""
        with self.factory() as session:
            req = self._load(session, who, request_id, lock=False)
            f = _find_file(req, file_id)
            released = req.state == State.RELEASED
            if released:
                # the blob may still be stored for another request: not for this one, under
                # none of its file ids (a withdrawn or replaced one may hold the same bytes)
                self._check_content_available(session, req.id)
            project = req.project
            try:
                return self.store.open(f.sha256), f
            except FileNotFoundError:  # only the garbage collector removes snapshots
                pass
        if released:  # purged since the check above? (after the session, as in open_download)
            self._check_gone_since(request_id, project)
        raise Gone(
            "this snapshot was deleted under the retention policy"
            " (its request ended without releasing it)"
        )

    # --- reading --------------------------------------------------------------------------

    def view(self, who: perm.Who, request_id: str) -> dict[str, Any]:
        with self.factory() as session:
            req = self._read(session, who, request_id)
            return self._view(session, who, req)  # type: ignore[arg-type]

    def _read(self, session: Session, who: perm.Who, request_id: str) -> _RequestRead:
        """The request with its files, votes and comments as plain rows, checked visible to
        ``who``: what ``view`` shows, read without building ORM objects (the identity map
        and attribute instrumentation cost about as much CPU as the rest of a request page;
        nothing here is changed, so none of it is needed)."""
        if not isinstance(request_id, str) or len(request_id) != 32:
            raise NotFound("no such request")
        r = ReleaseRequest.__table__
        row = session.execute(select(r).where(r.c.id == request_id)).first()
        if row is None:
            raise NotFound("no such request")
        children = []
        for model in (RequestFile, Vote, Comment):
            t = model.__table__
            stmt = select(t).where(t.c.request_id == request_id).order_by(t.c.id)
            children.append(session.execute(stmt).all())
        req = _RequestRead(row, [_FileRead(f) for f in children[0]], children[1], children[2])
        if not perm.can_view_request(who, req):
            raise NotFound("no such request")
        return req

    def _view(self, session: Session, who: perm.Who, req: ReleaseRequest) -> dict[str, Any]:
        round_complete = self._round_complete(req) or req.state not in (
            State.SUBMITTED,
            State.PARTIALLY_REVIEWED,
        )
        files = []
        for f in req.files:
            current = [v for v in req.votes if v.file_id == f.id and v.round == req.round]
            votes = [
                _vote_dict(v)
                for v in req.votes
                if v.file_id == f.id
                and perm.can_see_vote(
                    who,
                    req,
                    v.reviewer,
                    len(current) if v.round == req.round else 2,
                )
            ]
            files.append(
                {
                    "id": f.id,
                    "group": f.group,
                    "path": f.path,
                    "name": f.name,
                    "sha256": f.sha256,
                    "size": f.size,
                    "output_class": f.output_class,
                    "check_status": f.check_status,
                    "findings": f.findings,
                    "added_round": f.added_round,
                    "withdrawn": f.withdrawn_reason,
                    "active": f.withdrawn_round is None,
                    "votes": votes,
                    "vote_count": len(current),
                    "my_vote": (
                        my_vote := next(
                            (v.decision for v in current if v.reviewer == who.name), None
                        )
                    ),
                    "can_change_vote": f.withdrawn_round is None
                    and perm.can_change_vote(who, req, my_vote, len(current)),
                }
            )
        comments = [
            {
                "id": c.id,
                "author": c.author,
                "body": c.body,
                "visibility": c.visibility,
                "round": c.round,
                "created_at": c.created_at.isoformat(),
            }
            for c in req.comments
            if perm.can_see_comment(
                who, req, c.author, c.visibility, round_complete or c.round < req.round
            )
        ]
        history = [
            {
                "seq": e.seq,
                "ts": e.ts,
                "actor": e.actor,
                "action": e.action,
                "target": e.target,
                "details": json.loads(e.details),
            }
            for e in session.execute(
                select(AuditEvent)
                .where(
                    AuditEvent.target.in_(
                        [f"request:{req.id}"] + [f"file:{f.id}" for f in req.files]
                    )
                )
                .order_by(AuditEvent.seq)
            ).scalars()
            if e.action
            in (
                "state_change",
                "request_create",
                "file_add",
                "file_withdraw",
                "file_replace",
                "release",
                "release_content_purge",
            )
            or (
                e.action in ("vote", "vote_change")
                and perm.can_see_vote(who, req, e.actor, 2 if round_complete else 0)
            )
        ]
        purge = expiry = None
        if req.state == State.RELEASED:
            from airlock.retention import content_purge, purge_message

            if found := content_purge(session, req.id):
                purge = {
                    "at": found[0].isoformat(),
                    "released_at": found[1]["released_at"],
                    "after_days": found[1]["released_content_retention_days"],
                    "message": purge_message(found),
                }
            else:
                expiry = self._content_expiry(session, req.id)
        return {
            **_request_summary(req),
            "files": files,
            "comments": comments,
            "history": history,
            # None, or when and why the released file contents were removed (retention.py)
            "content_purged": purge,
            # None, or why they are past their period though no collection removed them yet
            "content_expired": expiry,
            "permissions": {
                "edit": perm.can_edit_request(who, req),
                "submit": perm.can_submit(who, req) and bool(req.active_files()),
                "withdraw": perm.can_withdraw(who, req),
                "review": perm.can_review(who, req),
                "decide": perm.can_decide(who, req),
                "release": perm.can_release(who, req) and req.state == State.APPROVED,
                "download": perm.can_download(who, req) and purge is None and expiry is None,
                "comment": perm.can_comment(who, req),
                "comment_privately": perm.can_comment_privately(who, req),
            },
        }

    def list_requests(self, who: perm.Who) -> list[dict[str, Any]]:
        with self.factory() as session:
            stmt = (
                select(ReleaseRequest)
                .options(selectinload(ReleaseRequest.files), selectinload(ReleaseRequest.comments))
                .order_by(ReleaseRequest.created_at.desc())
            )
            if not (who.is_admin or who.is_checker) or who.in_sandbox:
                # ended projects too: their released files stay downloadable for a while
                mine = who.projects | who.ended_projects
                stmt = stmt.where(ReleaseRequest.project.in_(sorted(mine) or [""]))
            rows = session.execute(stmt).scalars().all()
            out = []
            for r in rows:
                if perm.can_view_request(who, r):
                    public = [c for c in r.comments if c.visibility == "public"]
                    latest = public[-1] if public else None
                    out.append(
                        {
                            **_request_summary(r),
                            "latest_comment": (
                                {"author": latest.author, "body": latest.body} if latest else None
                            ),
                        }
                    )
            return out

    def queue(self, who: perm.Who, limit: int | None = None) -> dict[str, list[dict[str, Any]]]:
        """A checker's queue: waiting for me, in progress (I voted, others not yet), done.

        Each list holds its ``limit`` most recently updated requests (all when None); see
        :meth:`queue_with_totals` for how many each holds in all.
        """
        return self.queue_with_totals(who, limit)[0]

    def queue_with_totals(
        self, who: perm.Who, limit: int | None = None
    ) -> tuple[dict[str, list[dict[str, Any]]], dict[str, int]]:
        """The queue's lists, each cut to its ``limit`` most recently updated requests, and the
        number of requests in each list before the cut.

        Finished requests only accumulate, so with a limit they are read with an SQL limit and
        counted in SQL: the cost follows the open work, not the whole history. Open requests
        are all read (to tell "waiting for me" from "in progress"), but only the listed ones
        become summaries.

        Column queries instead of loading requests with all their files, votes and comments as
        ORM objects: the open requests; the latest finished ones; the active files of the
        listed requests; and, per file of a request in review, its distinct reviewers this
        round and whether I am one. Votes are only read for requests in review, reached through
        the request's state and id: an outer join of every file with its votes let PostgreSQL
        pick (without fresh statistics) a plan that scanned every vote of the round per file.
        """
        out: dict[str, list[dict[str, Any]]] = {"waiting": [], "in_progress": [], "done": []}
        totals = dict.fromkeys(out, 0)
        if not who.is_checker or who.in_sandbox:
            return out, totals  # nobody else is an eligible checker of any request
        r, f, v = ReleaseRequest.__table__, RequestFile.__table__, Vote.__table__
        mine = _eligible_for(who)  # the conditions of perm.is_eligible_checker (re-checked below)
        in_review = [r.c.state.in_(_IN_REVIEW), *mine]
        columns = [r.c[name] for name in _SUMMARY_COLUMNS]
        newest_first = r.c.updated_at.desc(), r.c.id
        open_rows = select(*columns).where(r.c.state.in_(_OPEN), *mine).order_by(*newest_first)
        done_rows = select(*columns).where(r.c.state.in_(_DONE), *mine).order_by(*newest_first)
        if limit is not None:
            done_rows = done_rows.limit(max(limit, 0))
        listed_done = done_rows.with_only_columns(r.c.id).subquery()
        votes_this_round = (
            select(
                v.c.file_id,
                func.count(v.c.reviewer.distinct()),
                func.max(case((v.c.reviewer == who.name, 1), else_=0)),
            )
            .select_from(v.join(r, and_(r.c.id == v.c.request_id, r.c.round == v.c.round)))
            .where(*in_review)
            .group_by(v.c.file_id)
        )
        active: dict[str, int] = {}
        in_review_files: list[tuple[str, int]] = []
        with self.factory() as session:
            rows = [*session.execute(open_rows), *session.execute(done_rows)]
            for listed in (
                f.join(r, r.c.id == f.c.request_id).join(listed_done, listed_done.c.id == r.c.id),
                f.join(r, and_(r.c.id == f.c.request_id, r.c.state.in_(_OPEN), *mine)),
            ):
                for request_id, file_id, state in session.execute(
                    select(f.c.request_id, f.c.id, r.c.state)
                    .select_from(listed)
                    .where(f.c.withdrawn_round.is_(None))
                ):
                    active[request_id] = active.get(request_id, 0) + 1
                    if state in _IN_REVIEW:
                        in_review_files.append((request_id, file_id))
            voted = {fid: (n, me) for fid, n, me in session.execute(votes_this_round)}
            if limit is not None and len(rows) - sum(row.state in _OPEN for row in rows) >= limit:
                totals["done"] = session.execute(
                    select(func.count()).where(r.c.state.in_(_DONE), *mine)
                ).scalar_one()
        to_vote: dict[str, int] = {}
        for request_id, file_id in in_review_files:
            reviewers, me = voted.get(file_id, (0, 0))
            if not me and reviewers < 2:
                to_vote[request_id] = to_vote.get(request_id, 0) + 1
        counted_done = 0
        for row in rows:
            if not perm.is_eligible_checker(who, row):
                continue
            if row.state in _IN_REVIEW:
                key = "waiting" if to_vote.get(row.id) else "in_progress"
            elif row.state in _OPEN:
                key = "in_progress"
            else:
                key = "done"
                counted_done += 1
            totals[key] += key != "done"
            if limit is None or len(out[key]) < limit:
                summary = _summary_from_row(row, active.get(row.id, 0))
                summary["files_to_vote"] = to_vote.get(row.id, 0)
                out[key].append(summary)
        totals["done"] = max(totals["done"], counted_done)
        return out, totals

    def audit_events(self, who: perm.Who, limit: int = 1000) -> list[dict[str, Any]]:
        perm.check_view_audit(who)
        with self.factory() as session:
            rows = session.execute(
                select(AuditEvent).order_by(AuditEvent.seq.desc()).limit(limit)
            ).scalars()
            return [e.as_dict() for e in rows]

    def count_requests(self) -> int:
        with self.factory() as session:
            return session.execute(select(func.count(ReleaseRequest.id))).scalar_one()


def _now():  # noqa: ANN202
    from airlock.service.models import utcnow

    return utcnow()


# one query per relationship instead of one per request (the queue lists every request)
_EAGER = (
    selectinload(ReleaseRequest.files),
    selectinload(ReleaseRequest.votes),
    selectinload(ReleaseRequest.comments),
)


def _find_file(req: ReleaseRequest, file_id: int) -> RequestFile:
    for f in req.files:
        if f.id == file_id:
            return f
    raise NotFound("no such file in this request")


def _vote_input(decision: str, comment: str, justification: str) -> tuple[str, str, str]:
    """The rules on a vote's own fields (a first vote and a changed vote alike)."""
    if decision not in DECISIONS:
        raise BadInput(f"decision must be one of {', '.join(DECISIONS)}")
    comment = _text(comment.strip(), "comment", 10000)
    justification = _text(justification.strip(), "justification", 10000)
    if decision != "approve" and not comment:
        raise BadInput("a comment is required to reject or request changes")
    return decision, comment, justification


def _check_votable(f: RequestFile, decision: str, justification: str) -> None:
    """The rules a vote must meet on this file (a first vote and a changed vote alike)."""
    if f.withdrawn_round is not None:
        raise Conflict("this file was withdrawn or replaced")
    if decision == "approve" and f.check_status == "fail" and not justification:
        raise BadInput(
            "this file failed an automated check: approving it needs a written justification"
        )


def _vote_dict(v: Vote) -> dict[str, Any]:
    return {
        "reviewer": v.reviewer,
        "round": v.round,
        "decision": v.decision,
        "comment": v.comment,
        "justification": v.justification,
        "created_at": v.created_at.isoformat(),
    }


# states in which checkers vote (the queue reads votes of these requests only)
_IN_REVIEW = (State.SUBMITTED.value, State.PARTIALLY_REVIEWED.value)
# the queue's open work (in review, or reviewed and waiting for the release) and finished requests
_OPEN = (*_IN_REVIEW, State.REVIEWED.value, State.APPROVED.value)
_DONE = tuple(s.value for s in State if s.value not in _OPEN and s != State.PENDING)


def _eligible_for(who: perm.Who) -> list[Any]:
    """The conditions of ``perm.is_eligible_checker`` on a request row, in SQL (state aside)."""
    r = ReleaseRequest.__table__
    conditions = [r.c.author != who.name]
    if who.projects:
        conditions.append(r.c.project.not_in(sorted(who.projects)))
    return conditions


_SUMMARY_COLUMNS = (
    "id",
    "project",
    "author",
    "state",
    "round",
    "title",
    "context",
    "controls",
    "created_at",
    "updated_at",
)


class _FileRead:
    """A file row with the properties of ``RequestFile`` that the read path uses."""

    __slots__ = ("_row",)

    def __init__(self, row: Any) -> None:
        self._row = row

    def __getattr__(self, name: str) -> Any:
        return getattr(self._row, name)

    @property
    def findings(self) -> list[dict[str, Any]]:
        return json.loads(self._row.findings_json)

    @property
    def name(self) -> str:
        return self._row.path.rsplit("/", 1)[-1]


class _RequestRead:
    """A request row with its files, votes and comments (rows), shaped like
    ``ReleaseRequest`` for the read-only code (permissions, ``_view``)."""

    def __init__(self, row: Any, files: list[_FileRead], votes: list, comments: list) -> None:
        self._row, self.files, self.votes, self.comments = row, files, votes, comments

    def __getattr__(self, name: str) -> Any:
        return getattr(self._row, name)

    def active_files(self) -> list[_FileRead]:
        return [f for f in self.files if f.withdrawn_round is None]


def _request_summary(req: ReleaseRequest) -> dict[str, Any]:
    return _summary_from_row(req, len(req.active_files()))


def _summary_from_row(req: Any, file_count: int) -> dict[str, Any]:
    """The summary of a request (an ORM object or a row with the ``_SUMMARY_COLUMNS``)."""
    return {
        "id": req.id,
        "project": req.project,
        "author": req.author,
        "state": req.state,
        "round": req.round,
        "title": req.title,
        "context": req.context,
        "controls": req.controls,
        "file_count": file_count,
        "created_at": req.created_at.isoformat(),
        "updated_at": req.updated_at.isoformat(),
    }


__all__ = [
    "AirlockService",
    "BadInput",
    "Conflict",
    "FileSpec",
    "Gone",
    "NotFound",
    "StorageError",
    "TransitionError",
    "ReleaseError",
]

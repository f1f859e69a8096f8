"""Who may do what: ``check_*`` functions raise ``PermissionDenied``, ``can_*`` return a bool.

Roles come from the TRE registry (``policies/``), never from the client:
- author: an active member of the request's project (the request's author for author actions);
- output checker: listed in ``staff.yaml``, and by policy NOT a member of the project checked;
- admin: listed in ``staff.yaml``; may read everything and the audit log, cannot vote.
A token that belongs to a project's named server (the sandbox) only acts as author on that
project, and can never download (released files leave from outside the sandbox).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from airlock.workflow import EDITABLE_STATES, REVIEWABLE_STATES, State, can_transition
from tre.registry import Registry


class PermissionDenied(Exception):  # noqa: N818 (the name says what it is)
    """The caller is identified but not allowed to do this."""


@dataclass(frozen=True)
class Who:
    name: str
    projects: frozenset[str] = field(default_factory=frozenset)  # active memberships
    is_checker: bool = False
    is_admin: bool = False
    # set when the token is a project server's token: the sandbox of that project
    sandbox_project: str | None = None
    # projects that have ended (expired, closed) this user was a member of: their released
    # files stay downloadable for a grace period (policies/retention.yaml), nothing else
    ended_projects: frozenset[str] = field(default_factory=frozenset)

    @property
    def in_sandbox(self) -> bool:
        return self.sandbox_project is not None


def who_from_registry(registry: Registry, name: str, sandbox_project: str | None = None) -> Who:
    from tre.provision import ENDED, effective_status

    projects = frozenset(p.id for p in registry.projects_of(name))
    today = dt.date.today()
    ended = frozenset(
        p.id
        for p in registry.projects.values()
        if name in p.member_names() and effective_status(p, today) in ENDED
    )
    return Who(
        name=name,
        projects=projects,
        ended_projects=ended,
        is_checker=name in registry.staff.output_checkers,
        is_admin=name in registry.staff.admins,
        sandbox_project=sandbox_project,
    )


class _Req:
    """What the rules need to know about a request (duck-typed on the ORM model)."""

    id: str
    project: str
    author: str
    state: str


def _deny(ok: bool, message: str) -> None:
    if not ok:
        raise PermissionDenied(message)


# --- creating and editing (author) -------------------------------------------------------


def can_create_request(who: Who, project: str) -> bool:
    if who.in_sandbox and who.sandbox_project != project:
        return False
    return project in who.projects


def check_create_request(who: Who, project: str) -> None:
    _deny(can_create_request(who, project), f"{who.name} is not an active member of {project}")


def _is_author(who: Who, req: _Req) -> bool:
    if who.in_sandbox and who.sandbox_project != req.project:
        return False
    # membership is re-checked: an author removed from the project loses the request
    return req.author == who.name and req.project in who.projects


def can_edit_request(who: Who, req: _Req) -> bool:
    """Add, replace or withdraw files; change context and controls."""
    return _is_author(who, req) and State(req.state) in EDITABLE_STATES


def check_edit_request(who: Who, req: _Req) -> None:
    _deny(_is_author(who, req), "only the request's author may change it")
    _deny(
        State(req.state) in EDITABLE_STATES,
        f"a {req.state} request cannot be changed (only pending or returned ones)",
    )


def can_submit(who: Who, req: _Req) -> bool:
    return _is_author(who, req) and (
        can_transition(req.state, "submit") or can_transition(req.state, "resubmit")
    )


def check_submit(who: Who, req: _Req) -> None:
    _deny(_is_author(who, req), "only the request's author may submit it")


def can_withdraw(who: Who, req: _Req) -> bool:
    return _is_author(who, req) and can_transition(req.state, "withdraw")


def check_withdraw(who: Who, req: _Req) -> None:
    _deny(_is_author(who, req), "only the request's author may withdraw it")


# --- reading -------------------------------------------------------------------------------


def is_eligible_checker(who: Who, req: _Req) -> bool:
    """An output checker who is neither the author nor a member of the project (a member of
    a project that has ended included: membership is what makes them ineligible)."""
    return (
        who.is_checker
        and not who.in_sandbox
        and who.name != req.author
        and req.project not in who.projects
        and req.project not in who.ended_projects
    )


def can_view_request(who: Who, req: _Req) -> bool:
    if who.in_sandbox:
        return _is_author(who, req)
    if req.project in who.projects or who.is_admin:
        return True
    if req.project in who.ended_projects:  # to download released files (check_download)
        return True
    # checkers see submitted work, never a draft that is still pending
    return is_eligible_checker(who, req) and req.state != State.PENDING


def check_view_request(who: Who, req: _Req) -> None:
    _deny(can_view_request(who, req), "not allowed to see this request")


def can_comment(who: Who, req: _Req) -> bool:
    return can_view_request(who, req) and (
        _is_author(who, req) or is_eligible_checker(who, req) or who.is_admin
    )


def check_comment(who: Who, req: _Req) -> None:
    _deny(can_comment(who, req), "only the author, its checkers and admins may comment")


def can_comment_privately(who: Who, req: _Req) -> bool:
    return is_eligible_checker(who, req)


# --- reviewing (checkers) ----------------------------------------------------------------


def can_review(who: Who, req: _Req) -> bool:
    return is_eligible_checker(who, req) and State(req.state) in REVIEWABLE_STATES


def check_review(who: Who, req: _Req) -> None:
    _deny(who.is_checker and not who.in_sandbox, "only output checkers may review")
    _deny(who.name != req.author, "no self-review: the author cannot check their own request")
    _deny(
        req.project not in who.projects,
        "by policy, members of the project cannot check its outputs",
    )


def can_change_vote(who: Who, req: _Req, my_vote: str | None, file_vote_count: int) -> bool:
    """Change my vote on a file: only mine, only while the file waits for its second review
    (so nobody changes a vote after seeing the other one) and the request is in review."""
    return can_review(who, req) and my_vote is not None and file_vote_count < 2


def check_change_vote(who: Who, req: _Req) -> None:
    # the vote-specific conditions (my vote exists, the file has one vote) are the service's
    check_review(who, req)


def can_decide(who: Who, req: _Req) -> bool:
    """Return or reject a reviewed request."""
    return is_eligible_checker(who, req) and State(req.state) == State.REVIEWED


def check_decide(who: Who, req: _Req) -> None:
    check_review(who, req)


def can_release(who: Who, req: _Req) -> bool:
    """Run (or retry) the release of an approved request."""
    return (is_eligible_checker(who, req) or (who.is_admin and not who.in_sandbox)) and State(
        req.state
    ) in (State.APPROVED, State.RELEASED)


def check_release(who: Who, req: _Req) -> None:
    _deny(
        is_eligible_checker(who, req) or (who.is_admin and not who.in_sandbox),
        "only the request's checkers or an admin may release it",
    )


def _member_for_download(who: Who, req: _Req) -> bool:
    # members of an ended project too: the service refuses (410) after the grace period
    return req.project in who.projects or req.project in who.ended_projects


def can_download(who: Who, req: _Req) -> bool:
    return (
        not who.in_sandbox and _member_for_download(who, req) and State(req.state) == State.RELEASED
    )


def check_download(who: Who, req: _Req) -> None:
    _deny(not who.in_sandbox, "released files are downloaded from outside the sandbox")
    _deny(_member_for_download(who, req), "only the project's members may download its outputs")


def can_view_audit(who: Who) -> bool:
    return who.is_admin and not who.in_sandbox


def check_view_audit(who: Who) -> None:
    _deny(can_view_audit(who), "only admins may read the audit log")


# --- visibility of votes and comments ------------------------------------------------------


def can_see_vote(who: Who, req: _Req, vote_reviewer: str, file_vote_count: int) -> bool:
    """Independence: a checker sees another's vote only when the file has both votes; the
    author sees votes once the round is decided (returned, rejected, approved, released)."""
    if vote_reviewer == who.name or who.is_admin:
        return True
    if is_eligible_checker(who, req):
        return file_vote_count >= 2
    if _is_author(who, req) or req.project in who.projects:
        return State(req.state) in {
            State.RETURNED,
            State.REJECTED,
            State.APPROVED,
            State.RELEASED,
        }
    return False


def can_see_comment(
    who: Who, req: _Req, comment_author: str, visibility: str, round_complete: bool
) -> bool:
    if comment_author == who.name or who.is_admin:
        return True
    if visibility == "public":
        return True
    # private: checkers only, and another checker's only once both reviews are in
    return is_eligible_checker(who, req) and round_complete

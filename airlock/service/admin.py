"""Admin pages and JSON API (admin role only), and the public transparency register (no login).

Registered in ``create_app`` with one line (``app.include_router(admin.make_router(...))``).
The admin API runs the same operations as ``tre project ...``: it edits the declaration
(``tre.project_edit``: validated, comments kept), audits the edit, then reconciles
(``tre.provision.reconcile``) and answers with the plan and what was applied.
"""

from __future__ import annotations

import datetime as dt
import json
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, Field
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from airlock import permissions as perm
from airlock.service.models import ReleaseRequest, RequestFile
from airlock.workflow import State
from tre.audit import AuditEvent
from tre.registry import Registry, RegistryError

HERE = Path(__file__).resolve().parent
PUBLIC_CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)
DECIDED = {State.APPROVED.value, State.REJECTED.value, State.RETURNED.value}


# --- permissions: check_* raises, can_* answers ------------------------------------------


def can_administer(who: perm.Who) -> bool:
    return who.is_admin and not who.in_sandbox


def check_administer(who: perm.Who) -> None:
    if not can_administer(who):
        raise perm.PermissionDenied("only TRE admins may do this (and never from a sandbox)")


def can_grant_membership(who: perm.Who, username: str) -> bool:
    """Separation of duties: an admin never makes themselves a member (which would give them
    the project's sandbox and data); another admin must."""
    return can_administer(who) and username != who.name


def check_grant_membership(who: perm.Who, username: str) -> None:
    check_administer(who)
    if not can_grant_membership(who, username):
        raise perm.PermissionDenied(
            "an admin cannot make themselves a member of a project (it would give them its "
            "data): another admin must"
        )


# --- what the pages show ------------------------------------------------------------------


def released_counts(session: Session) -> dict[str, int]:
    """Files released per project (withdrawn files never are)."""
    rows = session.execute(
        select(ReleaseRequest.project, func.count(RequestFile.id))
        .join(RequestFile, RequestFile.request_id == ReleaseRequest.id)
        .where(ReleaseRequest.state == State.RELEASED.value)
        .where(RequestFile.withdrawn_round.is_(None))
        .group_by(ReleaseRequest.project)
    ).all()
    return {project: int(n) for project, n in rows}


def public_projects(registry: Registry, session: Session, today: dt.date) -> list[dict[str, Any]]:
    """The transparency register: what every approved project is, uses and has released."""
    from tre.provision import effective_status

    released = released_counts(session)
    out = []
    for p in sorted(registry.projects.values(), key=lambda p: (p.start_date, p.id)):
        sites = registry.sites_for(p, today)
        out.append(
            {
                "id": p.id,
                "title": p.title,
                "lay_summary": p.lay_summary,
                "institutions": list(p.institutions),
                "purpose": p.purpose.value,
                "status": effective_status(p, today).value,
                "datasets": sorted(p.grants),
                "sites": [{"id": s.id, "name": s.name, "country": s.country} for s in sites],
                "start_date": p.start_date.isoformat(),
                "end_date": p.end_date.isoformat(),
                "outputs_released": released.get(p.id, 0),
            }
        )
    return out


def _iso_week(ts: dt.datetime) -> str:
    year, week, _ = ts.isocalendar()
    return f"{year}-W{week:02d}"


def _parse_ts(ts: str) -> dt.datetime:
    return dt.datetime.fromisoformat(ts)


def release_statistics(session: Session) -> dict[str, Any]:
    """Requests per week, time from submission to decision, and files failed per rule."""
    requests = session.execute(select(ReleaseRequest)).scalars().all()
    per_week = Counter(_iso_week(r.created_at) for r in requests)
    # time to decision from the audit trail: first submission -> first decision
    submitted: dict[str, dt.datetime] = {}
    decided: dict[str, dt.datetime] = {}
    events = session.execute(
        select(AuditEvent).where(AuditEvent.action == "state_change").order_by(AuditEvent.seq)
    ).scalars()
    for ev in events:
        rid = ev.target.removeprefix("request:")
        to = json.loads(ev.details).get("to")
        if to == State.SUBMITTED.value:
            submitted.setdefault(rid, _parse_ts(ev.ts))
        elif to in DECIDED and rid in submitted:
            decided.setdefault(rid, _parse_ts(ev.ts))
    hours = sorted(
        (decided[r] - submitted[r]).total_seconds() / 3600 for r in decided if r in submitted
    )
    # share of checked files that failed, by the rule that failed them
    files = session.execute(select(RequestFile)).scalars().all()
    failed_by_rule: Counter[str] = Counter()
    for f in files:
        for rule in {x["rule"] for x in f.findings if x.get("status") == "fail"}:
            failed_by_rule[rule] += 1
    total = len(files)
    return {
        "requests": len(requests),
        "requests_by_state": dict(sorted(Counter(r.state for r in requests).items())),
        "requests_per_week": sorted(per_week.items()),
        "time_to_decision_hours": {
            "decided": len(hours),
            "median": round(statistics.median(hours), 2) if hours else None,
            "p90": round(hours[min(len(hours) - 1, int(0.9 * len(hours)))], 2) if hours else None,
            "max": round(hours[-1], 2) if hours else None,
        },
        "files_checked": total,
        "files_failed": sum(1 for f in files if f.check_status == "fail"),
        "failed_by_rule": [
            {"rule": rule, "files": n, "share": round(n / total, 4)}
            for rule, n in failed_by_rule.most_common()
        ],
    }


def members_overview(registry: Registry, today: dt.date) -> list[dict[str, Any]]:
    from tre.provision import effective_status

    by_user: dict[str, list[dict[str, str]]] = defaultdict(list)
    for p in registry.projects.values():
        for m in p.members:
            by_user[m.username].append(
                {
                    "project": p.id,
                    "role": m.role.value,
                    "institution": m.institution or "",
                    "status": effective_status(p, today).value,
                }
            )
    staff = registry.staff
    users = sorted(set(by_user) | set(staff.output_checkers) | set(staff.admins))
    return [
        {
            "username": u,
            "projects": sorted(by_user.get(u, []), key=lambda x: x["project"]),
            "checker": u in staff.output_checkers,
            "admin": u in staff.admins,
        }
        for u in users
    ]


# --- request bodies of the admin API -------------------------------------------------------


class MemberIn(BaseModel):
    username: str
    role: Literal["lead", "researcher"] = "researcher"
    institution: str | None = None


class GrantIn(BaseModel):
    table: str
    columns: list[str] = Field(min_length=1)
    revoke: bool = False


class StatusIn(BaseModel):
    status: Literal["active", "suspended", "closed"]


class ProjectIn(BaseModel):
    id: str
    title: str
    lay_summary: str
    purpose: str
    jurisdiction: str
    institutions: list[str] = Field(default_factory=list)
    lead: str
    grants: dict[str, list[str]]
    start_date: dt.date
    end_date: dt.date
    retention_days: int = 365


class ServiceAudit:
    """Audit sink writing through the service's own sessions (one transaction per event)."""

    def __init__(self, service: Any) -> None:
        self.service = service

    def record(self, actor: str, action: str, target: str, details: dict[str, Any]) -> None:
        from airlock.service.db import transaction
        from tre.audit import record_event

        with transaction(self.service.factory) as session:
            record_event(session, actor, action, target, details)


def _change_dict(c: Any) -> dict[str, str]:
    return {"project": c.project, "action": c.action.value, "detail": c.detail}


def make_router(
    service: Any,
    prefix: str,
    api_user: Callable[..., Any],
    page_user: Callable[..., Any],
    render: Callable[..., HTMLResponse],
) -> APIRouter:
    """Admin pages + admin API + public register, mounted under the service's ``prefix``.

    The admin pages only read; changes go through the JSON API (token auth, so no CSRF) or the
    CLI, both of which audit and show the plan.
    """
    router = APIRouter()
    # defaults, not Annotated aliases: this module's annotations are strings (PEP 563), and
    # FastAPI resolves string annotations in module scope, where local aliases do not exist
    api_who = Depends(api_user)
    page_who = Depends(page_user)
    public_templates = Jinja2Templates(directory=HERE / "templates")
    public_templates.env.globals["prefix"] = prefix

    def settings() -> Any:
        return service.settings

    def reconcile_now(actor: str, dry_run: bool = False) -> dict[str, Any]:
        from tre.provision import reconcile
        from tre.registry import load_registry

        rec = reconcile(
            settings(),
            load_registry(settings().policies_dir),  # the declarations as they are on disk now
            actor=actor,
            dry_run=dry_run,
            audit=ServiceAudit(service),
        )
        out: dict[str, Any] = {
            "plan": [_change_dict(c) for c in rec.changes],
            "hub_warning": rec.hub_warning,
            "applied": [],
            "error": None,
        }
        if rec.result is not None:
            out["applied"] = [_change_dict(c) for c in rec.result.applied]
            out["error"] = rec.result.error
        return out

    def edit_then_apply(
        who: perm.Who, action: str, project: str, edit: Callable[[], Any], details: dict
    ) -> JSONResponse:
        check_administer(who)
        try:
            edit()
        except RegistryError as exc:
            return JSONResponse(
                {
                    "detail": "invalid declaration: nothing was changed",
                    "problems": [
                        {"file": str(p.file.name), "field": p.field, "message": p.message}
                        for p in exc.problems
                    ],
                },
                status_code=400,
            )
        ServiceAudit(service).record(
            who.name, f"declaration.{action}", f"project:{project}", details
        )
        result = reconcile_now(who.name)
        return JSONResponse(result, status_code=200 if result["error"] is None else 500)

    # --- public -----------------------------------------------------------------------------

    @router.get(f"{prefix}api/public/projects", tags=["public"])
    def public_projects_api() -> list[dict[str, Any]]:
        """The transparency register (no login)."""
        with service.factory() as session:
            return public_projects(service.registry, session, dt.date.today())

    @router.get(f"{prefix}transparency", include_in_schema=False)
    def transparency(request: Request) -> HTMLResponse:
        with service.factory() as session:
            projects = public_projects(service.registry, session, dt.date.today())
        response = public_templates.TemplateResponse(
            request, "transparency.html", {"projects": projects, "today": dt.date.today()}
        )
        response.headers["Content-Security-Policy"] = PUBLIC_CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    # --- admin JSON API -----------------------------------------------------------------------

    api = f"{prefix}api/admin"

    @router.get(f"{api}/projects", tags=["admin"])
    def admin_projects(who: perm.Who = api_who) -> list[dict[str, Any]]:
        check_administer(who)
        return _projects_overview(service)

    @router.get(f"{api}/plan", tags=["admin"])
    def admin_plan(who: perm.Who = api_who) -> dict[str, Any]:
        check_administer(who)
        return reconcile_now(who.name, dry_run=True)

    @router.post(f"{api}/apply", tags=["admin"])
    def admin_apply(who: perm.Who = api_who) -> JSONResponse:
        check_administer(who)
        result = reconcile_now(who.name)
        return JSONResponse(result, status_code=200 if result["error"] is None else 500)

    @router.post(f"{api}/projects", tags=["admin"])
    def admin_create(body: ProjectIn, who: perm.Who = api_who) -> JSONResponse:
        from tre.project_edit import create_project

        check_grant_membership(who, body.lead)
        fields = body.model_dump(mode="json", exclude={"lead"})
        fields["members"] = [{"username": body.lead, "role": "lead"}]
        return edit_then_apply(
            who,
            "create",
            body.id,
            lambda: create_project(settings().policies_dir, fields),
            {"title": body.title},
        )

    @router.post(f"{api}/projects/{{project_id}}/members", tags=["admin"])
    def admin_add_member(project_id: str, body: MemberIn, who: perm.Who = api_who) -> JSONResponse:
        from tre.project_edit import add_member

        check_grant_membership(who, body.username)
        return edit_then_apply(
            who,
            "add_member",
            project_id,
            lambda: add_member(
                settings().policies_dir, project_id, body.username, body.role, body.institution
            ),
            {"user": body.username, "role": body.role},
        )

    @router.delete(f"{api}/projects/{{project_id}}/members/{{username}}", tags=["admin"])
    def admin_remove_member(
        project_id: str, username: str, who: perm.Who = api_who
    ) -> JSONResponse:
        from tre.project_edit import remove_member

        return edit_then_apply(
            who,
            "remove_member",
            project_id,
            lambda: remove_member(settings().policies_dir, project_id, username),
            {"user": username},
        )

    @router.post(f"{api}/projects/{{project_id}}/grants", tags=["admin"])
    def admin_grant(project_id: str, body: GrantIn, who: perm.Who = api_who) -> JSONResponse:
        from tre.project_edit import grant

        return edit_then_apply(
            who,
            "revoke" if body.revoke else "grant",
            project_id,
            lambda: grant(
                settings().policies_dir, project_id, body.table, body.columns, body.revoke
            ),
            {"table": body.table, "columns": body.columns},
        )

    @router.post(f"{api}/projects/{{project_id}}/status", tags=["admin"])
    def admin_status(project_id: str, body: StatusIn, who: perm.Who = api_who) -> JSONResponse:
        from tre.project_edit import set_status

        return edit_then_apply(
            who,
            f"status.{body.status}",
            project_id,
            lambda: set_status(settings().policies_dir, project_id, body.status),
            {},
        )

    @router.get(f"{api}/stats", tags=["admin"])
    def admin_stats(who: perm.Who = api_who) -> dict[str, Any]:
        check_administer(who)
        with service.factory() as session:
            return release_statistics(session)

    # --- admin pages --------------------------------------------------------------------------

    @router.get(f"{prefix}admin", include_in_schema=False)
    def admin_page(request: Request, who: perm.Who = page_who) -> HTMLResponse:
        check_administer(who)
        plan = reconcile_now(who.name, dry_run=True)
        return render(
            request,
            "admin_projects.html",
            who,
            section="projects",
            projects=_projects_overview(service),
            plan=plan,
        )

    @router.get(f"{prefix}admin/members", include_in_schema=False)
    def admin_members_page(request: Request, who: perm.Who = page_who) -> HTMLResponse:
        check_administer(who)
        users = members_overview(service.registry, dt.date.today())
        return render(request, "admin_members.html", who, section="members", users=users)

    @router.get(f"{prefix}admin/sites", include_in_schema=False)
    def admin_sites_page(request: Request, who: perm.Who = page_who) -> HTMLResponse:
        check_administer(who)
        registry = service.registry
        today = dt.date.today()
        sites = []
        for s in sorted(registry.sites.values(), key=lambda s: s.id):
            used_by = [
                p.id for p in registry.projects.values() if s in registry.sites_for(p, today)
            ]
            sites.append({"site": s, "used_by": sorted(used_by)})
        return render(request, "admin_sites.html", who, section="sites", sites=sites)

    @router.get(f"{prefix}admin/events", include_in_schema=False)
    def admin_events_page(request: Request, who: perm.Who = page_who) -> HTMLResponse:
        check_administer(who)
        events = service.audit_events(who, limit=100)
        return render(request, "admin_events.html", who, section="events", events=events)

    @router.get(f"{prefix}admin/stats", include_in_schema=False)
    def admin_stats_page(request: Request, who: perm.Who = page_who) -> HTMLResponse:
        check_administer(who)
        with service.factory() as session:
            stats = release_statistics(session)
        return render(request, "admin_stats.html", who, section="stats", stats=stats)

    return router


def _projects_overview(service: Any) -> list[dict[str, Any]]:
    from tre.provision import AppliedState, effective_status, state_path

    registry: Registry = service.registry
    today = dt.date.today()
    applied = AppliedState.load(state_path(service.settings)).projects
    with service.factory() as session:
        released = released_counts(session)
    out = []
    for p in sorted(registry.projects.values(), key=lambda p: p.id):
        extract = service.settings.extracts_dir / f"{p.id}.duckdb"
        out.append(
            {
                "id": p.id,
                "title": p.title,
                "status": effective_status(p, today).value,
                "applied_status": (applied.get(p.id) or {}).get("status"),
                "members": [{"username": m.username, "role": m.role.value} for m in p.members],
                "tables": sorted(p.grants),
                "sites": [s.id for s in registry.sites_for(p, today)],
                "start_date": p.start_date.isoformat(),
                "end_date": p.end_date.isoformat(),
                "extract": extract.exists(),
                "outputs_released": released.get(p.id, 0),
            }
        )
    return out

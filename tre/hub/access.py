"""Who may start which project's server: one rule, used by every spawner and the home page.

Servers are named after projects. A user may start the server of a project only if the project
is declared in the registry, is active today (status and dates), lists the user as a member, and
has an extract (``<extracts_dir>/<project>.duckdb``). The registry is read at each check, so
suspending a project or removing a member takes effect without restarting the hub.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from tre.registry import Project, ProjectStatus, Registry, load_registry


class ProjectAccessDenied(PermissionError):
    """Starting this project's server is refused; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class ProjectChoice:
    id: str
    title: str
    end_date: dt.date
    has_extract: bool


def extract_path(extracts_dir: Path, project_id: str) -> Path:
    return extracts_dir / f"{project_id}.duckdb"


def check_can_start_project(
    registry: Registry,
    username: str,
    project_id: str,
    extracts_dir: Path,
    on: dt.date | None = None,
) -> Project:
    """Return the project if ``username`` may start its server now; else raise
    ProjectAccessDenied with a message a researcher can act on."""
    on = on or dt.date.today()
    if not project_id:
        mine = ", ".join(p.id for p in registry.projects_of(username, on)) or "none"
        raise ProjectAccessDenied(
            400,
            "Each server belongs to one project: start the server named after a project "
            f"(your active projects: {mine}).",
        )
    project = registry.projects.get(project_id)
    if project is None or username not in project.member_names():
        # The same answer for "no such project" and "not a member": the names of projects a
        # user is not in are not disclosed.
        raise ProjectAccessDenied(
            403, f"{username} is not a member of a project named {project_id!r}."
        )
    if project.status != ProjectStatus.active:
        raise ProjectAccessDenied(
            403, f"Project {project_id!r} is {project.status.value}: its sandbox cannot start."
        )
    if on < project.start_date:
        raise ProjectAccessDenied(
            403, f"Project {project_id!r} starts on {project.start_date.isoformat()}."
        )
    if on > project.end_date:
        raise ProjectAccessDenied(
            403,
            f"Project {project_id!r} expired on {project.end_date.isoformat()}: "
            "its sandbox cannot start.",
        )
    if not extract_path(extracts_dir, project_id).is_file():
        raise ProjectAccessDenied(
            409,
            f"Project {project_id!r} has no data extract yet; an admin must build it "
            "(tre extract build) before its sandbox can start.",
        )
    return project


def can_start_project(
    registry: Registry,
    username: str,
    project_id: str,
    extracts_dir: Path,
    on: dt.date | None = None,
) -> bool:
    try:
        check_can_start_project(registry, username, project_id, extracts_dir, on)
    except ProjectAccessDenied:
        return False
    return True


def projects_for_home(policies_dir: Path, extracts_dir: Path, username: str) -> list[ProjectChoice]:
    """The projects listed on a user's home page: active projects they are a member of."""
    registry = load_registry(policies_dir)
    return [
        ProjectChoice(
            id=p.id,
            title=p.title,
            end_date=p.end_date,
            has_extract=extract_path(extracts_dir, p.id).is_file(),
        )
        for p in sorted(registry.projects_of(username), key=lambda p: p.id)
    ]


def named_server_gate(policies_dir: str, extracts_dir: str):  # noqa: ANN201 - hub callable
    """``c.JupyterHub.named_server_limit_per_user``: JupyterHub calls it with the request handler
    *before* it creates a named server, so a refused project leaves no server record behind
    (bad input changes nothing). It refuses with the same message as the spawner, and sets no
    count limit (one server per project is implied by server names being project ids)."""
    from tornado import web

    def gate(handler: object) -> int:
        args = [a for a in getattr(handler, "path_args", []) if a is not None]
        if len(args) < 2 or not args[1]:
            return 0
        username, project_id = args[0], args[1]
        try:
            registry = load_registry(Path(policies_dir))
            check_can_start_project(registry, username, project_id, Path(extracts_dir))
        except ProjectAccessDenied as exc:
            raise web.HTTPError(exc.status, exc.message) from None
        return 0

    return gate

"""Provisioning as code: reconcile the declared projects (``policies/projects/``) with the system.

The declared state is what ``tre.registry.load_registry`` validates. The applied state is a JSON
file under ``Settings.state_dir/provisioning/`` (written atomically after every change that
succeeds, so a crash loses nothing: the next plan is simply the remaining diff). The hub's
groups and running servers are read live from its REST API, never cached, because the hub is the
truth about them.

``plan`` is a pure function of (declared, applied, hub state, extracts on disk, today);
``apply_plan`` executes a plan step by step, auditing every step.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

import httpx

from tre.registry import Project, ProjectStatus, Registry
from tre.settings import Settings

STATE_VERSION = 1
GROUP_PREFIX = "project-"


class EffectiveStatus(StrEnum):
    """What a project is today: its declared status, narrowed by its dates."""

    active = "active"
    not_started = "not_started"
    expired = "expired"
    suspended = "suspended"
    closed = "closed"
    undeclared = "undeclared"  # its declaration file was removed: treated like closed


def effective_status(project: Project, today: dt.date) -> EffectiveStatus:
    if project.status == ProjectStatus.closed:
        return EffectiveStatus.closed
    if project.status == ProjectStatus.suspended:
        return EffectiveStatus.suspended
    if today > project.end_date:
        return EffectiveStatus.expired
    if today < project.start_date:
        return EffectiveStatus.not_started
    return EffectiveStatus.active


# a project that has ended for good: its workspace is archived, its releases age out
ENDED = frozenset({EffectiveStatus.expired, EffectiveStatus.closed, EffectiveStatus.undeclared})


def ended_on(
    registry: Registry, pid: str, rec: dict[str, Any], today: dt.date
) -> tuple[dt.date, int]:
    """When an ended project ended and how many days its archive is kept. ``rec``: what
    provisioning recorded of it (``AppliedState.projects``), the only word on an undeclared
    project. Closed (or undeclared) before its end date: it ended that day; never after today."""
    project = registry.projects.get(pid)
    meta = rec.get("metadata") or {}
    retention = project.retention_days if project else int(meta.get("retention_days", 0))
    end = project.end_date if project else dt.date.fromisoformat(meta.get("end_date", str(today)))
    since = rec.get("inactive_since")
    if since:
        end = min(end, dt.date.fromisoformat(since))
    return min(end, today), retention


def group_name(project_id: str) -> str:
    return f"{GROUP_PREFIX}{project_id}"


class Action(StrEnum):
    """Every kind of change a plan can hold, in the order they run for one project."""

    create = "create"
    update = "update"
    status = "status"  # active / suspended / closed / expired / ...
    # an active project's extract that holds more than the rules now allow; before its
    # sandboxes are stopped, so that none can start again on it
    withdraw_extract = "withdraw_extract"
    stop_servers = "stop_servers"  # running sandboxes of members who lost access
    hub_revoke = "hub_revoke"  # remove users from the project's hub group
    remove_extract = "remove_extract"
    add_member = "add_member"
    remove_member = "remove_member"
    change_role = "change_role"
    build_extract = "build_extract"
    # running sandboxes still mount the extract the rebuild replaced (see plan)
    hub_group = "hub_group"  # create the project's hub group
    hub_grant = "hub_grant"  # add users to the project's hub group
    forget = "forget"  # an undeclared project with nothing left to undo


ACTION_ORDER = {a: i for i, a in enumerate(Action)}


@dataclass(frozen=True)
class Change:
    project: str
    action: Action
    detail: str
    data: dict[str, Any] = field(default_factory=dict, compare=False)

    def sort_key(self) -> tuple[str, int, str]:
        return (self.project, ACTION_ORDER[self.action], self.detail)


# ---------------------------------------------------------------------------------------------
# Applied state (JSON, atomic writes, one writer at a time)
# ---------------------------------------------------------------------------------------------


def state_path(settings: Settings) -> Path:
    return settings.state_dir / "provisioning" / "applied.json"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@dataclass
class AppliedState:
    """What has been applied, per project id."""

    projects: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> AppliedState:
        if not path.exists():
            return cls()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ProvisionError(f"{path}: the applied state is not valid JSON: {exc}") from exc
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            raise ProvisionError(f"{path}: unknown applied-state format")
        return cls(projects=data.get("projects", {}))

    def save(self, path: Path) -> None:
        body = {"version": STATE_VERSION, "projects": self.projects}
        atomic_write_text(path, json.dumps(body, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def state_lock(settings: Settings) -> Iterator[None]:
    """One apply/enforce at a time: a second one waits rather than interleaving."""
    lock = settings.state_dir / "provisioning" / "apply.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class ProvisionError(RuntimeError):
    """A clear, user-facing provisioning failure."""


# ---------------------------------------------------------------------------------------------
# What a project's extract depends on
# ---------------------------------------------------------------------------------------------


def metadata_of(project: Project) -> dict[str, Any]:
    """The descriptive fields (no effect on data or access, but recorded and shown)."""
    return {
        "title": project.title,
        "lay_summary": project.lay_summary,
        "purpose": project.purpose.value,
        "jurisdiction": project.jurisdiction,
        "institutions": list(project.institutions),
        "start_date": project.start_date.isoformat(),
        "end_date": project.end_date.isoformat(),
        "retention_days": project.retention_days,
    }


def extract_fingerprint(
    registry: Registry, project: Project, today: dt.date, pooled_version: str = ""
) -> str:
    """A digest of everything the extract's content depends on.

    Grants, row filters, purpose and jurisdiction, the sharing conditions of every site (which
    sites are allowed today, embargoes included) and the pooled store's version (a new ingest):
    a change to any of them rebuilds.
    """
    allowed = sorted(s.id for s in registry.sites_for(project, today))
    body = {
        "pooled_version": pooled_version,
        "grants": {t: sorted(c) for t, c in sorted(project.grants.items())},
        "row_filters": project.row_filters.model_dump(mode="json"),
        "purpose": project.purpose.value,
        "jurisdiction": project.jurisdiction,
        "allowed_sites": allowed,
        "site_conditions": {
            s.id: s.model_dump(mode="json") for s in sorted(registry.sites.values(), key=str)
        },
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Collaborators behind protocols: the hub, the extract builder, the audit log
# ---------------------------------------------------------------------------------------------


class Hub(Protocol):
    def group_members(self, name: str) -> set[str] | None: ...
    def create_group(self, name: str) -> None: ...
    def add_to_group(self, name: str, users: list[str]) -> None: ...
    def remove_from_group(self, name: str, users: list[str]) -> None: ...
    def running_servers(self, server_name: str) -> list[str]: ...
    def stop_server(self, user: str, server_name: str) -> None: ...


class HubUnavailable(ProvisionError):
    pass


class HubClient:
    """The JupyterHub REST API with an admin service token (httpx, synchronous)."""

    def __init__(self, api_url: str, token: str, timeout: float = 10.0) -> None:
        self.api_url = api_url.rstrip("/")
        self._client = httpx.Client(
            base_url=self.api_url,
            headers={"Authorization": f"token {token}"},
            timeout=timeout,
            trust_env=False,  # never send provisioning traffic through an outside proxy
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> HubClient:
        token_file = settings.hub_admin_token_file
        if token_file is None or not token_file.exists():
            raise HubUnavailable(f"no hub admin token at {token_file}")
        token = token_file.read_text(encoding="utf-8").strip()
        if not token:
            raise HubUnavailable(f"the hub admin token file {token_file} is empty")
        return cls(settings.hub_api_url or "", token)

    def close(self) -> None:
        self._client.close()

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            resp = self._client.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise HubUnavailable(f"hub API at {self.api_url} unreachable: {exc}") from exc
        if resp.status_code == 403:
            raise ProvisionError(
                f"hub refused {method} {path}: the provisioning token lacks a scope "
                "(needs admin:users, admin:groups, admin:servers)"
            )
        return resp

    def _ok(self, resp: httpx.Response, what: str) -> httpx.Response:
        if resp.status_code >= 400:
            try:
                msg = resp.json().get("message", resp.text)
            except ValueError:
                msg = resp.text
            raise ProvisionError(f"hub: {what} failed ({resp.status_code}): {msg}")
        return resp

    def ping(self) -> None:
        self._ok(self._request("GET", "/"), "API check")

    def group_members(self, name: str) -> set[str] | None:
        resp = self._request("GET", f"/groups/{name}")
        if resp.status_code == 404:
            return None
        return set(self._ok(resp, f"read group {name}").json().get("users", []))

    def list_groups(self) -> list[str]:
        resp = self._ok(self._request("GET", "/groups"), "list groups")
        return [g["name"] for g in resp.json()]

    def ensure_users(self, users: list[str]) -> None:
        for user in users:
            resp = self._request("GET", f"/users/{user}")
            if resp.status_code == 404:
                self._ok(self._request("POST", f"/users/{user}"), f"create user {user}")
            else:
                self._ok(resp, f"read user {user}")

    def create_group(self, name: str) -> None:
        resp = self._request("POST", f"/groups/{name}")
        if resp.status_code != 409:  # already there: fine, applying is idempotent
            self._ok(resp, f"create group {name}")

    def add_to_group(self, name: str, users: list[str]) -> None:
        self.ensure_users(users)
        self._ok(
            self._request("POST", f"/groups/{name}/users", json={"users": users}),
            f"add {users} to {name}",
        )

    def remove_from_group(self, name: str, users: list[str]) -> None:
        self._ok(
            self._request("DELETE", f"/groups/{name}/users", json={"users": users}),
            f"remove {users} from {name}",
        )

    def running_servers(self, server_name: str) -> list[str]:
        """Users with a running (or starting) server of this name."""
        resp = self._ok(self._request("GET", "/users", params={"state": "active"}), "list users")
        return sorted(
            u["name"]
            for u in resp.json()
            if server_name in (u.get("servers") or {})
            and (u["servers"][server_name].get("ready") or u["servers"][server_name].get("pending"))
        )

    def stop_server(self, user: str, server_name: str, wait: float = 60.0) -> None:
        resp = self._request("DELETE", f"/users/{user}/servers/{server_name}")
        if resp.status_code == 404:
            return
        self._ok(resp, f"stop {user}/{server_name}")
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            info = self._ok(self._request("GET", f"/users/{user}"), f"read user {user}").json()
            server = (info.get("servers") or {}).get(server_name)
            if not server or (not server.get("ready") and not server.get("pending")):
                return
            time.sleep(0.2)
        raise ProvisionError(f"hub: server {user}/{server_name} did not stop within {wait:.0f}s")


class ExtractBuilder(Protocol):
    def source_version(self, settings: Settings) -> str: ...
    def build(
        self, settings: Settings, registry: Registry, project_id: str, on: dt.date
    ) -> Path | None: ...
    def path(self, settings: Settings, project_id: str) -> Path: ...
    def exceeds(
        self, settings: Settings, registry: Registry, project_id: str, on: dt.date
    ) -> str | None: ...


class TreExtracts:
    """The real extract builder of ``tre.extract`` (imported lazily: it pulls in DuckDB)."""

    def source_version(self, settings: Settings) -> str:
        """The pooled store's version ('none' before the first ingest)."""
        from tre.pooled import PooledStore, PooledStoreError

        assert settings.pooled_dir is not None
        try:
            with PooledStore(settings.pooled_dir).reader() as con:
                return str(PooledStore.current_version(con, "pooled"))
        except PooledStoreError:
            return "none"

    def build(
        self, settings: Settings, registry: Registry, project_id: str, on: dt.date
    ) -> Path | None:
        from tre.extract import build_extract

        return build_extract(settings, registry, project_id, on)

    def path(self, settings: Settings, project_id: str) -> Path:
        from tre.extract import extract_path

        return extract_path(settings, project_id)

    def exceeds(
        self, settings: Settings, registry: Registry, project_id: str, on: dt.date
    ) -> str | None:
        from tre.extract import extract_exceeds

        return extract_exceeds(settings, registry, project_id, on)


class AuditSink(Protocol):
    def record(self, actor: str, action: str, target: str, details: dict[str, Any]) -> None: ...


class AirlockAudit:
    """Events go to the hash-chained audit log in the airlock database (``tre.audit``).

    Each event is its own transaction: it records a step that has already happened. The
    database is migrated first (idempotent), so provisioning can run before the airlock has.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._factory: Any = None

    def _sessions(self) -> Any:
        if self._factory is None:
            from airlock.service.db import make_engine, session_factory, upgrade

            engine = make_engine(self.settings.airlock_db_url or "", pool_size=2)
            upgrade(engine)
            self._factory = session_factory(engine)
        return self._factory

    def record(self, actor: str, action: str, target: str, details: dict[str, Any]) -> None:
        from airlock.service.db import transaction
        from tre.audit import record_event

        with transaction(self._sessions()) as session:
            record_event(session, actor, action, target, details)


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------


def _members(project: Project) -> dict[str, str]:
    return {m.username: m.role.value for m in project.members}


def plan(
    settings: Settings,
    registry: Registry,
    applied: AppliedState,
    *,
    hub: Hub | None,
    extracts: ExtractBuilder,
    today: dt.date,
) -> list[Change]:
    """The changes that would make the system match the declarations (empty when it does)."""
    changes: list[Change] = []
    pooled_version = extracts.source_version(settings)
    ids = sorted(set(registry.projects) | set(applied.projects))
    for pid in ids:
        project = registry.projects.get(pid)
        rec = applied.projects.get(pid)
        status = effective_status(project, today) if project else EffectiveStatus.undeclared
        active = status == EffectiveStatus.active
        if project is not None and rec is None:
            changes.append(Change(pid, Action.create, project.title))
        if project is not None and rec is not None and rec.get("metadata") != metadata_of(project):
            old = rec.get("metadata") or {}
            new = metadata_of(project)
            diff = sorted(k for k in new if old.get(k) != new[k])
            changes.append(Change(pid, Action.update, ", ".join(diff), {"fields": diff}))
        if (rec or {}).get("status") != status.value:
            if project is not None or rec is not None:
                was = (rec or {}).get("status", "-")
                changes.append(Change(pid, Action.status, f"{was} -> {status.value}"))
        # membership as declared (recorded even while inactive: access follows from the status)
        declared = _members(project) if project else {}
        recorded = (rec or {}).get("members", {})
        for user in sorted(set(declared) - set(recorded)):
            changes.append(
                Change(pid, Action.add_member, f"{user} ({declared[user]})", {"user": user})
            )
        for user in sorted(set(recorded) - set(declared)):
            changes.append(Change(pid, Action.remove_member, user, {"user": user}))
        for user in sorted(set(declared) & set(recorded)):
            if declared[user] != recorded[user]:
                detail = f"{user}: {recorded[user]} -> {declared[user]}"
                changes.append(Change(pid, Action.change_role, detail, {"user": user}))
        # the extract: present and current while active, absent otherwise
        epath = extracts.path(settings, pid)
        narrowed = None
        if active and project is not None:
            fp = extract_fingerprint(registry, project, today, pooled_version)
            # an extract holding more than the rules now allow (a site withdrew, a column was
            # revoked...) goes before it is rebuilt, so a failed rebuild cannot leave it served
            narrowed = extracts.exceeds(settings, registry, pid, today)
            if narrowed:
                changes.append(Change(pid, Action.withdraw_extract, narrowed))
                changes.append(Change(pid, Action.build_extract, "narrowed", {"fingerprint": fp}))
            elif not epath.exists():
                changes.append(Change(pid, Action.build_extract, "missing", {"fingerprint": fp}))
            elif (rec or {}).get("extract_fingerprint") != fp:
                changes.append(
                    Change(pid, Action.build_extract, "declaration changed", {"fingerprint": fp})
                )
        elif epath.exists():
            changes.append(Change(pid, Action.remove_extract, f"project is {status.value}"))
        # the hub: the project's group holds the members while active and nobody otherwise;
        # running servers of anyone without access are stopped.
        if hub is not None:
            gname = group_name(pid)
            want = set(declared) if active else set()
            have = hub.group_members(gname)
            if have is None and (want or project is not None):
                changes.append(Change(pid, Action.hub_group, gname))
            have = have or set()
            if want - have:
                users = sorted(want - have)
                changes.append(Change(pid, Action.hub_grant, ", ".join(users), {"users": users}))
            if have - want:
                users = sorted(have - want)
                changes.append(Change(pid, Action.hub_revoke, ", ".join(users), {"users": users}))
            # a running sandbox keeps the extract it started with (its bind mount holds the
            # old file), so after a narrowing every running sandbox of the project is stopped
            running = [u for u in hub.running_servers(pid) if narrowed or u not in want]
            if running:
                data: dict[str, Any] = {"users": running}
                if narrowed:
                    data["narrowed"] = True
                changes.append(Change(pid, Action.stop_servers, ", ".join(running), data))
        if project is None and rec is not None:
            changes.append(Change(pid, Action.forget, "declaration removed"))
    return sorted(changes, key=Change.sort_key)


# ---------------------------------------------------------------------------------------------
# Applying a plan
# ---------------------------------------------------------------------------------------------


@dataclass
class ApplyResult:
    applied: list[Change] = field(default_factory=list)
    failed: Change | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.failed is None


def _record(applied: AppliedState, change: Change, project: Project | None, today: dt.date) -> None:
    """Update the applied state after ``change`` succeeded."""
    pid = change.project
    if change.action == Action.forget:
        applied.projects.pop(pid, None)
        return
    rec = applied.projects.setdefault(pid, {"members": {}, "status": None, "metadata": None})
    rec["updated_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    if change.action in (Action.create, Action.update) and project is not None:
        rec["metadata"] = metadata_of(project)
    elif change.action == Action.status:
        status = effective_status(project, today) if project else EffectiveStatus.undeclared
        rec["status"] = status.value
        if status != EffectiveStatus.active and not rec.get("inactive_since"):
            rec["inactive_since"] = today.isoformat()
        if status == EffectiveStatus.active:
            rec.pop("inactive_since", None)
    elif change.action in (Action.add_member, Action.change_role) and project is not None:
        user = change.data["user"]
        rec["members"][user] = _members(project)[user]
    elif change.action == Action.remove_member:
        rec["members"].pop(change.data["user"], None)
    elif change.action == Action.build_extract:
        rec["extract_fingerprint"] = change.data["fingerprint"]
    elif change.action in (Action.remove_extract, Action.withdraw_extract):
        rec["extract_fingerprint"] = None


def apply_plan(
    settings: Settings,
    registry: Registry,
    changes: list[Change],
    *,
    hub: Hub | None,
    extracts: ExtractBuilder,
    audit: AuditSink,
    actor: str,
    today: dt.date,
    on_step: Callable[[Change, str | None], None] | None = None,
) -> ApplyResult:
    """Run ``changes`` in order; stop at the first failure (the rest stays in the next plan)."""
    spath = state_path(settings)
    applied = AppliedState.load(spath)
    result = ApplyResult()
    for change in changes:
        project = registry.projects.get(change.project)
        try:
            _execute(settings, registry, change, hub=hub, extracts=extracts, today=today)
        except Exception as exc:  # noqa: BLE001 (reported, audited and stops the apply)
            result.failed, result.error = change, f"{type(exc).__name__}: {exc}"
            audit.record(
                actor,
                f"project.{change.action.value}.failed",
                f"project:{change.project}",
                {"detail": change.detail, "error": result.error},
            )
            if on_step:
                on_step(change, result.error)
            break
        _record(applied, change, project, today)
        applied.save(spath)
        audit.record(
            actor,
            f"project.{change.action.value}",
            f"project:{change.project}",
            {"detail": change.detail, **{k: v for k, v in change.data.items()}},
        )
        result.applied.append(change)
        if on_step:
            on_step(change, None)
    return result


def _execute(
    settings: Settings,
    registry: Registry,
    change: Change,
    *,
    hub: Hub | None,
    extracts: ExtractBuilder,
    today: dt.date,
) -> None:
    pid = change.project
    if change.action == Action.build_extract:
        built = extracts.build(settings, registry, pid, today)
        if built is None or not Path(built).exists():
            raise ProvisionError(f"the extract of {pid} was not built")
    elif change.action in (Action.remove_extract, Action.withdraw_extract):
        path = extracts.path(settings, pid)
        path.unlink(missing_ok=True)
    elif change.action in (Action.hub_group, Action.hub_grant, Action.hub_revoke):
        assert hub is not None
        gname = group_name(pid)
        if change.action == Action.hub_group:
            hub.create_group(gname)
        elif change.action == Action.hub_grant:
            hub.add_to_group(gname, change.data["users"])
        else:
            hub.remove_from_group(gname, change.data["users"])
    elif change.action == Action.stop_servers:
        assert hub is not None
        for user in change.data["users"]:
            hub.stop_server(user, pid)
    # create / update / status / members / forget change only the recorded state


def is_deactivation(change: Change, registry: Registry, today: dt.date) -> bool:
    """Changes that take access away: what ``tre project enforce`` applies without an admin.

    For a project that is no longer active: its status, its running sandboxes, its hub group,
    its extract. For an active one too: the running sandboxes and group membership of people
    the declaration no longer lists (``stop_servers`` and ``hub_revoke`` only ever name users
    who are not declared members, or everyone when the extract is withdrawn): a member removed
    from the file must lose the sandbox and the data it mounts at once, not at the next
    ``apply`` someone remembers to run; and an extract that holds more than the rules allow
    (``withdraw_extract``) goes at once."""
    if change.action == Action.withdraw_extract:
        return True
    project = registry.projects.get(change.project)
    inactive = project is None or effective_status(project, today) != EffectiveStatus.active
    if change.action in {Action.stop_servers, Action.hub_revoke}:
        return True
    return inactive and change.action in {Action.status, Action.remove_extract}


# ---------------------------------------------------------------------------------------------
# The one entry point the CLI, the admin API and the demo call
# ---------------------------------------------------------------------------------------------


def open_hub(settings: Settings) -> tuple[HubClient | None, str | None]:
    """A checked hub client, or None and the reason (the hub part of the plan is skipped)."""
    try:
        client = HubClient.from_settings(settings)
    except HubUnavailable as exc:
        return None, str(exc)
    try:
        client.ping()
    except (HubUnavailable, ProvisionError) as exc:
        client.close()
        return None, str(exc)
    return client, None


@dataclass
class Reconciliation:
    changes: list[Change]
    result: ApplyResult | None  # None for a dry run or an empty plan
    hub_warning: str | None


def reconcile(
    settings: Settings,
    registry: Registry,
    *,
    actor: str,
    dry_run: bool = False,
    use_hub: bool = True,
    audit: AuditSink | None = None,
    extracts: ExtractBuilder | None = None,
    today: dt.date | None = None,
    on_plan: Callable[[list[Change]], None] | None = None,
    on_step: Callable[[Change, str | None], None] | None = None,
) -> Reconciliation:
    """Plan, show (``on_plan``), and unless ``dry_run`` apply, under the state lock."""
    today = today or dt.date.today()
    extracts = extracts or TreExtracts()
    hub, warning = open_hub(settings) if use_hub else (None, "hub sync disabled (--no-hub)")
    try:
        with state_lock(settings):
            applied = AppliedState.load(state_path(settings))
            changes = plan(settings, registry, applied, hub=hub, extracts=extracts, today=today)
            if on_plan:
                on_plan(changes)
            if dry_run or not changes:
                return Reconciliation(changes, None, warning)
            result = apply_plan(
                settings,
                registry,
                changes,
                hub=hub,
                extracts=extracts,
                audit=audit or AirlockAudit(settings),
                actor=actor,
                today=today,
                on_step=on_step,
            )
            return Reconciliation(changes, result, warning)
    finally:
        if hub is not None:
            hub.close()


def policies_stamp(policies_dir: Path) -> tuple:
    """(path, mtime, size) of every ``*.yaml`` below the policies directory: changes whenever a
    declaration does (the airlock's ``LiveRegistry`` and the enforcer's change watch).

    One stat per file, on every call (the airlock asks several times per request), so it
    walks with ``os.scandir`` rather than ``Path.rglob``: a quarter of the CPU (64 vs 240 us
    for the 10 files of the demo declarations; the cost grows with every project declared).
    Symlinked directories are followed, each directory once.
    """
    found: list[tuple[str, int, int]] = []
    pending, seen = [str(policies_dir)], set()
    while pending:
        directory = pending.pop()
        st = os.stat(directory)
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.is_dir():
                    pending.append(entry.path)
                elif entry.name.endswith(".yaml"):
                    st = entry.stat()
                    found.append((entry.path, st.st_mtime_ns, st.st_size))
    return tuple(sorted(found))


class LiveRegistry:
    """The registry, re-read whenever a declaration file changes (a callable for services).

    Long-running services (the airlock) must see what ``apply`` and the admin commands change
    (a suspended project, a removed member) without a restart. Reloading costs a stat of each
    file per call; the parse happens only after a change. If the new declarations are invalid,
    the last valid registry stays in use (and the error is raised once to the caller).
    """

    def __init__(self, policies_dir: Path) -> None:
        self.policies_dir = policies_dir
        self._stamp: tuple | None = None
        self._registry: Registry | None = None

    def _current_stamp(self) -> tuple:
        return policies_stamp(self.policies_dir)

    def __call__(self) -> Registry:
        from tre.registry import load_registry

        stamp = self._current_stamp()
        if stamp != self._stamp or self._registry is None:
            try:
                self._registry = load_registry(self.policies_dir)
            finally:
                self._stamp = stamp
        return self._registry

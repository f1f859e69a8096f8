"""The end date enforces itself: ``tre project enforce`` (run periodically).

For every project that is no longer active (expired, closed, suspended, or whose declaration was
removed): running sandboxes are stopped and its hub group emptied (through the hub REST API), its
extract removed. For every project, active or not, the running sandboxes and hub group
membership of people its declaration no longer lists are taken away too, and the staff groups
(``tre-admins``, which holds the ``tre-admin`` hub role, and ``output-checkers``) lose whoever
``staff.yaml`` no longer lists (see ``revoke_staff_groups``). New starts are refused by the
spawner, which checks the registry too, and the airlock refuses transitions of requests of
inactive projects (``tre.registry.Project.is_active``).
Projects that have ended (expired, closed, undeclared; not merely suspended) also get their
workspace archived as a tar.gz under ``Settings.state_dir/archive`` with a deletion date of
end + ``retention_days``; archives past their date are deleted.

``enforce_loop`` runs a pass every ``enforce_interval_seconds`` (end dates pass by themselves)
and, between passes, within ``enforce_poll_seconds`` of any change to a declaration: access that
ends in policy ends in practice within seconds, whoever edited the file and however.

Each pass also runs the airlock's retention collection (``airlock gc``, ``airlock.retention``)
when it is due: when the last run (its ``airlock_gc`` audit event, whoever ran it) is
``gc_interval_hours`` (``policies/retention.yaml``) old. The audit log is the durable memory, so
a restart neither repeats nor forgets it. A failure of either half is reported and the other
half still runs; a failed collection records no event, so the next pass tries again.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tre.hub.roles import ADMINS_GROUP, CHECKERS_GROUP
from tre.provision import (
    ENDED,
    AppliedState,
    AuditSink,
    Change,
    EffectiveStatus,
    ExtractBuilder,
    Hub,
    apply_plan,
    atomic_write_text,
    effective_status,
    ended_on,
    is_deactivation,
    plan,
    policies_stamp,
    state_lock,
    state_path,
)
from tre.registry import Registry
from tre.settings import Settings

ACTOR = "tre-enforce"


# what a collection removes, in GcReport.counts(); the rest are what it found or kept
GC_REMOVAL_KINDS = (
    "snapshots",
    "orphans",
    "released",
    "released_content",
    "stale_staging",
    "stale_uploads",
    "stale_checks",
)


@dataclass
class GcOutcome:
    """What one pass did about the airlock's retention collection."""

    ran: bool = False
    note: str = ""  # why it did not run (not due, turned off, no airlock yet); not an error
    error: str = ""
    counts: dict[str, int] = field(default_factory=dict)  # GcReport.counts() of the run
    details: dict[str, Any] = field(default_factory=dict)  # its audit event's details
    last_run: dt.datetime | None = None  # the run before (None: never)

    @property
    def removed_something(self) -> bool:
        return self.ran and any(self.counts.get(k) for k in GC_REMOVAL_KINDS)

    def summary(self) -> str:
        if self.error:
            return f"airlock gc failed: {self.error}"
        if not self.ran:
            return f"airlock gc: {self.note}"
        c = self.counts
        text = (
            f"airlock gc: removed {c['snapshots']} snapshot(s) of ended requests and "
            f"{c['orphans']} unreferenced ({c['bytes']} bytes), the released files of "
            f"{c['released']} request(s), {c['stale_staging']} stale release staging dir(s)"
        )
        if c.get("stale_uploads"):
            text += f", {c['stale_uploads']} file(s) a killed snapshot left in snapshots/tmp"
        if c.get("released_content"):
            text += (
                f"; purged the file contents of {c['released_content']} request(s) past"
                " released_content_retention_days"
            )
        if c["finished_from_interrupted_run"]:
            text += f"; finished an interrupted run ({c['finished_from_interrupted_run']} item(s))"
        return text


@dataclass
class EnforceReport:
    changes: list[Change] = field(default_factory=list)
    archived: list[Path] = field(default_factory=list)
    deleted: list[Path] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    gc: GcOutcome | None = None
    # (hub group, users removed from it) by revoke_staff_groups
    staff_revoked: list[tuple[str, list[str]]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def did_something(self) -> bool:
        gc_removed = self.gc is not None and self.gc.removed_something
        return bool(
            self.changes or self.archived or self.deleted or self.staff_revoked or gc_removed
        )


def archive_dir(settings: Settings) -> Path:
    return settings.state_dir / "archive"


def manifest_path(archive: Path) -> Path:
    """``x.tar.gz`` -> ``x.json``."""
    return archive.with_name(archive.name.removesuffix(".tar.gz") + ".json")


class ArchiveError(OSError):
    """The workspace could not be archived or removed (it is kept; the next pass retries)."""


def _run_tool(cmd: list[str], what: str) -> None:
    """GNU tar and rm, not tarfile and shutil.rmtree: both Python walks recurse once per
    directory level (RecursionError past ~1000) and go by path (ENAMETOOLONG past PATH_MAX),
    and a sandbox can nest directories deeper than either; tar and rm walk by descriptor."""
    tool = shutil.which(cmd[0])
    if tool is None:
        raise ArchiveError(f"{cmd[0]} not found: it is needed to {what}")
    done = subprocess.run(  # noqa: S603 - fixed arguments, no shell
        [tool, *cmd[1:]], capture_output=True, env={"LC_ALL": "C", "PATH": "/usr/bin:/bin"}
    )
    if done.returncode != 0:
        err = done.stderr.decode("utf-8", "replace").strip()[-500:]
        raise ArchiveError(f"{what} failed ({cmd[0]} exit {done.returncode}): {err}")


def archive_workspace(
    settings: Settings, pid: str, ended: dt.date, retention_days: int, now: dt.datetime
) -> Path | None:
    """Pack the project's workspace into a tar.gz with a manifest, then remove the workspace.

    The workspace was written by a sandbox: symlinks are archived as links (tar never follows
    them, nor opens a FIFO), sockets are left out, and any depth of directories is archived
    and removed (``tests/test_enforce.py`` attacks all of these)."""
    workspace = settings.workspaces_dir / pid
    if not workspace.exists():
        return None
    dest_dir = archive_dir(settings) / pid
    dest_dir.mkdir(parents=True, exist_ok=True)
    stamp = now.strftime("%Y%m%dT%H%M%S%fZ")
    target = dest_dir / f"{pid}-{stamp}.tar.gz"
    fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=".archive-", suffix=".tmp")
    os.close(fd)
    try:
        _run_tool(
            ["tar", "--create", "--gzip", "--file", tmp, "--directory",
             str(settings.workspaces_dir), "--", pid],
            f"archiving the workspace of {pid}",
        )  # fmt: skip
        digest = hashlib.sha256()
        with open(tmp, "rb") as fh:  # in chunks: a workspace can be bigger than memory
            while chunk := fh.read(1024 * 1024):
                digest.update(chunk)
            os.fsync(fh.fileno())
        manifest = {
            "project": pid,
            "archive": target.name,
            "sha256": digest.hexdigest(),
            "ended_on": ended.isoformat(),
            "retention_days": retention_days,
            "delete_after": (ended + dt.timedelta(days=retention_days)).isoformat(),
            "created_at": now.isoformat(timespec="seconds"),
        }
        # manifest first: a crash before the archive lands leaves a manifest pointing at nothing
        # (purged harmlessly later) and the workspace untouched, so the next pass redoes it
        atomic_write_text(manifest_path(target), json.dumps(manifest, indent=2))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # only now that the archive and its manifest are durable is the workspace removed
    _run_tool(
        ["rm", "-rf", "--one-file-system", "--", str(workspace)],
        f"removing the archived workspace of {pid}",
    )
    return target


def purge_archives(settings: Settings, today: dt.date) -> list[Path]:
    """Delete archives whose deletion date has passed; return what was deleted."""
    deleted: list[Path] = []
    root = archive_dir(settings)
    for mpath in sorted(root.glob("*/*.json")):
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
            delete_after = dt.date.fromisoformat(manifest["delete_after"])
        except (ValueError, KeyError, json.JSONDecodeError):
            continue  # never delete what we cannot read: a human looks at it
        if today > delete_after:
            archive = mpath.parent / manifest["archive"]
            archive.unlink(missing_ok=True)
            mpath.unlink()
            deleted.append(archive)
    return deleted


def _airlock_missing(settings: Settings) -> str:
    """Why there is no airlock to collect yet (fresh install), or "" when there is one."""
    from sqlalchemy.engine import make_url

    url = make_url(settings.airlock_db_url or "")
    if url.get_backend_name() == "sqlite":
        database = url.database or ""
        if database in ("", ":memory:") or not Path(database).is_file():
            return f"skipped: no airlock database yet ({database or 'in memory'})"
    snapshots = (settings.airlock_store_dir or Path()) / "snapshots"
    if not snapshots.is_dir():
        return f"skipped: no airlock snapshot store yet ({snapshots})"
    return ""


def collect_airlock_if_due(
    settings: Settings, registry: Registry, *, now: dt.datetime
) -> GcOutcome:
    """Run the airlock's retention collection if ``gc_interval_hours`` passed since the last
    run (its ``airlock_gc`` audit event). Never raises: a failure is the outcome's ``error``."""
    engine = None
    try:
        # airlock imports tre, and tre uses airlock here: import at call time, as elsewhere
        from sqlalchemy import inspect

        from airlock.retention import (
            RetentionPolicyError,
            collect,
            last_collection,
            load_retention_policy,
        )
        from airlock.service.core import AirlockService
        from airlock.service.db import make_engine

        try:
            policy = load_retention_policy(settings.policies_dir)
        except RetentionPolicyError as exc:
            return GcOutcome(error=f"invalid retention policy: {exc}")
        missing = _airlock_missing(settings)
        if missing:
            return GcOutcome(note=missing)
        engine = make_engine(settings.airlock_db_url or "", pool_size=1)
        tables = inspect(engine)
        if not (tables.has_table("audit_event") and tables.has_table("airlock_request")):
            return GcOutcome(note="skipped: the airlock database is not migrated yet")
        service = AirlockService(settings, engine, registry)
        last = last_collection(service)
        interval = dt.timedelta(hours=policy.gc_interval_hours)
        # abs(): a clock set back by more than the interval must not stop collections for good
        if last is not None and abs(now - last) < interval:
            return GcOutcome(
                note=f"not due (last run {last.isoformat(timespec='seconds')}, next after "
                f"{(last + interval).isoformat(timespec='seconds')})",
                last_run=last,
            )
        report = collect(service, policy, now=now, actor=ACTOR)
        return GcOutcome(ran=True, counts=report.counts(), details=report.details(), last_run=last)
    except Exception as exc:  # noqa: BLE001 (the enforcement pass must go on)
        return GcOutcome(error=f"{type(exc).__name__}: {exc}")
    finally:
        if engine is not None:
            engine.dispose()


def revoke_staff_groups(
    registry: Registry, hub: Hub, audit: AuditSink
) -> list[tuple[str, list[str]]]:
    """Remove from the hub's staff groups whoever ``staff.yaml`` no longer lists; never add.

    The authenticators set these groups at login and lower them at a refresh, but JupyterHub
    refreshes only on a request, at most every ``auth_refresh_age`` (300 s), and never on a
    token-authenticated request of someone the registry no longer knows at all: it keeps the
    stale groups ("Cannot refresh on API requests"). So an admin removed from every role kept
    ``tre-admins``, and with it the ``tre-admin`` role (list users, read servers, stop them), on
    every API token they held, for good (``tests/hub/test_revocation.py``). The hub database is
    where that role lives, so the enforcer takes it away there, through the REST API.

    Only removal: adding someone needs the identity provider's word too (OIDC's two keys),
    which only a login gives."""
    wanted = {
        ADMINS_GROUP: set(registry.staff.admins),
        CHECKERS_GROUP: set(registry.staff.output_checkers),
    }
    revoked: list[tuple[str, list[str]]] = []
    for group, allowed in wanted.items():
        members = hub.group_members(group)
        extra = sorted((members or set()) - allowed)
        if not extra:
            continue
        hub.remove_from_group(group, extra)
        audit.record(ACTOR, "staff.hub_revoke", f"group:{group}", {"users": extra})
        revoked.append((group, extra))
    return revoked


def enforce(
    settings: Settings,
    registry: Registry,
    *,
    hub: Hub | None,
    extracts: ExtractBuilder,
    audit: AuditSink,
    today: dt.date | None = None,
    now: dt.datetime | None = None,
    archive_without_hub: bool = False,
    gc: bool = True,
) -> EnforceReport:
    """One enforcement pass; idempotent (a second pass does nothing), then the airlock's
    retention collection when it is due (``gc=False``: not in this pass).

    A workspace is archived (and removed) only once the hub confirms that no sandbox of the
    project runs; without a hub that happens only if the caller asserts there is none
    (``archive_without_hub``, e.g. ``tre project enforce --no-hub`` on a stopped system).
    An exception in the end-date enforcement is reported in ``errors`` and the collection still
    runs; a failed collection is reported in ``errors`` (and ``gc.error``).
    """
    now = now or dt.datetime.now(dt.UTC)
    # the local date, as everywhere else (the hub's start gate, `apply`, the airlock): with the
    # UTC date, a sandbox on a server east of UTC ran for hours past the project's end date
    today = today or now.astimezone().date()
    report = EnforceReport()
    try:
        _enforce_end_dates(
            settings, registry, report, hub, extracts, audit, today, now, archive_without_hub
        )
    except Exception as exc:  # noqa: BLE001 (reported; the collection below still runs)
        report.errors.append(f"enforcement failed: {type(exc).__name__}: {exc}")
    if hub is not None:
        try:
            report.staff_revoked = revoke_staff_groups(registry, hub, audit)
        except Exception as exc:  # noqa: BLE001 (reported; the collection below still runs)
            report.errors.append(f"staff groups: {type(exc).__name__}: {exc}")
    if gc:
        report.gc = collect_airlock_if_due(settings, registry, now=now)
        if report.gc.error:
            report.errors.append(report.gc.summary())
    else:
        report.gc = GcOutcome(note="skipped (--no-gc)")
    return report


def _enforce_end_dates(
    settings: Settings,
    registry: Registry,
    report: EnforceReport,
    hub: Hub | None,
    extracts: ExtractBuilder,
    audit: AuditSink,
    today: dt.date,
    now: dt.datetime,
    archive_without_hub: bool,
) -> None:
    with state_lock(settings):
        applied = AppliedState.load(state_path(settings))
        changes = [
            c
            for c in plan(settings, registry, applied, hub=hub, extracts=extracts, today=today)
            if is_deactivation(c, registry, today)
        ]
        result = apply_plan(
            settings,
            registry,
            changes,
            hub=hub,
            extracts=extracts,
            audit=audit,
            actor=ACTOR,
            today=today,
        )
        report.changes = result.applied
        if not result.ok:
            report.errors.append(f"{result.failed.project}: {result.error}")  # type: ignore[union-attr]
        applied = AppliedState.load(state_path(settings))
        ids = sorted(set(registry.projects) | set(applied.projects))
        for pid in ids:
            project = registry.projects.get(pid)
            status = effective_status(project, today) if project else EffectiveStatus.undeclared
            if status not in ENDED:
                continue
            if hub is None and not archive_without_hub:
                if (settings.workspaces_dir / pid).exists():
                    report.errors.append(
                        f"{pid}: hub not reachable, cannot rule out a running sandbox; "
                        "workspace not archived (yet)"
                    )
                continue
            if hub is not None and hub.running_servers(pid):
                report.errors.append(f"{pid}: sandboxes still running; workspace not archived")
                continue
            ended, retention = ended_on(registry, pid, applied.projects.get(pid, {}), today)
            try:
                archive = archive_workspace(settings, pid, ended, retention, now)
            except Exception as exc:  # noqa: BLE001 (one workspace must not stop the others)
                report.errors.append(f"{pid}: archiving the workspace failed: {exc}")
                continue
            if archive is not None:
                report.archived.append(archive)
                audit.record(
                    ACTOR,
                    "project.archive_workspace",
                    f"project:{pid}",
                    {"archive": str(archive), "ended_on": ended.isoformat()},
                )
        for gone in purge_archives(settings, today):
            report.deleted.append(gone)
            audit.record(
                ACTOR,
                "project.delete_archive",
                f"project:{gone.parent.name}",
                {"archive": str(gone)},
            )


def _policies_stamp_or_none(settings: Settings) -> tuple | None:
    try:
        return policies_stamp(settings.policies_dir)
    except OSError:  # a directory swapped while we walk it: compare again next time
        return None


def _local_date() -> dt.date:
    return dt.datetime.now().astimezone().date()


def wait_for_next_pass(settings: Settings, stamp: tuple | None, stop: threading.Event) -> None:
    """Return after ``enforce_interval_seconds``, or as soon as a declaration differs from
    ``stamp`` or the local date changes (both checked every ``enforce_poll_seconds``), or when
    ``stop`` is set.

    The interval alone (300 s by default) let a removed member keep their running sandbox, and
    a suspended project its sandboxes and extract, for up to five minutes after the file
    changed; polling a stat of each declaration is cheap (the airlock does it on every
    request), so a change is acted on within seconds. So is midnight: a project whose end date
    has just passed loses its running sandboxes then, not up to an interval later (the hub's
    start gate and the airlock refuse from midnight on their own)."""
    deadline = time.monotonic() + settings.enforce_interval_seconds
    day = _local_date()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or stop.wait(min(settings.enforce_poll_seconds, remaining)):
            return
        if _policies_stamp_or_none(settings) != stamp or _local_date() != day:
            return


def enforce_loop(
    settings: Settings,
    load: Any,
    *,
    extracts: ExtractBuilder,
    audit: AuditSink,
    stop: threading.Event,
    on_report: Any = None,
    use_hub: bool = True,
    gc: bool = True,
) -> None:
    """Run ``enforce`` every ``settings.enforce_interval_seconds``, and within
    ``settings.enforce_poll_seconds`` of a change to the declarations, until ``stop`` is set
    (the airlock's collection runs in the passes where it is due, unless ``gc`` is False).

    ``load`` returns a fresh registry each pass, so edits to the declarations are picked up;
    the hub is connected afresh each pass too (it may start after us, or restart).
    """
    from tre.provision import open_hub

    while not stop.is_set():
        # taken before the registry is read: an edit during the pass triggers another one
        stamp = _policies_stamp_or_none(settings)
        hub, warning = open_hub(settings) if use_hub else (None, None)
        try:
            report = enforce(settings, load(), hub=hub, extracts=extracts, audit=audit, gc=gc)
            if warning:
                report.errors.append(f"hub not reachable, sandboxes not checked: {warning}")
        except Exception as exc:  # noqa: BLE001 (a periodic job reports and carries on)
            report = EnforceReport(errors=[f"{type(exc).__name__}: {exc}"])
        finally:
            if hub is not None:
                hub.close()
        if on_report is not None:
            on_report(report)
        wait_for_next_pass(settings, stamp, stop)

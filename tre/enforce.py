"""The end date enforces itself: ``tre project enforce`` (run periodically).

For every project that is no longer active (expired, closed, suspended, or whose declaration was
removed): running sandboxes are stopped and its hub group emptied (through the hub REST API), its
extract removed. New starts are refused by the spawner, which checks the registry too, and the
airlock refuses transitions of requests of inactive projects (``tre.registry.Project.is_active``).
Projects that have ended (expired, closed, undeclared; not merely suspended) also get their
workspace archived as a tar.gz under ``Settings.state_dir/archive`` with a deletion date of
end + ``retention_days``; archives past their date are deleted.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tre.provision import (
    AppliedState,
    AuditSink,
    Change,
    EffectiveStatus,
    ExtractBuilder,
    Hub,
    apply_plan,
    atomic_write_text,
    effective_status,
    is_deactivation,
    plan,
    state_lock,
    state_path,
)
from tre.registry import Registry
from tre.settings import Settings

ENDED = {EffectiveStatus.expired, EffectiveStatus.closed, EffectiveStatus.undeclared}
ACTOR = "tre-enforce"


@dataclass
class EnforceReport:
    changes: list[Change] = field(default_factory=list)
    archived: list[Path] = field(default_factory=list)
    deleted: list[Path] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def did_something(self) -> bool:
        return bool(self.changes or self.archived or self.deleted)


def archive_dir(settings: Settings) -> Path:
    return settings.state_dir / "archive"


def _ended_on(
    settings: Settings, registry: Registry, pid: str, rec: dict[str, Any], today: dt.date
) -> tuple[dt.date, int]:
    """When the project ended and how many days its archive is kept."""
    project = registry.projects.get(pid)
    meta = rec.get("metadata") or {}
    retention = project.retention_days if project else int(meta.get("retention_days", 0))
    end = project.end_date if project else dt.date.fromisoformat(meta.get("end_date", str(today)))
    since = rec.get("inactive_since")
    if since:  # closed (or undeclared) before its end date: retention counts from then
        end = min(end, dt.date.fromisoformat(since))
    return min(end, today), retention


def manifest_path(archive: Path) -> Path:
    """``x.tar.gz`` -> ``x.json``."""
    return archive.with_name(archive.name.removesuffix(".tar.gz") + ".json")


def archive_workspace(
    settings: Settings, pid: str, ended: dt.date, retention_days: int, now: dt.datetime
) -> Path | None:
    """Pack the project's workspace into a tar.gz with a manifest, then remove the workspace."""
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
        # symlinks are stored as links (never followed), so nothing outside the workspace enters
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(workspace, arcname=pid, recursive=True)
        digest = hashlib.sha256(Path(tmp).read_bytes()).hexdigest()
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        manifest = {
            "project": pid,
            "archive": target.name,
            "sha256": digest,
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
    shutil.rmtree(workspace)
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


def enforce(
    settings: Settings,
    registry: Registry,
    *,
    hub: Hub | None,
    extracts: ExtractBuilder,
    audit: AuditSink,
    today: dt.date | None = None,
    now: dt.datetime | None = None,
) -> EnforceReport:
    """One enforcement pass; idempotent (a second pass does nothing)."""
    now = now or dt.datetime.now(dt.UTC)
    today = today or now.date()
    report = EnforceReport()
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
            if hub is not None and hub.running_servers(pid):
                report.errors.append(f"{pid}: sandboxes still running; workspace not archived")
                continue
            ended, retention = _ended_on(
                settings, registry, pid, applied.projects.get(pid, {}), today
            )
            try:
                archive = archive_workspace(settings, pid, ended, retention, now)
            except OSError as exc:
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
    return report


def enforce_loop(
    settings: Settings,
    load: Any,
    *,
    hub: Hub | None,
    extracts: ExtractBuilder,
    audit: AuditSink,
    stop: threading.Event,
    on_report: Any = None,
) -> None:
    """Run ``enforce`` every ``settings.enforce_interval_seconds`` until ``stop`` is set.

    ``load`` returns a fresh registry each pass, so edits to the declarations are picked up.
    """
    while not stop.is_set():
        try:
            report = enforce(settings, load(), hub=hub, extracts=extracts, audit=audit)
        except Exception as exc:  # noqa: BLE001 (a periodic job reports and carries on)
            report = EnforceReport(errors=[f"{type(exc).__name__}: {exc}"])
        if on_report is not None:
            on_report(report)
        stop.wait(settings.enforce_interval_seconds)

"""Retention: what the airlock deletes, and when (``policies/retention.yaml``; ``airlock gc``).

1. Snapshots that no request can still release are removed from the snapshot store
   ``snapshot_retention_days`` after the last request or file referring to them ended without
   release (the request rejected or withdrawn; the file withdrawn or replaced). A snapshot is
   content-addressed, so one blob can serve several requests: it is kept while ANY of them
   could still release it (every state but rejected and withdrawn, file not withdrawn) or has
   released it. Blobs no row refers to at all (a request refused for a bad file after its
   first snapshots) go after the same period, counted from the blob's mtime.
2. Released files of a project that has ended (expired or closed) stay downloadable for
   ``released_grace_days`` after its end, then downloads answer 410 and ``airlock gc`` deletes
   ``released/<request>``, and with it any copy of it a retried release set aside as corrupt
   (``released/.corrupt-<request>-*``: never served, but holding the same bytes).
3. The file contents of a released request, its snapshots and ``released/<request>``, are
   removed ``released_content_retention_days`` after its release (``null``: never), with any
   ``released/.corrupt-<request>-*`` copy. Its record
   stays: the request, its files (names, sizes, sha256), votes, the release manifest and the
   audit log. One ``release_content_purge`` audit event per request says what was removed and
   why; from then on its downloads, previews and snapshots answer 410 for that request, even
   where another request still needs the same bytes (that blob is then kept for the other).
4. Staging directories of releases that never finished (``released/.staging/*``, and
   ``released/.staging-*`` of the layout before staging moved under ``.staging/``) are removed
   once nothing in them changed for ``STALE_STAGING_SECONDS``; they are never served. A release
   in progress owns a fresh one.

The TRE's expiry enforcer (``tre project enforce``) runs a collection when the last one (the last
``airlock_gc`` audit event, ``last_collection``) is ``gc_interval_hours`` old.

Crash safety. Snapshots are stored, and the rows that refer to them committed, under a shared
lock on the store (``FileSystemStore.pinned``); the collector holds it exclusively
(``collecting``) from reading the references to moving the blobs away, so no blob it saw
unreferenced can gain a reference before it is gone (content already stored is referenced again
by a new request without a new write). Removal is two-phase: blobs and released directories are
first renamed into a trash directory of the run (atomic, same filesystem), then the run's one
audit event commits, then the trash is deleted. A kill before the commit leaves only trash that
no request needs (new requests write the content again under ``objects/``); the next run
deletes it and names it in its own event (``finished_from_interrupted_run``); trash a live run
is still deleting (it holds a ``flock`` on it, ``_claim``) is neither named nor deleted. A kill
at any point never removes a blob a request could still release, or has released and still
keeps. Everything a run removes goes through its trash (stale staging directories and uploads
too), so each removal is counted by one run. Trash that cannot be deleted stays there: the run
records an ``airlock_gc_incomplete`` event naming each path and raises ``GcIncomplete``
(``airlock gc`` exits 1); the next run retries it.

The purge of a released request's content is recorded first: its ``release_content_purge``
event commits (under the lock) before any of its blobs or released copies is moved into the
trash, so no content goes without a record. The event is also what says "purged" (to the
pages, the downloads and the next run), so a kill after it leaves a request whose content is
refused and partly still on disk; the next run removes what is left (its blobs no longer count
as released, its ``released/<request>`` is moved away) and names it in its own ``airlock_gc``
event. A kill before it changes nothing.
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import select

from airlock.release import staging_root
from airlock.service.models import Release, ReleaseRequest, RequestFile
from airlock.storage import claim_stale_check_dirs, fsync_dir, held_dir
from airlock.workflow import State
from tre.audit import AuditEvent, record_event
from tre.registry import Problem, validate_file

if TYPE_CHECKING:
    from airlock.service.core import AirlockService

log = logging.getLogger("airlock.retention")

RETENTION_FILE = "retention.yaml"
# requests in these states can never release anything (final, not released)
ENDED_UNRELEASED = frozenset({State.REJECTED.value, State.WITHDRAWN.value})
TRASH = "trash"  # under the snapshot store and under the released store
GC_ACTION = "airlock_gc"  # the audit action of a run: one event per run, dry runs record none
# the audit action of the removal of a released request's content: one per request, ever
PURGE_ACTION = "release_content_purge"
# a run whose trash could not all be deleted: what is left and why (the next run retries it)
INCOMPLETE_ACTION = "airlock_gc_incomplete"
MAX_RELEASED_CONTENT_DAYS = 36500
NULL_FIELD = "released_content_retention_days"  # the one period where null means "forever"
# a staging directory nothing was written to for this long belongs to no running release (the
# same safety age as the extract builder's temporaries, tre/extract.py)
STALE_STAGING_SECONDS = 3600


class RetentionPolicy(BaseModel):
    """``policies/retention.yaml``: how long the airlock keeps what it no longer needs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    snapshot_retention_days: int = Field(
        ge=1,
        le=3650,
        strict=True,
        description="Days after the last request or file referring to a snapshot ended without "
        "release (rejected, withdrawn, file withdrawn or replaced) before `airlock gc` removes "
        "the snapshot; snapshots a request could still release are never removed, released ones "
        "only under `released_content_retention_days`.",
    )
    released_grace_days: int = Field(
        ge=0,
        le=3650,
        strict=True,
        description="Days after a project ended (expired or closed) during which its released "
        "files stay downloadable; then downloads answer 410 and `airlock gc` deletes them.",
    )
    released_content_retention_days: int | None = Field(
        ge=1,
        le=MAX_RELEASED_CONTENT_DAYS,
        strict=True,
        description="Days after its release before `airlock gc` removes the file contents of a "
        "released request (its snapshots and released copies; a blob another request still "
        "needs is kept for that one), keeping its record (names, sizes, sha256, reviews, the "
        "audit log); downloads then answer 410. `null` keeps released contents forever. "
        "Required: a deployment states its choice.",
    )
    gc_interval_hours: int = Field(
        default=24,
        ge=1,
        le=720,
        strict=True,
        description="How often the expiry enforcer (`tre project enforce`) runs the collection: "
        "when the last `airlock_gc` audit event (its own run or an admin's `airlock gc`) is this "
        "many hours old. Checked on each enforcer pass (`enforce_interval_seconds`).",
    )

    # strict: YAML's `yes`/`true`, `2.5` or `"90"` are refused, never read as 1, 2 or 90 days
    @field_validator("released_content_retention_days", mode="before")
    @classmethod
    def _days_not_text(cls, value: object) -> object:
        if isinstance(value, str):
            raise ValueError(
                f"a whole number of days (1-{MAX_RELEASED_CONTENT_DAYS}), or null to keep"
                f" released contents forever; not the text {value[:40]!r}"
            )
        return value

    @field_validator(
        "snapshot_retention_days", "released_grace_days", "gc_interval_hours", mode="before"
    )
    @classmethod
    def _number_not_text(cls, value: object) -> object:
        if isinstance(value, str):
            raise ValueError(f"a whole number, not the text {value[:40]!r}")
        return value


class GcIncomplete(RuntimeError):
    """The run decided and recorded everything, but some of its trash could not be deleted:
    it stays in the trash (the next run deletes it, naming it as an interrupted run's)."""

    def __init__(self, report: GcReport, store_dir: Path) -> None:
        self.report = report
        listed = "; ".join(
            f"{store_dir / item['path']}: {item['error']}" for item in report.not_deleted
        )
        super().__init__(
            f"could not delete {len(report.not_deleted)} item(s) of run {report.run} (left in"
            f" the trash; the next run retries them): {listed}"
        )


class RetentionPolicyError(ValueError):
    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def _blank_fields(path: Path) -> list[str]:
    """Top-level keys written with no value at all (``released_content_retention_days:``).
    YAML reads a blank as null, which for ``released_content_retention_days`` means "keep
    forever": a value deleted by mistake must not silently mean that, so only an explicit
    ``null`` (or ``~``) does."""
    try:
        node = yaml.compose(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        return []  # validate_file names the syntax error
    if not isinstance(node, yaml.MappingNode):
        return []
    return [
        str(key.value)
        for key, value in node.value
        if isinstance(key, yaml.ScalarNode)
        and isinstance(value, yaml.ScalarNode)
        and value.tag == "tag:yaml.org,2002:null"
        and value.value == ""  # no text at all: `null` and `~` are explicit
    ]


def retention_problems(policies_dir: Path) -> tuple[RetentionPolicy | None, list[Problem]]:
    path = policies_dir / RETENTION_FILE
    if not path.exists():
        return None, [Problem(path, "", "missing: the airlock retention policy is required")]
    forever = " of days, or `null` to keep released contents forever"
    blank = [
        Problem(
            path,
            name,
            f"has no value: write a whole number{forever if name == NULL_FIELD else ''}"
            " (an empty value is refused, never read as null)",
        )
        for name in _blank_fields(path)
    ]
    if blank:
        return None, blank
    return validate_file(RetentionPolicy, path)


def load_retention_policy(policies_dir: Path) -> RetentionPolicy:
    policy, problems = retention_problems(policies_dir)
    if policy is None:
        raise RetentionPolicyError(problems)
    return policy


# --- released files after a project's end ---------------------------------------------------


def project_ended_on(service: AirlockService, project_id: str, today: dt.date) -> dt.date | None:
    """The day the project ended (expired or closed; undeclared if provisioning recorded it),
    or None while it has not (active, suspended, not started) or the day is unknown."""
    from tre.provision import (
        ENDED,
        AppliedState,
        EffectiveStatus,
        effective_status,
        ended_on,
        state_path,
    )

    project = service.registry.projects.get(project_id)
    status = effective_status(project, today) if project else EffectiveStatus.undeclared
    if status not in ENDED:
        return None
    rec = AppliedState.load(state_path(service.settings)).projects.get(project_id)
    if project is None and rec is None:
        return None  # never provisioned here, nothing says when: keep
    # the same rule as the workspace archives (tre/enforce.py): the declared end date, or the
    # day provisioning saw the project close if earlier; never later than today
    ended, _ = ended_on(service.registry, project_id, rec or {}, today)
    return ended


def released_expiry(
    service: AirlockService, policy: RetentionPolicy, project_id: str, today: dt.date
) -> dt.date | None:
    """Last day the project's released files may be downloaded (None: no limit yet)."""
    ended = project_ended_on(service, project_id, today)
    if ended is None:
        return None
    return ended + dt.timedelta(days=policy.released_grace_days)


# --- the collector --------------------------------------------------------------------------


@dataclass
class GcReport:
    dry_run: bool
    snapshot_retention_days: int
    released_grace_days: int
    released_content_retention_days: int | None = None
    # removed (or, in a dry run, to be removed)
    snapshots: list[dict[str, Any]] = field(default_factory=list)
    orphans: list[dict[str, Any]] = field(default_factory=list)
    released: list[dict[str, Any]] = field(default_factory=list)
    finished_from_interrupted_run: list[str] = field(default_factory=list)
    # staging directories of releases that never finished (path under released/, last change)
    stale_staging: list[dict[str, Any]] = field(default_factory=list)
    # files a snapshot being stored left in snapshots/tmp when its process died (name, size)
    stale_uploads: list[dict[str, Any]] = field(default_factory=list)
    # working directories of disclosure checks whose process was killed (name, files, bytes)
    stale_checks: list[dict[str, Any]] = field(default_factory=list)
    # snapshots an ended request refers to, kept because another request still needs them
    kept_shared: list[str] = field(default_factory=list)
    # released requests whose file contents this run purges (released_content_retention_days);
    # each also gets its own release_content_purge event
    released_content: list[dict[str, Any]] = field(default_factory=list)
    # the run's id (its trash directories' name); None in a dry run
    run: str | None = None
    # what the run decided to delete but could not (path under the store, error); also in an
    # airlock_gc_incomplete event: it stays in the trash and the next run retries it
    not_deleted: list[dict[str, str]] = field(default_factory=list)

    def details(self) -> dict[str, Any]:
        return {
            "snapshot_retention_days": self.snapshot_retention_days,
            "released_grace_days": self.released_grace_days,
            "released_content_retention_days": self.released_content_retention_days,
            "snapshots": self.snapshots,
            "orphans": self.orphans,
            "released": self.released,
            "stale_staging": self.stale_staging,
            "stale_uploads": self.stale_uploads,
            "stale_checks": self.stale_checks,
            "finished_from_interrupted_run": self.finished_from_interrupted_run,
            "kept_shared": self.kept_shared,
            "released_content": self.released_content,
            "gc_run": self.run,  # links a later airlock_gc_incomplete event to this run
        }

    def counts(self) -> dict[str, int]:
        """How much the run removed (or would remove), per kind."""
        return {
            "snapshots": len(self.snapshots),
            "orphans": len(self.orphans),
            "bytes": sum(s["size"] for s in self.snapshots + self.orphans),
            "released": len(self.released),
            "released_content": len(self.released_content),
            "stale_staging": len(self.stale_staging),
            "stale_uploads": len(self.stale_uploads),
            "stale_checks": len(self.stale_checks),
            "finished_from_interrupted_run": len(self.finished_from_interrupted_run),
            "kept_shared": len(self.kept_shared),
        }


def _aware(value: dt.datetime) -> dt.datetime:
    # SQLite returns naive datetimes: they were written in UTC
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def _snapshot_plan(
    service: AirlockService, cutoff: dt.datetime, report: GcReport, purged: set[str]
) -> tuple[list[str], set[str]]:
    """(shas to remove, every sha any row refers to). The files of the released requests in
    ``purged`` (content purged, or being purged by this run) keep nothing: their blobs go now
    unless another request still needs them."""
    with service.factory() as session:
        rows = session.execute(
            select(
                RequestFile.id,
                RequestFile.request_id,
                RequestFile.sha256,
                RequestFile.size,
                RequestFile.withdrawn_round,
                ReleaseRequest.state,
                ReleaseRequest.updated_at,
            ).join(ReleaseRequest, ReleaseRequest.id == RequestFile.request_id)
        ).all()
        # when a file was withdrawn or replaced: the audit log is where that time is kept
        withdrawn_at: dict[str, dt.datetime] = {}
        for target, ts in session.execute(
            select(AuditEvent.target, AuditEvent.ts).where(
                AuditEvent.action.in_(("file_withdraw", "file_replace"))
            )
        ):
            withdrawn_at[target] = dt.datetime.fromisoformat(ts)
    live: set[str] = set()
    ended: dict[str, dt.datetime] = {}  # sha -> when its last reference ended
    requests: dict[str, set[str]] = {}
    sizes: dict[str, int] = {}
    only_purged: set[str] = set()  # shas a purged released request refers to
    for fid, rid, sha, size, withdrawn_round, state, updated_at in rows:
        sizes[sha] = size
        requests.setdefault(sha, set()).add(rid)
        if withdrawn_round is None and state == State.RELEASED.value and rid in purged:
            only_purged.add(sha)
            continue
        if withdrawn_round is None and state not in ENDED_UNRELEASED:
            live.add(sha)  # could still be released, or was
            continue
        # a final request's updated_at is when it ended (every transition sets it); a file
        # withdrawn without a recorded time counts from that too (later, so on the safe side)
        when = _aware(updated_at)
        if withdrawn_round is not None and f"file:{fid}" in withdrawn_at:
            when = withdrawn_at[f"file:{fid}"]
        ended[sha] = max(when, ended.get(sha, when))
    # a purged request's blob: no end to wait for (the retention of released content has
    # passed); another request's reference decides as usual
    far_past = dt.datetime.min.replace(tzinfo=dt.UTC)
    for sha in only_purged - set(ended):
        ended[sha] = far_past
    removable = []
    for sha, when in sorted(ended.items()):
        if sha in live:
            report.kept_shared.append(sha)
        elif when <= cutoff and service.store.exists(sha):
            removable.append(sha)
            report.snapshots.append(
                {"sha256": sha, "size": sizes[sha], "requests": sorted(requests[sha])}
            )
    return removable, set(sizes)


def _released_plan(
    service: AirlockService,
    policy: RetentionPolicy,
    today: dt.date,
    report: GcReport,
    set_aside: dict[str, list[str]],
) -> list[str]:
    with service.factory() as session:
        released = session.execute(
            select(ReleaseRequest.id, ReleaseRequest.project).where(
                ReleaseRequest.state == State.RELEASED.value
            )
        ).all()
    expiry: dict[str, dt.date | None] = {}
    due = []
    for rid, project in released:
        if project not in expiry:
            expiry[project] = released_expiry(service, policy, project, today)
        last_day = expiry[project]
        directory = service.released_root / rid
        aside = set_aside.get(rid, [])
        if last_day is not None and today > last_day and (directory.exists() or aside):
            due.append(rid)
            report.released.append(
                {
                    "request": rid,
                    "project": project,
                    "downloadable_until": last_day.isoformat(),
                    "reason": "project_ended",
                    "set_aside": aside,
                }
            )
    return due


def set_aside_copies(released_root: Path) -> dict[str, list[str]]:
    """request id -> names of the copies of ``released/<request>`` a retried release set aside
    because they failed verification (``released/.corrupt-<request>-<8 hex>``,
    airlock/release.py): never served, but they hold the request's released bytes, so they go
    with its released copy. One listing of ``released/`` per run."""
    found: dict[str, list[str]] = {}
    if not released_root.is_dir():
        return found
    for path in sorted(released_root.glob(".corrupt-*-*")):
        if path.is_dir() and not path.is_symlink():
            rid = path.name.removeprefix(".corrupt-").rsplit("-", 1)[0]
            found.setdefault(rid, []).append(path.name)
    return found


def purged_requests(session: Any) -> dict[str, dt.datetime]:
    """Released requests whose file contents were purged, and when (their purge events)."""
    return {
        target.removeprefix("request:"): dt.datetime.fromisoformat(ts)
        for target, ts in session.execute(
            select(AuditEvent.target, AuditEvent.ts).where(AuditEvent.action == PURGE_ACTION)
        )
    }


def content_purge(session: Any, request_id: str) -> tuple[dt.datetime, dict[str, Any]] | None:
    """When, and with what details, the released request's file contents were purged."""
    row = session.execute(
        select(AuditEvent.ts, AuditEvent.details)
        .where(AuditEvent.target == f"request:{request_id}", AuditEvent.action == PURGE_ACTION)
        .limit(1)
    ).first()
    return (dt.datetime.fromisoformat(row[0]), json.loads(row[1])) if row else None


def _retention_reason(days: int, released_at: str) -> str:
    return (
        f"under the retention policy: released outputs are kept {days} days after their release"
        f" (released {released_at[:10]}); the record of what was released (names, sizes,"
        " sha256, reviews) is kept"
    )


def purge_message(purge: tuple[dt.datetime, dict[str, Any]]) -> str:
    """What a page or a download says about a purged request."""
    at, details = purge
    return (
        f"the file contents of this request were removed on {at.date().isoformat()} "
        + _retention_reason(details["released_content_retention_days"], details["released_at"])
    )


def content_expired(released_at: dt.datetime, days: int | None, now: dt.datetime) -> bool:
    """Whether a release is past ``released_content_retention_days`` at ``now``: the one rule
    of the collector (which purges it) and of the downloads and previews (which refuse it from
    that moment, whether or not a collection ran since). None keeps it forever."""
    return days is not None and _aware(released_at) <= now - dt.timedelta(days=days)


def expired_message(released_at: dt.datetime, days: int) -> str:
    """What a page or a download says about a release past its period that no run purged yet
    (the same reason as after the purge)."""
    return "the file contents of this request are no longer available " + _retention_reason(
        days, _aware(released_at).isoformat()
    )


def _purge_plan(
    service: AirlockService, policy: RetentionPolicy, now: dt.datetime, report: GcReport
) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """(every released request whose content is purged, before or by this run, with its
    project; the purges this run makes: one ``release_content_purge`` event each)."""
    days = policy.released_content_retention_days
    with service.factory() as session:
        done = set(purged_requests(session))
        rows = session.execute(
            select(
                Release.request_id,
                Release.released_at,
                Release.manifest_json,
                ReleaseRequest.project,
            )
            .join(ReleaseRequest, ReleaseRequest.id == Release.request_id)
            .where(ReleaseRequest.state == State.RELEASED.value)
            .order_by(Release.released_at, Release.request_id)
        ).all()
    purged = {rid: project for rid, _at, _m, project in rows if rid in done}
    if days is None:
        return purged, []
    due = []
    for rid, released_at, manifest, project in rows:
        released_at = _aware(released_at)
        if rid in done or not content_expired(released_at, days, now):
            continue
        files = [
            {"id": f["file_id"], "path": f["path"], "sha256": f["sha256"], "size": f["size"]}
            for f in json.loads(manifest)
        ]
        due.append(
            {
                "request": rid,
                "project": project,
                "released_at": released_at.isoformat(),
                "released_content_retention_days": days,
                "reason": f"released more than {days} days ago"
                " (released_content_retention_days, policies/retention.yaml)",
                "files": files,
            }
        )
    report.released_content = due
    return {**purged, **{d["request"]: d["project"] for d in due}}, due


def _newest_change(directory: Path) -> float:
    """The latest mtime of the directory or anything in it (a file being copied into it changes
    its own mtime, not the directory's). Links are not followed."""
    newest = directory.lstat().st_mtime
    for parent, dirs, files in os.walk(directory):
        for name in dirs + files:
            try:
                newest = max(newest, os.lstat(os.path.join(parent, name)).st_mtime)
            except FileNotFoundError:
                pass
    return newest


def _stale_staging_plan(service: AirlockService, report: GcReport) -> list[Path]:
    """Staging directories of releases that never finished and that nothing was written to for
    STALE_STAGING_SECONDS. Measured against the real clock, never the run's ``now`` (a test may
    pretend it is later): a release running right now owns its fresh directory."""
    root = service.released_root
    if not root.is_dir():
        return []
    candidates = list(root.glob(".staging-*"))  # the layout before staging moved to .staging/
    staging = staging_root(root)
    if staging.is_dir() and not staging.is_symlink():
        candidates += list(staging.iterdir())
    threshold = time.time() - STALE_STAGING_SECONDS
    stale = []
    for path in sorted(candidates):
        try:
            if path.is_symlink() or not path.is_dir():
                continue  # not a staging directory: someone else's, leave it
            changed = _newest_change(path)
        except FileNotFoundError:
            continue  # its release finished, or its retry removed it
        if changed <= threshold:
            stale.append(path)
            report.stale_staging.append(
                {
                    "path": str(path.relative_to(root)),
                    "last_changed": dt.datetime.fromtimestamp(changed, dt.UTC).isoformat(
                        timespec="seconds"
                    ),
                }
            )
    return stale


def _stale_uploads_plan(service: AirlockService, report: GcReport) -> list[Path]:
    """Partial or whole copies of workspace files that a snapshot being stored left in
    ``snapshots/tmp`` (``put-*``) when its process was killed: no blob, no request, never
    served, but the bytes of a file. Nothing stores under the collector's exclusive lock; the
    real-clock age of STALE_STAGING_SECONDS is a second guard, as for staging directories."""
    threshold = time.time() - STALE_STAGING_SECONDS
    stale = []
    for path in sorted(service.store.tmp.glob("put-*")):
        try:
            st = path.lstat()
        except FileNotFoundError:
            continue
        if path.is_file() and not path.is_symlink() and st.st_mtime <= threshold:
            stale.append(path)
            report.stale_uploads.append({"name": path.name, "size": st.st_size})
    return stale


def last_collection(service: AirlockService) -> dt.datetime | None:
    """When the last collection (by anyone) committed: its ``airlock_gc`` audit event."""
    with service.factory() as session:
        ts = session.execute(
            select(AuditEvent.ts)
            .where(AuditEvent.action == GC_ACTION)
            .order_by(AuditEvent.seq.desc())
            .limit(1)
        ).scalar_one_or_none()
    return dt.datetime.fromisoformat(ts) if ts else None


def _trash_dirs(service: AirlockService) -> Iterator[Path]:
    for root in (service.store.root / TRASH, service.released_root / f".{TRASH}"):
        if root.is_dir():
            yield from sorted(p for p in root.iterdir() if p.is_dir())


def _claim(path: Path) -> int | None:
    """An exclusive ``flock`` on a run's trash directory, held by the run deleting it until it
    is gone (the deletion happens after the store lock is let go). None if a live run holds it
    (or it is gone): another run then neither names it as an interrupted run's nor deletes it.
    A killed run's lock goes with its process, so its trash is claimed by the next run."""
    return held_dir(path)


def _hold(run: Path, claims: list[int]) -> None:
    """Claim this run's own new trash directory. Made under the store lock, so no other run
    holds it; a dry run (which takes no store lock) may be listing it for a moment: wait."""
    fd = os.open(run, os.O_RDONLY | os.O_DIRECTORY)
    claims.append(fd)
    fcntl.flock(fd, fcntl.LOCK_EX)


def _leftovers(service: AirlockService, report: GcReport, claims: list[int]) -> list[Path]:
    """Trash directories of interrupted runs (claimed: their fds go into ``claims``)."""
    runs = []
    for run in _trash_dirs(service):
        fd = _claim(run)
        if fd is None:
            continue
        claims.append(fd)
        try:
            names = sorted(p.name for p in run.iterdir())
        except FileNotFoundError:
            continue  # its own run finished deleting it just before the claim
        runs.append(run)
        report.finished_from_interrupted_run += names
    return runs


def _size(path: Path) -> int:
    try:
        return path.lstat().st_size
    except FileNotFoundError:
        return 0


def _delete_trash(service: AirlockService, runs: list[Path], report: GcReport) -> None:
    """Delete the trash directories ``runs``; what cannot be deleted goes into
    ``report.not_deleted`` (path under the store, error), never silently ignored."""
    store_dir = service.settings.airlock_store_dir
    assert store_dir is not None

    def failed(_func: Callable[..., Any], path: str, exc_info: Any) -> None:
        exc = exc_info[1]
        if isinstance(exc, FileNotFoundError):
            return  # gone already
        if isinstance(exc, OSError) and exc.errno == errno.ENOTEMPTY:
            return  # a directory holding what could not be deleted: that is named itself
        where = Path(path)
        report.not_deleted.append(
            {
                "path": str(where.relative_to(store_dir))
                if where.is_relative_to(store_dir)
                else str(where),
                "error": f"{type(exc).__name__}: {getattr(exc, 'strerror', None) or exc}",
            }
        )

    for run in runs:
        if run.exists():
            shutil.rmtree(run, onerror=failed)


def collect(
    service: AirlockService,
    policy: RetentionPolicy,
    *,
    now: dt.datetime | None = None,
    dry_run: bool = False,
    actor: str = "airlock-gc",
    on_step: Callable[[str, str], None] | None = None,
) -> GcReport:
    """One collection run (see the module docstring); a dry run changes nothing.

    ``on_step(kind, what)`` is called after each step that changes something (the crash test
    kills the process there)."""
    step = on_step or (lambda _kind, _what: None)
    now = now or dt.datetime.now(dt.UTC)
    report = GcReport(
        dry_run,
        policy.snapshot_retention_days,
        policy.released_grace_days,
        policy.released_content_retention_days,
    )
    claims: list[int] = []  # flocks on trash directories this run deletes (_claim)
    try:
        return _collect(service, policy, now, dry_run, actor, step, report, claims)
    finally:
        for fd in claims:
            os.close(fd)


def _collect(
    service: AirlockService,
    policy: RetentionPolicy,
    now: dt.datetime,
    dry_run: bool,
    actor: str,
    step: Callable[[str, str], None],
    report: GcReport,
    claims: list[int],
) -> GcReport:
    store = service.store
    cutoff = now - dt.timedelta(days=policy.snapshot_retention_days)
    with nullcontext() if dry_run else store.collecting():
        leftovers = _leftovers(service, report, claims)
        purged, purges = _purge_plan(service, policy, now, report)
        removable, referenced = _snapshot_plan(service, cutoff, report, set(purged))
        for sha, st in store.blobs():
            mtime = dt.datetime.fromtimestamp(st.st_mtime, dt.UTC)
            if sha not in referenced and mtime <= cutoff:
                removable.append(sha)
                report.orphans.append({"sha256": sha, "size": st.st_size})
        set_aside = set_aside_copies(service.released_root)
        due = _released_plan(service, policy, now.date(), report, set_aside)
        for rid in sorted(set(purged) - set(due)):
            aside = set_aside.get(rid, [])
            if (service.released_root / rid).exists() or aside:
                due.append(rid)
                report.released.append(
                    {
                        "request": rid,
                        "project": purged[rid],
                        "downloadable_until": None,  # purged: not downloadable at all
                        "reason": "released_content_purged",
                        "set_aside": aside,
                    }
                )
        going = set(removable)
        for purge in purges:
            shas = {f["sha256"] for f in purge["files"]}
            purge["snapshots_removed"] = sorted(shas & going)
            purge["snapshots_kept_shared"] = sorted(
                s for s in shas - going if service.store.exists(s)
            )
        stale_staging = _stale_staging_plan(service, report)
        stale_uploads = _stale_uploads_plan(service, report)
        # held (flock) from here until deleted: a check running in any worker holds its own
        stale_checks = claim_stale_check_dirs(service.checking_dir, claims)
        for path in stale_checks:
            files = [Path(d, f) for d, _, names in os.walk(path) for f in names]
            report.stale_checks.append(
                {"name": path.name, "files": len(files), "bytes": sum(_size(f) for f in files)}
            )
        if dry_run:
            return report
        run_id = f"gc-{now.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        if purges:
            # recorded before anything of theirs moves: no content goes without its record,
            # and from this commit on the pages, downloads and later runs treat it as purged
            with service.factory() as session, session.begin():
                for purge in purges:
                    details = {k: v for k, v in purge.items() if k != "request"}
                    record_event(
                        session,
                        actor,
                        PURGE_ACTION,
                        f"request:{purge['request']}",
                        {**details, "gc_run": run_id},
                    )
                step("purge", run_id)
            step("purged", run_id)
        report.run = run_id
        snapshot_trash = store.root / TRASH / run_id
        released_trash = service.released_root / f".{TRASH}" / run_id
        if removable or stale_uploads:
            snapshot_trash.mkdir(parents=True)
            _hold(snapshot_trash, claims)
            for sha in removable:
                os.rename(store.path(sha), snapshot_trash / sha)
                fsync_dir(store.path(sha).parent)
                step("trashed", sha)
            # moved away under the lock like the rest, so a run that starts once this one lets
            # go of the lock neither sees them again nor counts them twice
            for upload in stale_uploads:
                os.rename(upload, snapshot_trash / upload.name)
                fsync_dir(upload.parent)
                step("trashed", upload.name)
        if due or stale_staging:
            released_trash.mkdir(parents=True)
            _hold(released_trash, claims)
            for entry in report.released:
                for name in [entry["request"], *entry["set_aside"]]:
                    if name == entry["request"] and not (service.released_root / name).exists():
                        continue  # only set-aside copies were left
                    os.rename(service.released_root / name, released_trash / name)
                    fsync_dir(service.released_root)
                    step("trashed", name)
            for staging in stale_staging:
                os.rename(staging, released_trash / f"staging.{staging.name}")
                fsync_dir(staging.parent)
                step("trashed", staging.name)
        # the one event of the run, committed before anything is deleted for good
        with service.factory() as session, session.begin():
            record_event(session, actor, GC_ACTION, "airlock:store", report.details())
            step("commit", run_id)
        step("committed", run_id)
    # outside the lock: the trash is no request's, and deleting it may take long
    _delete_trash(service, [*leftovers, snapshot_trash, released_trash, *stale_checks], report)
    if report.not_deleted:
        # recorded, logged and raised (exit 1): the decision stands (its events are
        # committed), the bytes are still on disk until a run deletes them
        with service.factory() as session, session.begin():
            record_event(
                session,
                actor,
                INCOMPLETE_ACTION,
                "airlock:store",
                {"gc_run": run_id, "not_deleted": report.not_deleted},
            )
        error = GcIncomplete(report, service.settings.airlock_store_dir)
        log.error("airlock gc: %s", error)
        step("deleted", run_id)
        raise error
    step("deleted", run_id)
    return report

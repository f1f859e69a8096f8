"""Release: copy an approved request's snapshots to the released store, atomically and idempotently.

One database transaction holds the request's row lock for the whole release:
1. the files are copied into a fresh staging directory (under ``released/.staging``), each
   fsynced and verified against its sha256, with a manifest;
2. the staging directory is renamed to ``released/<request id>`` (one atomic rename);
3. the request moves to ``released`` with a ``Release`` row and its audit events; commit.
A crash before (2) leaves only a staging directory (removed by the retry); a crash between (2)
and (3) leaves a directory nobody can download from, because downloads need the ``released``
state; the retry verifies that directory and commits. So at every moment either nothing is
released or everything is, and retrying completes it. Only files still active in the request
and approved by two distinct eligible checkers in the current round are ever copied.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from airlock.service.models import Release, ReleaseRequest, RequestFile, Vote
from airlock.storage import FileSystemStore, fsync_dir, sha256_file
from airlock.workflow import Action, State, TransitionError, next_state
from tre.audit import record_event

StepHook = Callable[[str, str], None]


class ReleaseError(RuntimeError):
    """The release cannot proceed (invariant broken, snapshot missing or corrupt)."""


@dataclass(frozen=True)
class ReleasedFile:
    file_id: int
    group: str
    path: str
    sha256: str
    size: int

    @property
    def relative(self) -> str:
        return f"{self.file_id}/{self.path.rsplit('/', 1)[-1]}"


def approved_files(req: ReleaseRequest, votes: list[Vote], checkers: set[str]) -> list[RequestFile]:
    """Active files with approve votes from two distinct eligible checkers this round.

    Raises ReleaseError if any active file lacks them: the last line of defence of the rule
    "nothing leaves without two approvals by distinct checkers, neither of them the author".
    """
    files = req.active_files()
    if not files:
        raise ReleaseError("the request has no files to release")
    for f in files:
        approvers = {
            v.reviewer
            for v in votes
            if v.file_id == f.id and v.round == req.round and v.decision == "approve"
        }
        approvers = {a for a in approvers if a != req.author and a in checkers}
        if len(approvers) < 2:
            raise ReleaseError(f"file {f.path} does not have two approvals by distinct checkers")
    return files


def released_dir(released_root: Path, request_id: str) -> Path:
    return released_root / request_id


def staging_root(released_root: Path) -> Path:
    """Where releases are staged before their atomic rename (same file system)."""
    return released_root / ".staging"


def _manifest(files: list[ReleasedFile]) -> str:
    return json.dumps([f.__dict__ for f in files], sort_keys=True, indent=1)


def verify_released(directory: Path, files: list[ReleasedFile]) -> bool:
    if not (directory / "manifest.json").is_file():
        return False
    if (directory / "manifest.json").read_text() != _manifest(files):
        return False
    return all(
        (directory / f.relative).is_file() and sha256_file(directory / f.relative) == f.sha256
        for f in files
    )


def _stage(
    store: FileSystemStore,
    released_root: Path,
    request_id: str,
    files: list[ReleasedFile],
    on_step: StepHook,
) -> Path:
    staging = staging_root(released_root) / f"{request_id}-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)  # no fsync: until the rename below it is garbage after a crash
    for f in files:
        target = staging / f.relative
        target.parent.mkdir(parents=True, exist_ok=True)
        src = store.path(f.sha256)
        if not src.is_file():
            raise ReleaseError(f"snapshot of {f.path} is missing from the store")
        with open(src, "rb") as fin, open(target, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1024 * 1024)
            fout.flush()
            os.fsync(fout.fileno())
        if sha256_file(target) != f.sha256:
            raise ReleaseError(f"copy of {f.path} does not match its sha256")
        fsync_dir(target.parent)
        on_step("copied", f.path)
    with open(staging / "manifest.json", "w", encoding="utf-8") as manifest:
        manifest.write(_manifest(files))
        manifest.flush()
        os.fsync(manifest.fileno())  # served after the commit: it must survive a crash too
    fsync_dir(staging)
    return staging


def release_request(
    factory: sessionmaker[Session],
    store: FileSystemStore,
    released_root: Path,
    request_id: str,
    actor: str,
    checkers: set[str],
    on_step: StepHook | None = None,
) -> bool:
    """Release ``request_id``; True if this call released it, False if it already was."""
    step = on_step or (lambda _kind, _what: None)
    released_root.mkdir(parents=True, exist_ok=True)
    with factory() as session, session.begin():
        req = session.execute(
            select(ReleaseRequest).where(ReleaseRequest.id == request_id).with_for_update()
        ).scalar_one_or_none()
        if req is None:
            raise ReleaseError(f"no request {request_id}")
        if req.state == State.RELEASED:
            return False
        target_state = next_state(req.state, Action.RELEASE)  # TransitionError unless approved
        votes = list(session.execute(select(Vote).where(Vote.request_id == req.id)).scalars())
        files = [
            ReleasedFile(f.id, f.group, f.path, f.sha256, f.size)
            for f in approved_files(req, votes, checkers)
        ]
        # a previous attempt crashed: its staging directories are garbage (they live apart
        # from the released directories, so finding them does not list every release ever made)
        for stale in staging_root(released_root).glob(f"{request_id}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        final = released_dir(released_root, request_id)
        if final.exists() and not verify_released(final, files):
            # never serve a directory that does not match the approved snapshots
            shutil.move(final, released_root / f".corrupt-{request_id}-{uuid.uuid4().hex[:8]}")
        if not final.exists():
            staging = _stage(store, released_root, request_id, files, step)
            os.rename(staging, final)
            fsync_dir(released_root)
            step("renamed", str(final))
        session.add(Release(request_id=req.id, released_by=actor, manifest_json=_manifest(files)))
        previous = req.state
        req.state = target_state
        record_event(
            session,
            actor,
            "state_change",
            f"request:{req.id}",
            {"from": previous, "to": target_state.value, "transition": Action.RELEASE.value},
        )
        record_event(
            session,
            actor,
            "release",
            f"request:{req.id}",
            {"files": [{"id": f.file_id, "path": f.path, "sha256": f.sha256} for f in files]},
        )
        step("commit", req.id)
    step("committed", request_id)
    return True


__all__ = ["ReleaseError", "TransitionError", "release_request", "approved_files"]

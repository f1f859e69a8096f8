"""Release is atomic and idempotent: a real subprocess killed (SIGKILL) at every step of a
release leaves either nothing released or everything released, and retrying completes it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from airlock.release import released_dir
from airlock.service.core import AirlockService, Conflict, FileSpec
from airlock.storage import sha256_file
from tre.registry import load_registry

WORKER = Path(__file__).with_name("release_worker.py")
FILES = ["outputs/table.csv"]
# copied x3, renamed, commit (inside the transaction), committed
STEPS = len(FILES) + 3


def failing_hook(kind: str, what: str) -> None:
    raise OSError("simulated failure: leave the request approved")


def approved_request(tre_settings, db) -> tuple[AirlockService, str, dict[int, bytes]]:
    service = AirlockService(
        tre_settings, db.engine, load_registry(tre_settings.policies_dir), failing_hook
    )
    alice = service.who("alice")
    rid = service.create_request(alice, "wilms-outcomes", [FileSpec(p, "g") for p in FILES])
    service.submit(alice, rid)
    view = service.view(alice, rid)
    ws = tre_settings.workspaces_dir / "wilms-outcomes"
    expected = {f["id"]: (ws / f["path"]).read_bytes() for f in view["files"]}
    for fid in expected:
        service.vote(service.who("checker1"), rid, fid, "approve")
        service.vote(service.who("checker2"), rid, fid, "approve")
    assert service.view(alice, rid)["state"] == "approved"  # the release itself failed
    assert not released_dir(service.released_root, rid).exists()
    return service, rid, expected


def assert_all_or_nothing(service, rid, expected) -> str:
    alice = service.who("alice")
    state = service.view(alice, rid)["state"]
    final = released_dir(service.released_root, rid)
    if state == "approved":
        for fid in expected:
            with pytest.raises(Conflict):
                service.download(alice, rid, fid)
    else:
        assert state == "released"
        for fid, data in expected.items():
            path, _ = service.download(alice, rid, fid)
            assert path.read_bytes() == data
    if final.exists():  # never a half-filled released directory
        files = [p for p in final.rglob("*") if p.is_file() and p.name != "manifest.json"]
        assert len(files) == len(expected)
    return state


@pytest.mark.slow
def test_kill_9_at_every_step_then_retry(tre_settings, db):
    seen_states = set()
    for stop_at in range(STEPS):
        service, rid, expected = approved_request(tre_settings, db)
        proc = subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                db.url,
                db.schema or "",
                str(tre_settings.state_dir),
                str(tre_settings.policies_dir),
                rid,
                str(stop_at),
            ],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        line = proc.stdout.readline()
        assert line.startswith("AT "), line
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        seen_states.add(assert_all_or_nothing(service, rid, expected))
        # retrying completes it, exactly once
        service.release_hook = None
        service.release_now("checker2", rid)
        assert assert_all_or_nothing(service, rid, expected) == "released"
        assert service.release_now("checker2", rid) is False
        shas = {f["id"]: f["sha256"] for f in service.view(service.who("bob"), rid)["files"]}
        for fid in expected:
            path, _ = service.download(service.who("bob"), rid, fid)
            assert sha256_file(path) == shas[fid]
        assert not list((service.released_root / ".staging").glob("*"))
    # the kill after the commit left it released; every earlier kill left nothing
    assert seen_states == {"approved", "released"}


def test_corrupt_snapshot_is_never_released(tre_settings, db):
    service, rid, expected = approved_request(tre_settings, db)
    fid = next(iter(expected))
    sha = service.view(service.who("alice"), rid)["files"][0]["sha256"]
    blob = service.store.path(sha)
    os.chmod(blob, 0o644)
    blob.write_bytes(b"tampered")
    service.release_hook = None
    from airlock.release import ReleaseError

    with pytest.raises(ReleaseError):
        service.release_now("checker1", rid)
    assert service.view(service.who("alice"), rid)["state"] == "approved"
    assert not released_dir(service.released_root, rid).exists()
    with pytest.raises(Conflict):
        service.download(service.who("alice"), rid, fid)


def test_service_start_completes_interrupted_releases(tre_settings, db):
    service, rid, expected = approved_request(tre_settings, db)
    service.release_hook = None
    assert service.complete_pending_releases() == [rid]  # what `airlock serve` runs on start
    assert assert_all_or_nothing(service, rid, expected) == "released"
    assert service.complete_pending_releases() == []

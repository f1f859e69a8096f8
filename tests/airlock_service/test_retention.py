"""Retention (``airlock gc``, policies/retention.yaml), on SQLite and PostgreSQL: snapshots only
ended requests refer to go after the retention period, never one a request could still release
or released, content shared between requests is kept while any needs it, a kill at any point
loses no needed snapshot, and released files of an ended project go after the grace period
(downloads answer 410)."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select, update
from typer.testing import CliRunner

from airlock import retention
from airlock.retention import RetentionPolicy, collect, load_retention_policy
from airlock.service.core import FileSpec, Gone
from airlock.service.models import Release, ReleaseRequest
from airlock.storage import sha256_file
from tre.audit import AuditEvent, verify_chain
from tre.provision import AppliedState, state_path

P = "wilms-outcomes"
POLICY = RetentionPolicy(
    snapshot_retention_days=30, released_grace_days=60, released_content_retention_days=None
)
NOW = dt.datetime.now(dt.UTC)


def write(service, name: str, text: str) -> str:
    """A workspace file of project P with ``text``; returns its path."""
    path = service.settings.workspaces_dir / P / "outputs" / name
    path.write_text(text)
    return f"outputs/{name}"


def request(service, *paths: str, submit: bool = True) -> tuple[str, list[int]]:
    alice = service.who("alice")
    rid = service.create_request(alice, P, [FileSpec(p, "g") for p in paths])
    if submit:
        service.submit(alice, rid)
    return rid, [f["id"] for f in service.view(alice, rid)["files"]]


def sha_of(service, rid: str, fid: int) -> str:
    return next(
        f["sha256"] for f in service.view(service.who("alice"), rid)["files"] if f["id"] == fid
    )


def review(service, rid: str, fids: list[int], decision: str = "approve") -> str:
    state = ""
    for name in ("checker1", "checker2"):
        for fid in fids:
            state = service.vote(service.who(name), rid, fid, decision, comment="c")
    return state


def age(service, rid: str, days: float) -> None:
    """Pretend the request's last transition happened ``days`` before NOW."""
    with service.factory() as s, s.begin():
        s.execute(
            update(ReleaseRequest)
            .where(ReleaseRequest.id == rid)
            .values(updated_at=NOW - dt.timedelta(days=days))
        )


def gc_events(service) -> list[dict]:
    with service.factory() as s:
        rows = s.execute(select(AuditEvent).where(AuditEvent.action == "airlock_gc")).scalars()
        return [json.loads(e.details) for e in rows]


def ended_and_live(service):
    """Requests in every kind of end, each with content of its own, plus live ones."""
    made = {}
    rid, [fid] = request(service, write(service, "rejected.csv", "group,count\nr,11\n"))
    assert review(service, rid, [fid], "reject") == "reviewed"
    service.decide(service.who("checker1"), rid, "reject", "identifiable")
    made["rejected"] = sha_of(service, rid, fid)
    rid, [fid] = request(service, write(service, "withdrawn.csv", "group,count\nw,12\n"))
    service.withdraw(service.who("alice"), rid)
    made["withdrawn"] = sha_of(service, rid, fid)
    # a file withdrawn from a request that goes on (and is released with its other file)
    rid, [gone, kept] = request(
        service,
        write(service, "dropped.csv", "group,count\nd,13\n"),
        write(service, "released.csv", "group,count\nk,14\n"),
        submit=False,
    )
    service.withdraw_file(service.who("alice"), rid, gone)
    service.submit(service.who("alice"), rid)
    assert review(service, rid, [kept]) == "released"
    made["file_withdrawn"], made["released"] = (
        sha_of(service, rid, gone),
        sha_of(service, rid, kept),
    )
    for state in ("pending", "submitted"):  # live: could still be released
        rid, [fid] = request(
            service, write(service, f"{state}.csv", f"group,count\n{state},15\n"), submit=False
        )
        if state == "submitted":
            service.submit(service.who("alice"), rid)
        made[state] = sha_of(service, rid, fid)
    rid, [fid] = request(service, write(service, "approved.csv", "group,count\na,16\n"))
    made["reviewed"] = sha_of(service, rid, fid)
    review(service, rid, [fid], "request_changes")
    rid, [fid] = request(service, write(service, "returned.csv", "group,count\nt,17\n"))
    made["returned"] = sha_of(service, rid, fid)
    review(service, rid, [fid], "request_changes")
    service.decide(service.who("checker1"), rid, "return", "round it")
    return made


def test_only_snapshots_of_ended_requests_go_and_only_after_the_period(service):
    made = ended_and_live(service)
    ended = {made["rejected"], made["withdrawn"], made["file_withdrawn"]}
    # within the period: nothing goes, even with every end far in the past for the live ones
    report = collect(service, POLICY, now=NOW + dt.timedelta(days=29))
    assert report.snapshots == [] and report.orphans == []
    assert all(service.store.exists(s) for s in made.values())
    # after it: exactly the ended ones
    report = collect(service, POLICY, now=NOW + dt.timedelta(days=31))
    assert {s["sha256"] for s in report.snapshots} == ended
    for what, sha in made.items():
        assert service.store.exists(sha) == (sha not in ended), what
    # one event for the run, naming what it removed; the chain still verifies
    first, second = gc_events(service)
    assert first["snapshots"] == []  # the run within the period is audited too
    assert {s["sha256"] for s in second["snapshots"]} == ended
    assert second["snapshot_retention_days"] == 30
    with service.factory() as s:
        assert verify_chain(s) == []
    # a second run removes nothing more
    assert collect(service, POLICY, now=NOW + dt.timedelta(days=32)).snapshots == []


def test_a_removed_snapshot_answers_gone_and_the_released_one_still_downloads(service):
    made = ended_and_live(service)
    collect(service, POLICY, now=NOW + dt.timedelta(days=31))
    alice = service.who("alice")
    rows = [r for r in service.list_requests(alice)]
    for r in rows:
        for f in service.view(alice, r["id"])["files"]:
            if f["sha256"] in (made["rejected"], made["withdrawn"], made["file_withdrawn"]):
                with pytest.raises(Gone):
                    service.snapshot_path(alice, r["id"], f["id"])
            elif f["active"] and r["state"] == "released":
                path, _ = service.download(service.who("bob"), r["id"], f["id"])
                assert sha256_file(path) == f["sha256"] == made["released"]


def test_shared_content_is_kept_while_any_request_needs_it(service):
    path = write(service, "shared.csv", "group,count\ns,21\n")
    first, [f1] = request(service, path)
    second, [f2] = request(service, path)
    sha = sha_of(service, first, f1)
    assert sha == sha_of(service, second, f2)  # one blob for both
    service.withdraw(service.who("alice"), first)
    age(service, first, 100)
    report = collect(service, POLICY, now=NOW)
    assert sha in report.kept_shared and service.store.exists(sha)
    # the second ends too, recently: the period counts from the LAST end
    service.withdraw(service.who("alice"), second)
    age(service, second, 10)
    assert collect(service, POLICY, now=NOW).snapshots == []
    assert service.store.exists(sha)
    age(service, second, 31)
    report = collect(service, POLICY, now=NOW)
    assert report.snapshots == [{"sha256": sha, "size": 17, "requests": sorted([first, second])}]
    assert not service.store.exists(sha)
    # the same content submitted again is stored again, and its request can be released
    third, [f3] = request(service, path)
    assert service.store.verify(sha)
    assert review(service, third, [f3]) == "released"


def test_a_released_snapshot_is_kept_even_if_another_request_with_it_ended(service):
    path = write(service, "both.csv", "group,count\nb,22\n")
    rid, [fid] = request(service, path)
    assert review(service, rid, [fid]) == "released"
    other, _ = request(service, path)
    service.withdraw(service.who("alice"), other)
    age(service, other, 365)
    age(service, rid, 365)
    report = collect(service, POLICY, now=NOW)
    assert report.snapshots == [] and service.store.verify(sha_of(service, rid, fid))


def test_unreferenced_blobs_go_after_the_period_from_their_mtime(service):
    old_sha, _ = service.store.put_stream(io.BytesIO(b"left by a refused request"), 1000)
    new_sha, _ = service.store.put_stream(io.BytesIO(b"just stored"), 1000)
    past = (NOW - dt.timedelta(days=31)).timestamp()
    os.utime(service.store.path(old_sha), (past, past))
    report = collect(service, POLICY, now=NOW)
    assert report.orphans == [{"sha256": old_sha, "size": 25}]
    assert not service.store.exists(old_sha) and service.store.exists(new_sha)


def test_dry_run_changes_nothing(service):
    made = ended_and_live(service)
    events = gc_events(service)
    plan = collect(service, POLICY, now=NOW + dt.timedelta(days=31), dry_run=True)
    assert {s["sha256"] for s in plan.snapshots} == {
        made["rejected"],
        made["withdrawn"],
        made["file_withdrawn"],
    }
    assert all(service.store.exists(s) for s in made.values())
    assert gc_events(service) == events
    done = collect(service, POLICY, now=NOW + dt.timedelta(days=31))
    assert done.snapshots == plan.snapshots


class Killed(BaseException):
    """Stands for SIGKILL: nothing of the collector runs after it (locks and the transaction
    are released as the kernel and the database do for a dead process)."""


@pytest.mark.parametrize("step", range(5))
def test_a_kill_at_any_step_loses_no_needed_snapshot(service, monkeypatch, step):
    made = ended_and_live(service)
    needed = {made[k] for k in ("released", "pending", "submitted", "reviewed", "returned")}
    ended = {made[k] for k in ("rejected", "withdrawn", "file_withdrawn")}
    # the steps: three renames into the trash, the audit event, the deletion of the trash
    calls = {"n": 0}
    real_rename, real_record, real_rmtree = (
        os.rename,
        retention.record_event,
        retention.shutil.rmtree,
    )

    def hit(real):
        def wrapped(*args, **kwargs):
            if calls["n"] == step:
                raise Killed()
            calls["n"] += 1
            return real(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(retention.os, "rename", hit(real_rename))
    monkeypatch.setattr(retention, "record_event", hit(real_record))
    monkeypatch.setattr(retention.shutil, "rmtree", hit(real_rmtree))
    later = NOW + dt.timedelta(days=31)
    with pytest.raises(Killed):
        collect(service, POLICY, now=later)
    assert all(service.store.verify(s) for s in needed)
    monkeypatch.undo()
    trash = service.store.root / "trash"
    in_trash = {p.name for p in trash.rglob("*") if p.is_file()} if trash.exists() else set()
    assert in_trash <= ended
    # meanwhile, requests go on: the same content as a removed snapshot is stored again
    again, [fid] = request(service, write(service, "rejected.csv", "group,count\nr,11\n"))
    assert service.store.verify(made["rejected"])
    # the next run completes the work and names what the killed run left
    report = collect(service, POLICY, now=later)
    assert all(service.store.verify(s) for s in needed | {made["rejected"]})
    assert not any(service.store.exists(s) for s in ended - {made["rejected"]})
    assert not (service.store.root / "trash").exists() or not any(
        (service.store.root / "trash").iterdir()
    )
    assert set(report.finished_from_interrupted_run) == in_trash
    if step > 0:  # killed after a rename: the next run finished (and named) that work
        assert in_trash
    audited = set()
    for event in gc_events(service):
        audited |= {s["sha256"] for s in event["snapshots"]}
        audited |= set(event["finished_from_interrupted_run"])
    # everything ever removed is in the audit log
    assert in_trash | {s["sha256"] for s in report.snapshots} <= audited
    assert review(service, again, [fid]) == "released"
    with service.factory() as s:
        assert verify_chain(s) == []


def test_collector_waits_for_a_snapshot_until_its_request_commits(service, monkeypatch):
    """Content shared with an ended request, stored again by a new request: the collector
    cannot remove the blob between the snapshot and the commit of the new request's rows."""
    path = write(service, "again.csv", "group,count\nx,23\n")
    old, [fid] = request(service, path)
    sha = sha_of(service, old, fid)
    service.withdraw(service.who("alice"), old)
    age(service, old, 100)
    real_snapshot = service.snapshot
    runs: list = []

    def snapshot_then_collect(project, spec):
        snap = real_snapshot(project, spec)  # the blob exists, the new row is not committed
        t = threading.Thread(target=lambda: runs.append(collect(service, POLICY, now=NOW)))
        t.start()
        time.sleep(0.5)
        assert t.is_alive(), "the collector did not wait for the pinned snapshot"
        runs.append(t)
        return snap

    monkeypatch.setattr(service, "snapshot", snapshot_then_collect)
    new, [new_fid] = request(service, path)
    runs[0].join(30)
    report = runs[1]
    assert report.snapshots == [] and sha in report.kept_shared
    monkeypatch.undo()
    assert service.store.verify(sha)
    assert review(service, new, [new_fid]) == "released"


# --- released files after the project's end --------------------------------------------------


def released_request(service) -> tuple[str, int]:
    rid, [fid] = request(service, write(service, "out.csv", "group,count\no,24\n"))
    assert review(service, rid, [fid]) == "released"
    return rid, fid


def end_project(service, days_ago: int, closed: bool = False) -> None:
    """End project P ``days_ago`` days ago: by its end date, or closed on that day (as
    provisioning records it) with its end date still ahead."""
    today = dt.date.today()
    project = service.registry.projects[P]
    if closed:
        changed = project.model_copy(update={"status": "closed"})
        applied = AppliedState(
            {P: {"inactive_since": (today - dt.timedelta(days=days_ago)).isoformat()}}
        )
        applied.save(state_path(service.settings))
    else:
        end = today - dt.timedelta(days=days_ago)
        changed = project.model_copy(
            update={"start_date": end - dt.timedelta(days=400), "end_date": end}
        )
    service.registry.projects[P] = changed


def policy_file(service, **values) -> None:
    path = service.settings.policies_dir / "retention.yaml"
    data = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**data, **values}))


@pytest.mark.parametrize("closed", [False, True])
def test_released_files_stay_for_the_grace_period_then_410_and_deleted(service, closed):
    policy_file(service, released_grace_days=60)
    policy = load_retention_policy(service.settings.policies_dir)
    rid, fid = released_request(service)
    end_project(service, days_ago=59, closed=closed)
    bob = service.who("bob")
    assert P not in bob.projects and P in bob.ended_projects
    path, _ = service.download(bob, rid, fid)  # within the grace period: still downloadable
    report = collect(service, policy)
    assert report.released == [] and (service.released_root / rid).exists()
    end_project(service, days_ago=61, closed=closed)
    with pytest.raises(Gone, match="downloaded until"):  # past it: 410, even before gc ran
        service.download(bob, rid, fid)
    report = collect(service, policy)
    assert [r["request"] for r in report.released] == [rid]
    assert not (service.released_root / rid).exists()
    with pytest.raises(Gone):
        service.download(bob, rid, fid)
    [event] = [e for e in gc_events(service) if e["released"]]
    assert event["released"][0]["request"] == rid
    # the released snapshot itself is kept (never removed once released)
    assert service.store.verify(sha_of(service, rid, fid))
    with service.factory() as s:
        assert verify_chain(s) == []


def test_suspended_or_active_projects_keep_their_released_files(service):
    rid, fid = released_request(service)
    policy = RetentionPolicy(
        snapshot_retention_days=1, released_grace_days=0, released_content_retention_days=None
    )
    project = service.registry.projects[P]
    service.registry.projects[P] = project.model_copy(update={"status": "suspended"})
    assert collect(service, policy, now=NOW + dt.timedelta(days=3650)).released == []
    assert (service.released_root / rid).exists()


def test_former_members_of_an_ended_project_can_only_read(service):
    rid, fid = released_request(service)
    pending, [pfid] = request(service, "notes.txt", submit=False)
    end_project(service, days_ago=1)
    alice = service.who("alice")
    assert service.view(alice, rid)["permissions"]["download"] is True
    assert {r["id"] for r in service.list_requests(alice)} >= {rid, pending}
    assert service.list_requests(service.who("carol")) == []
    view = service.view(alice, pending)["permissions"]
    assert not (view["edit"] or view["submit"] or view["withdraw"])
    # a sandbox of the ended project gets nothing, a non-member nothing either
    from airlock.permissions import PermissionDenied
    from airlock.service.core import NotFound

    with pytest.raises((PermissionDenied, NotFound)):
        service.download(service.who("alice", P), rid, fid)
    with pytest.raises(NotFound):
        service.download(service.who("carol"), rid, fid)


# --- staging directories of releases that never finished --------------------------------------


def backdate(path: Path, seconds: float) -> None:
    """Set the mtime of ``path`` and of everything in it ``seconds`` in the past (links are
    changed themselves, not followed)."""
    when = time.time() - seconds
    for parent, dirs, files in os.walk(path, topdown=False):
        for name in dirs + files:
            os.utime(os.path.join(parent, name), (when, when), follow_symlinks=False)
    os.utime(path, (when, when), follow_symlinks=False)


def tree(root: Path) -> set[str]:
    """Every path under ``root`` (links listed, not followed)."""
    found = set()
    for parent, dirs, files in os.walk(root):
        for name in dirs + files:
            found.add(str(Path(parent, name).relative_to(root)))
    return found


def test_stale_release_staging_goes_fresh_staging_and_everything_else_stays(
    service, monkeypatch, tmp_path
):
    released_rid, released_fid = released_request(service)
    root = service.released_root

    # a release that crashed after copying its file; its request is never retried
    def crash(kind, _what):
        if kind == "copied":
            raise OSError("simulated crash while staging")

    service.release_hook = crash
    crashed, [crashed_fid] = request(service, write(service, "crash.csv", "group,count\nc,26\n"))
    assert review(service, crashed, [crashed_fid]) == "approved"
    [crashed_staging] = (root / ".staging").iterdir()
    service.release_hook = None

    def make(relative: str, age_seconds: float | None) -> Path:
        path = root / relative
        (path / "7").mkdir(parents=True)
        (path / "7" / "out.csv").write_text("group,count\nx,30\n")
        if age_seconds is not None:
            backdate(path, age_seconds)
        return path

    old_style = make(".staging-r-old-deadbeef", 2 * 3600)  # the layout before .staging/
    make(".staging-r-fresh-00000001", None)
    make(".staging-r-recent-00000002", 50 * 60)  # younger than the safety age
    old_new_style = make(".staging/r-old-0badcafe", 3 * 3600)
    # a release copying a big file for a long time: the directory is old, the file is not
    writing = make(".staging/r-writing-00000003", 2 * 3600)
    (writing / "7" / "out.csv").write_text("group,count\nx,30\ny,31\n")
    # not staging directories: never touched, however old
    outside = tmp_path / "outside"
    (outside / "keep").mkdir(parents=True)
    (root / ".staging-link").symlink_to(outside)
    (root / ".staging-notes.txt").write_text("a file, not a staging directory")
    (root / ".staging" / "stray-file").write_text("a file")
    make(".corrupt-r-x-11111111", 5 * 3600)
    for name in (".staging-link", ".staging-notes.txt", ".staging/stray-file"):
        backdate(root / name, 5 * 3600)
    backdate(outside, 5 * 3600)
    backdate(root / released_rid, 5 * 3600)
    stale = {".staging-r-old-deadbeef", ".staging/r-old-0badcafe"}

    before, events = tree(root), gc_events(service)
    # a dry run (even as if a year had passed: staging age is real time) only lists them
    plan = collect(service, POLICY, now=NOW + dt.timedelta(days=365), dry_run=True)
    assert {s["path"] for s in plan.stale_staging} == stale
    assert tree(root) == before and gc_events(service) == events
    dry = cli(service, monkeypatch, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "would remove 2 stale staging dir(s)" in dry.output
    assert "released/.staging-r-old-deadbeef" in dry.output
    assert tree(root) == before and gc_events(service) == events

    report = collect(service, POLICY, now=NOW)
    assert {s["path"] for s in report.stale_staging} == stale
    assert not old_style.exists() and not old_new_style.exists()
    removed = {p for p in before if any(p == s or p.startswith(s + "/") for s in stale)}
    assert tree(root) == before - removed | {".trash"}  # they went through the run's trash
    assert not any((root / ".trash").iterdir())
    assert (outside / "keep").is_dir() and crashed_staging.is_dir()
    [event] = gc_events(service)[len(events) :]
    assert {s["path"] for s in event["stale_staging"]} == stale
    path, _ = service.download(service.who("bob"), released_rid, released_fid)
    assert path.read_text() == "group,count\no,24\n"

    # an hour later nothing changed in the crashed release's staging: it goes too, and the
    # request, retried after all, is released from its snapshots
    backdate(crashed_staging, 3601)
    report = collect(service, POLICY, now=NOW)
    assert [s["path"] for s in report.stale_staging] == [f".staging/{crashed_staging.name}"]
    assert not crashed_staging.exists()
    assert service.complete_pending_releases() == [crashed]
    path, _ = service.download(service.who("bob"), crashed, crashed_fid)
    assert sha256_file(path) == sha_of(service, crashed, crashed_fid)


# --- the policy and the command ---------------------------------------------------------------


@pytest.mark.parametrize(
    "content, field",
    [
        ("snapshot_retention_days: 0\nreleased_grace_days: 5\n", "snapshot_retention_days"),
        ("snapshot_retention_days: 10\nreleased_grace_days: -1\n", "released_grace_days"),
        ("snapshot_retention_days: 10\n", "released_grace_days"),
        ("snapshot_retention_days: 10\nreleased_grace_days: 5\nkeep: forever\n", "keep"),
        ("[1, 2]\n", ""),
        ("snapshot_retention_days: [\n", ""),
    ],
)
def test_bad_policy_is_named_and_the_command_changes_nothing(service, content, field, monkeypatch):
    from tre.policy_validate import validate_policies

    rid, [fid] = request(service, write(service, "w.csv", "group,count\nw,25\n"))
    service.withdraw(service.who("alice"), rid)
    age(service, rid, 3650)
    sha = sha_of(service, rid, fid)
    (service.settings.policies_dir / "retention.yaml").write_text(content)
    _registry, problems = validate_policies(service.settings.policies_dir)
    assert [p for p in problems if p.file.name == "retention.yaml" and p.field == field]
    result = cli(service, monkeypatch)
    assert result.exit_code == 2 and "retention.yaml" in result.output
    assert service.store.exists(sha) and gc_events(service) == []


def cli(service, monkeypatch, *args: str):
    from airlock.cli import app
    from airlock.service import db
    from tre.settings import get_settings

    monkeypatch.setenv("TRE_STATE_DIR", str(service.settings.state_dir))
    monkeypatch.setenv("TRE_POLICIES_DIR", str(service.settings.policies_dir))
    # the fixture's database (on PostgreSQL a schema of its own, which a URL cannot name)
    monkeypatch.setattr(db, "make_engine", lambda *_a, **_k: service.engine)
    get_settings.cache_clear()
    try:
        return CliRunner().invoke(app, ["gc", *args])
    finally:
        get_settings.cache_clear()


def test_command_dry_run_then_run(service, monkeypatch):
    made = ended_and_live(service)
    for r in service.list_requests(service.who("alice")):
        age(service, r["id"], 365)  # the withdrawn file counts from its (recent) withdrawal
    gone = {made["rejected"], made["withdrawn"]}
    dry = cli(service, monkeypatch, "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    plan = json.loads(dry.output)
    assert plan["dry_run"] is True and {s["sha256"] for s in plan["snapshots"]} == gone
    assert all(service.store.exists(s) for s in made.values()) and gc_events(service) == []
    run = cli(service, monkeypatch)
    assert run.exit_code == 0, run.output
    assert "removed 2 snapshot(s)" in run.output
    assert {s for s in made.values() if not service.store.exists(s)} == gone
    [event] = gc_events(service)
    assert {s["sha256"] for s in event["snapshots"]} == gone


# --- random action sequences with the collector running in between ---------------------------


def test_random_sequences_with_gc_never_lose_a_needed_snapshot(service, tre_settings):
    """The airlock state machine (test_properties.py) plus ``airlock gc`` at random moments,
    as if 0 or 2 days had passed with 1 day of retention: every snapshot a request could
    still release or released is stored, and the machine's own invariants (released bytes =
    reviewed snapshot, two independent approvals) still hold."""
    from hypothesis import HealthCheck, settings
    from hypothesis import strategies as st
    from hypothesis.stateful import invariant, precondition, rule, run_state_machine_as_test

    from tests.airlock_service import test_properties

    policy = RetentionPolicy(
        snapshot_retention_days=1, released_grace_days=0, released_content_retention_days=None
    )
    removed: list[str] = []
    base = test_properties.make_machine(service, tre_settings.workspaces_dir)

    class WithCollector(base):
        @precondition(lambda self: self.rids)
        @rule(data=st.data())
        def its_author_withdraws(self, data):
            """Requests end without release more often, so the collector has work."""
            rid = data.draw(st.sampled_from(self.rids))
            with service.factory() as s:
                author = s.get(ReleaseRequest, rid).author
            try:
                service.withdraw(service.who(author), rid)
            except test_properties.EXPECTED:
                pass

        @precondition(lambda self: self.rids)
        @rule(data=st.data())
        def two_checkers_approve(self, data):
            """Requests are released more often, so the collector runs around releases."""
            rid = data.draw(st.sampled_from(self.rids))
            with service.factory() as s:
                fids = sorted(f.id for f in s.get(ReleaseRequest, rid).active_files())
            for name in ("checker1", "checker2"):
                for fid in fids:
                    try:
                        service.vote(service.who(name), rid, fid, "approve", "", "j")
                    except test_properties.EXPECTED:
                        pass

        @precondition(lambda self: self.rids)
        @rule(days=st.sampled_from([0, 2]))
        def garbage_collect(self, days):
            now = dt.datetime.now(dt.UTC) + dt.timedelta(days=days)
            removed.extend(s["sha256"] for s in collect(service, policy, now=now).snapshots)

        @invariant()
        def every_snapshot_a_request_needs_is_stored(self):
            with service.factory() as s:
                for req in s.execute(select(ReleaseRequest)).scalars():
                    if req.state in ("rejected", "withdrawn"):
                        continue
                    for f in req.active_files():
                        assert service.store.verify(f.sha256), (req.id, req.state, f.path)

    test_properties.SEEN_RELEASED.clear()
    run_state_machine_as_test(
        WithCollector,
        settings=settings(
            max_examples=15,
            stateful_step_count=50,
            deadline=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        ),
    )
    # not vacuous: the collector removed snapshots, and requests were released around it
    assert removed and test_properties.SEEN_RELEASED


# --- a real kill -9 of `airlock gc` at every step -----------------------------------------------

GC_WORKER = Path(__file__).with_name("gc_worker.py")


def gc_worker_command(service, db, when: dt.datetime, stop_at: int) -> list[str]:
    """`airlock gc` as of ``when`` in a process of its own (gc_worker.py), stopping (and
    waiting to be killed) at its ``stop_at``-th step; -1: run to the end."""
    settings = service.settings
    return [
        sys.executable,
        str(GC_WORKER),
        db.url,
        db.schema or "",
        str(settings.state_dir),
        str(settings.policies_dir),
        when.isoformat(),
        str(stop_at),
    ]


def kill_gc_at(service, db, when: dt.datetime, stop_at: int) -> str:
    """Run `airlock gc` as of ``when`` in a process of its own and SIGKILL it at its
    ``stop_at``-th step (gc_worker.py says where it is); return that step's name."""
    proc = subprocess.Popen(
        gc_worker_command(service, db, when, stop_at),
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    line = proc.stdout.readline()
    assert line.startswith("AT "), line
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    return line.split()[1]


GC_STEPS = 5  # two blobs trashed, commit (inside the transaction), committed, trash deleted


@pytest.mark.slow
def test_kill_9_of_gc_at_every_step_then_rerun(service, db):
    policy_file(service, snapshot_retention_days=30)
    shared = write(service, "shared-kill.csv", "group,count\nk,31\n")
    live, [live_fid] = request(service, shared, submit=False)  # needs the shared blob
    released, released_fid = released_request(service)
    needed = {sha_of(service, live, live_fid), sha_of(service, released, released_fid)}
    later = NOW + dt.timedelta(days=31)
    seen: set[str] = set()
    for stop_at in range(GC_STEPS):
        ended = set()
        for n in range(2):  # two blobs of withdrawn requests, new content each time
            rid, [fid] = request(
                service, write(service, f"k{stop_at}-{n}.csv", f"a,b\n{n},{stop_at}\n")
            )
            service.withdraw(service.who("alice"), rid)
            ended.add(sha_of(service, rid, fid))
        rid, _ = request(service, shared)
        service.withdraw(service.who("alice"), rid)  # the shared blob: ended here, live there
        seen.add(kill_gc_at(service, db, later, stop_at))
        # nothing a request needs is missing, whatever the step
        assert all(service.store.verify(s) for s in needed)
        trash = service.store.root / "trash"
        in_trash = {p.name for p in trash.rglob("*") if p.is_file()} if trash.exists() else set()
        assert in_trash <= ended
        # the lock died with the process: the next run finishes the work and audits it
        report = collect(service, POLICY, now=later)
        assert set(report.finished_from_interrupted_run) == in_trash
        assert not any(service.store.exists(s) for s in ended)
        assert not trash.exists() or not any(trash.iterdir())
        audited = set()
        for event in gc_events(service):
            audited |= {s["sha256"] for s in event["snapshots"]}
            audited |= set(event["finished_from_interrupted_run"])
        assert ended <= audited
        assert all(service.store.verify(s) for s in needed)
    assert seen == {"trashed", "commit", "committed", "deleted"}
    with service.factory() as s:
        assert verify_chain(s) == []
    # the request that needed the shared blob is submitted and released with the exact bytes
    service.submit(service.who("alice"), live)
    assert review(service, live, [live_fid]) == "released"
    path, _ = service.download(service.who("bob"), live, live_fid)
    assert sha256_file(path) == sha_of(service, live, live_fid)


@pytest.mark.hub
def test_download_answers_410_over_http_after_the_grace_period(client):
    service = client.service
    policy_file(service, released_grace_days=60)
    rid, fid = released_request(service)
    url = f"api/requests/{rid}/files/{fid}/download"
    end_project(service, days_ago=59)
    r = client.call("bob", "GET", url)
    assert r.status_code == 200 and r.content == b"group,count\no,24\n"
    end_project(service, days_ago=61)
    r = client.call("bob", "GET", url)
    assert r.status_code == 410 and "downloaded until" in r.json()["detail"]
    assert client.call("carol", "GET", url).status_code == 404
    collect(service, POLICY)
    assert not (service.released_root / rid).exists()
    assert client.call("bob", "GET", url).status_code == 410


# --- the file contents of released requests after released_content_retention_days -------------

KEEP_A_YEAR = RetentionPolicy(
    snapshot_retention_days=30, released_grace_days=60, released_content_retention_days=365
)


def age_release(service, rid: str, days: float) -> None:
    """Pretend the request was released ``days`` before NOW."""
    with service.factory() as s, s.begin():
        s.execute(
            update(Release)
            .where(Release.request_id == rid)
            .values(released_at=NOW - dt.timedelta(days=days))
        )


def purge_events(service) -> dict[str, dict]:
    """request id -> details of its release_content_purge event (asserting one at most)."""
    with service.factory() as s:
        rows = s.execute(
            select(AuditEvent).where(AuditEvent.action == "release_content_purge")
        ).scalars()
        out: dict[str, dict] = {}
        for e in rows:
            rid = e.target.removeprefix("request:")
            assert rid not in out, f"two purge events for {rid}"
            out[rid] = {**json.loads(e.details), "actor": e.actor}
        return out


def released_with(service, name: str, text: str) -> tuple[str, int, str]:
    rid, [fid] = request(service, write(service, name, text))
    assert review(service, rid, [fid]) == "released"
    return rid, fid, sha_of(service, rid, fid)


def test_released_content_goes_after_the_retention_and_a_younger_release_keeps_it(service):
    old, old_fid, old_sha = released_with(service, "old.csv", "group,count\nold,41\n")
    young, young_fid, young_sha = released_with(service, "young.csv", "group,count\nyng,42\n")
    age_release(service, old, 366)
    age_release(service, young, 364)
    bob, alice = service.who("bob"), service.who("alice")
    before = service.view(alice, old)

    report = collect(service, KEEP_A_YEAR, now=NOW)
    # the old release: its snapshot and its released copy are gone
    assert [p["request"] for p in report.released_content] == [old]
    assert not service.store.exists(old_sha)
    assert not (service.released_root / old).exists()
    assert {s["sha256"] for s in report.snapshots} == {old_sha}
    # the young one keeps both and still downloads the exact bytes
    assert service.store.verify(young_sha)
    path, _ = service.download(bob, young, young_fid)
    assert sha256_file(path) == young_sha
    # one purge event, naming the request, its files by hash, and why
    events = purge_events(service)
    assert set(events) == {old}
    event = events[old]
    assert event["files"] == [
        {"id": old_fid, "path": "outputs/old.csv", "sha256": old_sha, "size": 19}
    ]
    assert event["snapshots_removed"] == [old_sha] and event["snapshots_kept_shared"] == []
    assert event["released_content_retention_days"] == 365
    assert "365 days" in event["reason"] and "released_content_retention_days" in event["reason"]
    assert event["actor"] == "airlock-gc"
    [run] = gc_events(service)
    assert [p["request"] for p in run["released_content"]] == [old]
    assert run["released_content_retention_days"] == 365
    # the record stays: files, hashes, sizes, votes, state, and the release in the history
    after = service.view(alice, old)
    assert after["state"] == "released"
    for key in ("sha256", "size", "path", "votes"):
        assert [f[key] for f in after["files"]] == [f[key] for f in before["files"]]
    assert after["content_purged"]["after_days"] == 365
    assert after["permissions"]["download"] is False
    assert "release_content_purge" in [h["action"] for h in after["history"]]
    assert service.view(alice, young)["content_purged"] is None
    # downloads and previews say clearly what happened
    with pytest.raises(Gone, match="removed on .* 365 days after their release"):
        service.download(bob, old, old_fid)
    with pytest.raises(Gone, match="removed on"):
        service.snapshot_path(alice, old, old_fid)
    with service.factory() as s:
        assert verify_chain(s) == []
    # a later run purges nothing again; the young one goes once it is old enough
    assert collect(service, KEEP_A_YEAR, now=NOW).released_content == []
    report = collect(service, KEEP_A_YEAR, now=NOW + dt.timedelta(days=2))
    assert [p["request"] for p in report.released_content] == [young]
    assert set(purge_events(service)) == {old, young}
    assert not service.store.exists(young_sha)
    with service.factory() as s:
        assert verify_chain(s) == []


def test_a_blob_another_request_still_needs_is_kept(service):
    shared_text = "group,count\nshared,43\n"
    old, old_fid, sha = released_with(service, "shared.csv", shared_text)
    age_release(service, old, 400)
    # the same bytes in a request that could still be released
    live, [live_fid] = request(service, write(service, "shared.csv", shared_text), submit=False)
    assert sha_of(service, live, live_fid) == sha
    # and in another release, younger than the retention
    other, other_fid, other_sha = released_with(service, "shared.csv", shared_text)
    assert other_sha == sha
    age_release(service, other, 100)

    report = collect(service, KEEP_A_YEAR, now=NOW)
    assert [p["request"] for p in report.released_content] == [old]
    assert service.store.verify(sha)  # kept for the other two
    assert report.snapshots == []
    event = purge_events(service)[old]
    assert event["snapshots_removed"] == [] and event["snapshots_kept_shared"] == [sha]
    # the purged request's own copy is gone, and it serves the bytes no more, kept blob or not
    assert not (service.released_root / old).exists()
    with pytest.raises(Gone):
        service.download(service.who("bob"), old, old_fid)
    with pytest.raises(Gone):
        service.snapshot_path(service.who("alice"), old, old_fid)
    # the others still have theirs
    path, _ = service.download(service.who("bob"), other, other_fid)
    assert sha256_file(path) == sha
    assert service.snapshot_path(service.who("alice"), live, live_fid)[0].is_file()
    # the live request withdrawn long ago and the other release purged: now the blob goes
    service.withdraw(service.who("alice"), live)
    age(service, live, 31)
    age_release(service, other, 366)
    report = collect(service, KEEP_A_YEAR, now=NOW)
    assert [p["request"] for p in report.released_content] == [other]
    assert report.snapshots == [
        {"sha256": sha, "size": len(shared_text), "requests": sorted([old, live, other])}
    ]
    assert not service.store.exists(sha)
    assert purge_events(service)[other]["snapshots_removed"] == [sha]
    with service.factory() as s:
        assert verify_chain(s) == []


def test_a_recently_ended_request_with_the_same_bytes_keeps_them_for_its_own_period(service):
    text = "group,count\nended,44\n"
    old, _fid, sha = released_with(service, "e.csv", text)
    age_release(service, old, 400)
    ended, _ = request(service, write(service, "e.csv", text))
    service.withdraw(service.who("alice"), ended)
    age(service, ended, 10)  # snapshot_retention_days is 30
    collect(service, KEEP_A_YEAR, now=NOW)
    assert set(purge_events(service)) == {old} and service.store.verify(sha)
    age(service, ended, 31)
    report = collect(service, KEEP_A_YEAR, now=NOW)
    assert {s["sha256"] for s in report.snapshots} == {sha} and not service.store.exists(sha)


def test_null_keeps_released_content_forever_and_dry_run_changes_nothing(service):
    rid, fid, sha = released_with(service, "kept.csv", "group,count\nkeep,45\n")
    age_release(service, rid, 3650)
    policy_file(service, released_content_retention_days=None)  # what downloads read too
    forever = load_retention_policy(service.settings.policies_dir)
    assert forever.released_content_retention_days is None
    report = collect(service, forever, now=NOW)
    assert report.released_content == [] and service.store.verify(sha)
    assert purge_events(service) == {}
    plan = collect(service, KEEP_A_YEAR, now=NOW, dry_run=True)
    assert [p["request"] for p in plan.released_content] == [rid]
    assert plan.released_content[0]["snapshots_removed"] == [sha]
    assert service.store.verify(sha) and (service.released_root / rid).exists()
    assert purge_events(service) == {} and len(gc_events(service)) == 1
    path, _ = service.download(service.who("bob"), rid, fid)
    assert sha256_file(path) == sha


def test_the_shipped_policy_keeps_released_content_a_year(service):
    policy = load_retention_policy(service.settings.policies_dir)
    assert policy.released_content_retention_days == 365
    rid, _fid, sha = released_with(service, "ship.csv", "group,count\nship,46\n")
    age_release(service, rid, 366)
    collect(service, policy, now=NOW)
    assert set(purge_events(service)) == {rid} and not service.store.exists(sha)


@pytest.mark.parametrize(
    "value, words",
    [
        ("-1", "greater than or equal to 1"),
        ("0", "greater than or equal to 1"),
        ("36501", "less than or equal to 36500"),
        ("forever", "or null to keep"),
        ("'365'", "not the text '365'"),
        ("true", "valid integer"),
        ("1.5", "valid integer"),
        (None, "Field required"),
    ],
)
def test_bad_released_content_retention_is_named_and_changes_nothing(
    service, monkeypatch, value, words
):
    from tre.policy_validate import validate_policies

    rid, fid, sha = released_with(service, "bad.csv", "group,count\nbad,47\n")
    age_release(service, rid, 3650)
    path = service.settings.policies_dir / "retention.yaml"
    lines = [
        line
        for line in path.read_text().splitlines()
        if not line.startswith("released_content_retention_days:")
    ]
    if value is not None:
        lines.append(f"released_content_retention_days: {value}")
    path.write_text("\n".join(lines) + "\n")
    _registry, problems = validate_policies(service.settings.policies_dir)
    [problem] = [p for p in problems if p.file.name == "retention.yaml"]
    assert problem.field == "released_content_retention_days" and words in problem.message
    result = cli(service, monkeypatch)
    assert result.exit_code == 2
    assert "retention.yaml: released_content_retention_days:" in result.output
    assert words in result.output
    assert service.store.verify(sha) and (service.released_root / rid).exists()
    assert gc_events(service) == [] and purge_events(service) == {}


def test_command_names_the_purged_requests(service, monkeypatch):
    rid, _fid, sha = released_with(service, "cmd.csv", "group,count\ncmd,48\n")
    age_release(service, rid, 366)
    dry = cli(service, monkeypatch, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "would remove the file contents of 1 request(s) released more than 365" in dry.output
    assert rid in dry.output and service.store.exists(sha)
    run = cli(service, monkeypatch)
    assert run.exit_code == 0, run.output
    assert "removed the file contents of 1 request(s)" in run.output
    assert f"{rid} ({P}, contents purged)" in run.output  # its released copy too
    assert not service.store.exists(sha) and set(purge_events(service)) == {rid}


@pytest.mark.hub
def test_download_and_page_of_a_purged_request_over_http(client):
    from tests.airlock_service.test_bad_requests import login

    service = client.service
    rid, fid, _sha = released_with(service, "http.csv", "group,count\nhttp,49\n")
    url = f"api/requests/{rid}/files/{fid}/download"
    assert client.call("bob", "GET", url).status_code == 200
    age_release(service, rid, 366)
    collect(service, KEEP_A_YEAR, now=NOW)
    r = client.call("bob", "GET", url)
    assert r.status_code == 410
    assert "365 days after their release" in r.json()["detail"]
    assert client.call("carol", "GET", url).status_code == 404  # not hers: still not found
    r = client.call("bob", "GET", f"api/requests/{rid}")
    assert r.status_code == 200 and r.json()["content_purged"]["after_days"] == 365
    http = login(client.live, "alice")
    page = http.get(f"{client.live.prefix}requests/{rid}")
    assert page.status_code == 200 and 'id="content-purged"' in page.text
    assert "365 days after its release" in page.text
    assert f"files/{fid}/download" not in page.text and f"files/{fid}/preview" not in page.text
    assert "sha256 " + _sha in page.text  # the record stays on the page
    r = http.get(f"{client.live.prefix}requests/{rid}/files/{fid}/download")
    assert r.status_code == 410
    r = http.get(f"{client.live.prefix}requests/{rid}/files/{fid}/raw")
    assert r.status_code == 410
    http.close()


# the steps of a run that purges two released requests (one blob of their own, one shared
# with a live request): the purge events (inside the transaction), committed, one blob and two
# released copies trashed, the run's event (inside the transaction), committed, trash deleted
PURGE_STEPS = 8


@pytest.mark.slow
def test_kill_9_of_a_purge_at_every_step_then_rerun(service, db):
    """No content of a released request goes without its purge event, and the next run
    finishes what a killed one started, with one event per request in all."""
    policy = load_retention_policy(service.settings.policies_dir)
    assert policy.released_content_retention_days == 365
    shared = "group,count\nkill,50\n"
    live, [live_fid] = request(service, write(service, "kshared.csv", shared), submit=False)
    live_sha = sha_of(service, live, live_fid)
    seen: set[str] = set()
    for stop_at in range(PURGE_STEPS):
        own, own_fid, own_sha = released_with(
            service, f"kown{stop_at}.csv", f"group,count\nk{stop_at},{60 + stop_at}\n"
        )
        both, both_fid, both_sha = released_with(service, "kshared.csv", shared)
        assert both_sha == live_sha
        for rid in (own, both):
            age_release(service, rid, 400)
        seen.add(kill_gc_at(service, db, NOW, stop_at))
        events = purge_events(service)
        # recorded first: a request without its event still has all its content
        for rid, fid, sha in ((own, own_fid, own_sha), (both, both_fid, both_sha)):
            if rid not in events:
                assert service.store.verify(sha)
                [copy] = (service.released_root / rid / str(fid)).iterdir()
                assert sha256_file(copy) == sha
                # past its period: refused already, though nothing was removed
                with pytest.raises(Gone, match="no longer available"):
                    service.download(service.who("bob"), rid, fid)
            else:  # recorded: refused from then on, whatever is still on disk
                assert events[rid]["files"][0]["sha256"] == sha
                with pytest.raises(Gone):
                    service.download(service.who("bob"), rid, fid)
        assert (own in events) == (both in events)  # one transaction for the run's purges
        assert service.store.verify(live_sha)  # needed by the live request, always
        trashed = set()
        for root in (service.store.root / "trash", service.released_root / ".trash"):
            if root.exists():
                trashed |= {p.name for run in root.iterdir() for p in run.iterdir()}
        assert trashed <= {own_sha, own, both}
        assert not trashed or own in events
        # the next run finishes the work, and audits it
        report = collect(service, policy, now=NOW)
        events = purge_events(service)  # (asserts one event per request)
        assert {own, both} <= set(events)
        assert events[own]["snapshots_removed"] == [own_sha]
        assert events[both]["snapshots_kept_shared"] == [live_sha]
        assert not service.store.exists(own_sha) and service.store.verify(live_sha)
        assert not (service.released_root / own).exists()
        assert not (service.released_root / both).exists()
        for root in (service.store.root / "trash", service.released_root / ".trash"):
            assert not root.exists() or not any(root.iterdir())
        audited = set()
        for event in gc_events(service):
            audited |= {s["sha256"] for s in event["snapshots"]}
            audited |= set(event["finished_from_interrupted_run"])
        assert own_sha in audited and set(report.finished_from_interrupted_run) == trashed
    assert seen == {"purge", "purged", "trashed", "commit", "committed", "deleted"}
    with service.factory() as s:
        assert verify_chain(s) == []
    # the live request still gets released with the exact bytes
    service.submit(service.who("alice"), live)
    assert review(service, live, [live_fid]) == "released"
    path, _ = service.download(service.who("bob"), live, live_fid)
    assert sha256_file(path) == live_sha


# --- red team: what a purge leaves behind, and what it must not take ------------------------


def files_holding(root: Path, needle: bytes) -> list[str]:
    """Every regular file under ``root`` whose bytes contain ``needle``."""
    found = []
    for parent, _dirs, names in os.walk(root):
        for name in names:
            path = Path(parent) / name
            if not path.is_symlink() and needle in path.read_bytes():
                found.append(str(path.relative_to(root)))
    return sorted(found)


def released_after_a_corrupt_copy(service, name: str, text: str) -> tuple[str, int]:
    """A request whose first release attempt crashed after its rename and whose released copy
    then failed verification (bit rot in its manifest): the retry moved that copy aside as
    ``released/.corrupt-<request>-*`` (airlock/release.py) and released afresh."""

    def crash(kind, _what):
        if kind == "renamed":
            raise OSError("simulated crash between the rename and the commit")

    service.release_hook = crash
    rid, [fid] = request(service, write(service, name, text))
    assert review(service, rid, [fid]) == "approved"
    service.release_hook = None
    manifest = service.released_root / rid / "manifest.json"
    manifest.write_text(manifest.read_text() + " ")
    assert service.complete_pending_releases() == [rid]
    [corrupt] = service.released_root.glob(f".corrupt-{rid}-*")
    assert text.encode() in (corrupt / str(fid) / name).read_bytes()
    return rid, fid


def test_a_purge_leaves_no_copy_of_the_content_anywhere_in_the_store(service):
    """Privacy: after the purge no file under the airlock's store holds the released bytes,
    not even the copy a retried release set aside as corrupt."""
    text = "group,count\ncorrupt-purge,51\n"
    rid, fid = released_after_a_corrupt_copy(service, "cp.csv", text)
    store_dir = service.settings.airlock_store_dir
    assert len(files_holding(store_dir, text.encode())) == 3  # snapshot, released, set aside
    age_release(service, rid, 366)
    report = collect(service, KEEP_A_YEAR, now=NOW)
    assert [p["request"] for p in report.released_content] == [rid]
    assert files_holding(store_dir, text.encode()) == []
    [entry] = report.released
    assert entry["request"] == rid and len(entry["set_aside"]) == 1
    assert entry["set_aside"][0].startswith(f".corrupt-{rid}-")
    with pytest.raises(Gone):
        service.download(service.who("bob"), rid, fid)
    # a copy set aside for another request is not this purge's to take
    other, _ = released_after_a_corrupt_copy(service, "cq.csv", "group,count\nother,52\n")
    collect(service, KEEP_A_YEAR, now=NOW)
    assert list(service.released_root.glob(f".corrupt-{other}-*"))


def test_the_grace_period_removes_a_copy_set_aside_as_corrupt_too(service):
    policy_file(service, released_grace_days=60)
    policy = load_retention_policy(service.settings.policies_dir)
    text = "group,count\ncorrupt-grace,53\n"
    rid, _fid = released_after_a_corrupt_copy(service, "cg.csv", text)
    end_project(service, days_ago=61)
    collect(service, policy)
    assert [f for f in files_holding(service.released_root, text.encode())] == []


def test_a_run_that_starts_while_another_deletes_its_trash_does_not_claim_it(service, monkeypatch):
    """Audit: a run deletes its trash after it lets go of the store lock, so a second run can
    start while that trash is still there; it must neither name it as what an interrupted run
    left (nothing was interrupted) nor delete it, and the first run still deletes all of it."""
    rid, _fid, sha = released_with(service, "two.csv", "group,count\ntwo,54\n")
    age_release(service, rid, 366)
    real_rmtree = retention.shutil.rmtree
    second: list[retention.GcReport] = []
    started = []

    def rmtree(path, *args, **kwargs):
        if not started and "trash" in str(path):
            started.append(path)  # the second run starts once, when the first one deletes
            second.append(collect(service, KEEP_A_YEAR, now=NOW, actor="admin"))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(retention.shutil, "rmtree", rmtree)
    first = collect(service, KEEP_A_YEAR, now=NOW)
    assert [p["request"] for p in first.released_content] == [rid]
    [other] = second
    assert other.finished_from_interrupted_run == []
    runs = gc_events(service)
    assert [r["finished_from_interrupted_run"] for r in runs] == [[], []]
    assert not service.store.exists(sha)
    for root in (service.store.root / "trash", service.released_root / ".trash"):
        assert not root.exists() or not any(root.iterdir())
    # a run killed while deleting (no one holds its trash) is still finished by the next
    crashed = service.store.root / "trash" / "gc-crashed"
    crashed.mkdir(parents=True)
    (crashed / "ab").write_text("left")
    assert collect(service, KEEP_A_YEAR, now=NOW).finished_from_interrupted_run == ["ab"]
    assert not crashed.exists()


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("snapshot_retention_days", "yes", "valid integer"),  # YAML 1.1: true, was 1 day
        ("snapshot_retention_days", "'90'", "not the text '90'"),
        ("released_grace_days", "true", "valid integer"),
        ("released_grace_days", "60.0", "valid integer"),
        ("gc_interval_hours", "on", "valid integer"),
        ("gc_interval_hours", "24.0", "valid integer"),
    ],
)
def test_a_boolean_fraction_or_text_for_a_period_is_refused_not_read_as_a_number(
    service, monkeypatch, field, value, words
):
    from tre.policy_validate import validate_policies

    rid, [fid] = request(service, write(service, "b.csv", "group,count\nb,55\n"))
    service.withdraw(service.who("alice"), rid)
    age(service, rid, 2)  # older than a day, younger than the shipped 90
    sha = sha_of(service, rid, fid)
    path = service.settings.policies_dir / "retention.yaml"
    lines = [x for x in path.read_text().splitlines() if not x.startswith(f"{field}:")]
    path.write_text("\n".join([*lines, f"{field}: {value}"]) + "\n")
    _registry, problems = validate_policies(service.settings.policies_dir)
    [problem] = [p for p in problems if p.file.name == "retention.yaml"]
    assert problem.field == field and words in problem.message
    result = cli(service, monkeypatch)
    assert result.exit_code == 2 and f"retention.yaml: {field}:" in result.output
    assert service.store.verify(sha) and gc_events(service) == []


def test_a_purged_request_serves_its_bytes_under_no_file_id_not_even_a_replaced_one(service):
    """Privacy: a purged request's file replaced by the same bytes (its earlier row, now
    'replaced', refers to the same blob) must not preview the content the purge took, while
    another request keeps that blob."""
    text = "group,count\nreplaced,56\n"
    alice = service.who("alice")
    rid, [first] = request(service, write(service, "rp.csv", text), submit=False)
    again = service.add_file(alice, rid, FileSpec("outputs/rp.csv", "g"))  # same bytes
    sha = sha_of(service, rid, again)
    assert sha_of(service, rid, first) == sha
    service.submit(alice, rid)
    assert review(service, rid, [again]) == "released"
    live, [live_fid] = request(service, write(service, "rp.csv", text), submit=False)
    age_release(service, rid, 400)
    collect(service, KEEP_A_YEAR, now=NOW)
    assert purge_events(service)[rid]["snapshots_kept_shared"] == [sha]
    for fid in (again, first):
        with pytest.raises(Gone, match="removed on"):
            service.snapshot_path(alice, rid, fid)
    assert service.snapshot_path(alice, live, live_fid)[0].read_text() == text


KILLED_PUT = """
import os, signal, sys
from airlock.storage import FileSystemStore

class Dying:
    def __init__(self, data):
        self.chunks = [data]

    def read(self, _n):
        if self.chunks:
            return self.chunks.pop()
        os.kill(os.getpid(), signal.SIGKILL)  # killed while storing, the bytes written

# a file bigger than the write buffer: its bytes reach the disk before the kill
FileSystemStore(sys.argv[1]).put_stream(Dying(sys.argv[2].encode() * 5000), 1 << 20)
"""


def test_what_a_killed_snapshot_left_in_tmp_goes_after_an_hour(service):
    """Privacy: a snapshot whose process was killed while storing leaves the file's bytes in
    snapshots/tmp; no request refers to them and nothing else would ever delete them."""
    store = service.store

    def killed_put(text: str) -> Path:
        before = set(store.tmp.iterdir())
        proc = subprocess.run(
            [sys.executable, "-c", KILLED_PUT, str(store.root), text],
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
            check=False,
        )
        assert proc.returncode == -signal.SIGKILL
        [left] = set(store.tmp.iterdir()) - before
        assert left.read_text() == text * 5000
        return left

    old = killed_put("killed-old,57\n")
    backdate(old, 2 * 3600)
    fresh = killed_put("killed-fresh,58\n")  # could be a put still running
    plan = collect(service, POLICY, now=NOW, dry_run=True)
    size = len("killed-old,57\n") * 5000
    assert plan.stale_uploads == [{"name": old.name, "size": size}] and old.exists()
    report = collect(service, POLICY, now=NOW)
    assert [u["name"] for u in report.stale_uploads] == [old.name]
    assert not old.exists() and fresh.exists()
    assert files_holding(service.settings.airlock_store_dir, b"killed-old") == []
    [event] = gc_events(service)
    assert event["stale_uploads"] == [{"name": old.name, "size": size}]

"""Retention, second red team: what released content survived, where, and for how long.

* a download or preview of a released request past ``released_content_retention_days`` answers
  410 by itself, before ``airlock gc`` ran (wall clock, null, policy changes);
* a download racing the purge of its request answers 200 with the exact bytes or a clean 410;
* trash that cannot be deleted is reported (exit 1, an audit event naming the path) and a rerun
  finishes it;
* two concurrent runs never both count one stale staging directory or upload;
* the working copies of killed disclosure checks are removed at the next start or run;
* an empty value in retention.yaml is refused, never read as null (keep forever).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from airlock import retention
from airlock.retention import RetentionPolicyError, collect, load_retention_policy
from airlock.service.core import Gone
from airlock.storage import sha256_file
from tests.airlock_service.test_retention import (
    NOW,
    POLICY,
    age,
    age_release,
    backdate,
    cli,
    files_holding,
    gc_events,
    gc_worker_command,
    policy_file,
    purge_events,
    released_with,
    request,
    write,
)
from tests.conftest import require_component
from tre.audit import AuditEvent, verify_chain

# --- an empty value is not null ----------------------------------------------------------------


def set_field(service, field: str, raw: str) -> None:
    """Write ``field: raw`` in the TRE's retention.yaml (replacing the field's line)."""
    path = service.settings.policies_dir / "retention.yaml"
    lines = [x for x in path.read_text().splitlines() if not x.startswith(f"{field}:")]
    path.write_text("\n".join([*lines, f"{field}:{raw}"]) + "\n")


@pytest.mark.parametrize(
    "field, raw",
    [
        ("released_content_retention_days", ""),
        ("released_content_retention_days", "   "),
        ("released_content_retention_days", "   # keep them?"),
        ("snapshot_retention_days", ""),
        ("gc_interval_hours", ""),
    ],
)
def test_an_empty_value_is_refused_naming_file_and_field(service, monkeypatch, field, raw):
    from tre.policy_validate import validate_policies

    rid, _fid, sha = released_with(service, "blank.csv", "group,count\nblank,61\n")
    set_field(service, field, raw)
    _registry, problems = validate_policies(service.settings.policies_dir)
    [problem] = [p for p in problems if p.file.name == "retention.yaml"]
    assert problem.field == field and "has no value" in problem.message
    if field == "released_content_retention_days":
        assert "`null` to keep released contents forever" in problem.message
    result = cli(service, monkeypatch, "--dry-run")
    assert result.exit_code == 2 and f"retention.yaml: {field}: has no value" in result.output
    assert service.store.verify(sha) and gc_events(service) == []


@pytest.mark.parametrize("raw", [" null", " ~", " NULL"])
def test_an_explicit_null_keeps_released_content_forever(service, raw):
    rid, _fid, sha = released_with(service, "null.csv", "group,count\nnull,62\n")
    set_field(service, "released_content_retention_days", raw)
    policy = load_retention_policy(service.settings.policies_dir)
    assert policy.released_content_retention_days is None
    collect(service, policy, now=NOW + dt.timedelta(days=36500))
    assert purge_events(service) == {} and service.store.verify(sha)


# --- released content past its period is refused before any collection -----------------------


def downloads(service) -> int:
    with service.factory() as s:
        return len(s.execute(select(AuditEvent).where(AuditEvent.action == "download")).all())


def test_content_past_its_period_is_refused_before_any_collection(service):
    """The policy promises N days; until now the bytes stayed downloadable until `airlock gc`
    ran (every gc_interval_hours, or never if the enforcer is down)."""
    rid, fid, sha = released_with(service, "due.csv", "group,count\ndue,63\n")
    bob, alice = service.who("bob"), service.who("alice")
    age_release(service, rid, 364)  # the shipped policy keeps released content 365 days
    path, _ = service.download(bob, rid, fid)
    assert sha256_file(path) == sha
    age_release(service, rid, 366)
    before = downloads(service)
    with pytest.raises(Gone, match="no longer available .* kept 365 days after their release"):
        service.download(bob, rid, fid)
    with pytest.raises(Gone, match="kept 365 days after their release"):
        service.snapshot_path(alice, rid, fid)
    view = service.view(alice, rid)
    assert view["content_purged"] is None and view["content_expired"]["after_days"] == 365
    assert view["permissions"]["download"] is False
    assert downloads(service) == before  # a refused download is not recorded as one
    # refused, not removed: that is the collection's job, which audits it
    assert service.store.verify(sha) and (service.released_root / rid).is_dir()
    assert gc_events(service) == [] and purge_events(service) == {}

    # the policy as it is now: a longer period or null serves again, a shorter one refuses
    policy_file(service, released_content_retention_days=730)
    path, _ = service.download(bob, rid, fid)
    assert sha256_file(path) == sha
    policy_file(service, released_content_retention_days=None)
    service.download(bob, rid, fid)
    assert service.view(alice, rid)["permissions"]["download"] is True
    policy_file(service, released_content_retention_days=30)
    age_release(service, rid, 31)
    with pytest.raises(Gone, match="kept 30 days"):
        service.download(bob, rid, fid)
    # an unreadable policy serves nothing it might have to refuse, and says why
    set_field(service, "released_content_retention_days", " thirty")
    with pytest.raises(RetentionPolicyError, match="retention.yaml"):
        service.download(bob, rid, fid)
    policy_file(service, released_content_retention_days=30)
    # the collection then purges it, and the answer names the day it did
    collect(service, load_retention_policy(service.settings.policies_dir), now=NOW)
    assert set(purge_events(service)) == {rid} and not service.store.exists(sha)
    with pytest.raises(Gone, match="removed on .* kept 30 days"):
        service.download(bob, rid, fid)


def test_an_unreleased_request_has_no_content_period(service):
    rid, [fid] = request(service, write(service, "pending.csv", "group,count\npend,64\n"))
    age(service, rid, 4000)
    path, _ = service.snapshot_path(service.who("checker1"), rid, fid)
    assert path.is_file()


@pytest.mark.hub
def test_past_its_period_over_http_before_any_collection(client):
    from tests.airlock_service.test_bad_requests import login

    service = client.service
    rid, fid, sha = released_with(service, "httpdue.csv", "group,count\nhttpdue,65\n")
    url = f"api/requests/{rid}/files/{fid}/download"
    r = client.call("bob", "GET", url)
    assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == sha
    age_release(service, rid, 366)
    r = client.call("bob", "GET", url)
    assert r.status_code == 410 and "kept 365 days after their release" in r.json()["detail"]
    assert client.call("carol", "GET", url).status_code == 404  # still not hers
    assert client.call("bob", "GET", f"api/requests/{rid}").json()["content_expired"]
    http = login(client.live, "alice")
    page = http.get(f"{client.live.prefix}requests/{rid}")
    assert page.status_code == 200 and 'id="content-expired"' in page.text
    assert f"files/{fid}/download" not in page.text and f"files/{fid}/preview" not in page.text
    for what in ("download", "raw", "preview"):
        r = http.get(f"{client.live.prefix}requests/{rid}/files/{fid}/{what}")
        assert r.status_code == 410, what
    http.close()
    assert service.store.verify(sha)  # no collection ran


# --- a download racing the purge of its request -----------------------------------------------


def big_text(seed: str) -> str:
    """About 2 MB of text (hex lines): long enough that a download is still being sent while
    the purge moves and deletes its file; the checks only ask for a review."""
    return "".join(hashlib.sha256(f"{seed}-{i}".encode()).hexdigest() + "\n" for i in range(30_000))


def run_gc(service, db, when: dt.datetime) -> None:
    """`airlock gc` as of ``when``, in a process of its own (gc_worker.py), to the end."""
    proc = subprocess.run(
        gc_worker_command(service, db, when, -1),
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stdout.startswith("DONE"), proc.stderr


RACE_ROUNDS, RACE_REQUESTS, RACE_THREADS = 3, 24, 8


@pytest.mark.hub
def test_a_download_racing_the_purge_gets_the_whole_file_or_410(client, db):
    """Downloaders hammer released files over HTTP while a real `airlock gc` process purges
    them (its clock a year ahead, so the service's own period check lets them through until
    the purge): each answer is 200 with exactly the released bytes, or 410 naming the purge;
    never a 500, a 409 or a short or different body. Before the fix the service checked the
    copy by its path, then Starlette opened the path again to send it: moved away meanwhile,
    that was a 500 (or a 409 "does not match its sha256" when it went during the check)."""
    import httpx

    service = client.service
    token = client.live.tokens["bob"]
    results: list[tuple[str, int, str, str, bool]] = []
    expected: dict[str, tuple[int, str]] = {}
    for round_ in range(RACE_ROUNDS):
        batch: dict[str, tuple[int, str]] = {}
        for i in range(RACE_REQUESTS):
            # many requests: each purge moves them one after the other, each a moment when
            # a download in flight may find its copy gone; one of them big, still being
            # sent when its file is deleted
            name = f"race{round_}x{i}"
            text = big_text(name) if i == 0 else f"{name}\n" * 20
            rid, fid, sha = released_with(service, f"{name}.txt", text)
            batch[rid] = (fid, sha)
        expected.update(batch)
        stop, purged = threading.Event(), threading.Event()

        def downloader(seed: int, batch=batch, stop=stop, purged=purged) -> None:
            rng = random.Random(seed)
            # straight to the airlock's server (the hub's proxy is not what is raced here)
            with httpx.Client(
                base_url=client.live.direct, headers={"Authorization": f"token {token}"}, timeout=60
            ) as http:
                while not stop.is_set():
                    rid = rng.choice(sorted(batch))
                    after = purged.is_set()
                    try:
                        r = http.get(f"api/requests/{rid}/files/{batch[rid][0]}/download")
                    except httpx.HTTPError as exc:  # a body cut short, a dropped connection
                        results.append((rid, -1, "", repr(exc), after))
                        continue
                    detail = "" if r.status_code == 200 else r.text[:300]
                    digest = hashlib.sha256(r.content).hexdigest()
                    results.append((rid, r.status_code, digest, detail, after))

        threads = [
            threading.Thread(target=downloader, args=(round_ * 10 + k,))
            for k in range(RACE_THREADS)
        ]
        for t in threads:
            t.start()
        try:
            deadline = time.monotonic() + 60
            first = len(results)
            while len(results) < first + 2 * RACE_THREADS and time.monotonic() < deadline:
                time.sleep(0.01)
            run_gc(service, db, NOW + dt.timedelta(days=400))
            purged.set()
            done = len(results)
            while len(results) < done + 2 * RACE_THREADS and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        assert set(purge_events(service)) == set(expected)
    assert [r[1:] for r in results if r[1] not in (200, 410)] == []
    for rid, status, digest, detail, after in results:
        if status == 200:
            assert digest == expected[rid][1], "a short or different body"
            assert not after, "served after the purge finished"
        else:
            assert "removed on" in detail, detail
    assert {r[1] for r in results} == {200, 410}
    assert files_holding(service.settings.airlock_store_dir, b"race0x0-") == []


# --- trash that cannot be deleted ---------------------------------------------------------------


@contextlib.contextmanager
def undeletable(path: Path, under: Path) -> Iterator[None]:
    """``path`` made immutable (chattr +i: not even root can unlink it) for the block, wherever
    it is moved to under ``under`` meanwhile."""
    chattr = shutil.which("chattr") or "chattr"
    done = subprocess.run([chattr, "+i", str(path)], check=False, capture_output=True)
    require_component(done.returncode == 0, "chattr +i on the test file system (ext4)")
    try:
        yield
    finally:
        subprocess.run([chattr, "-R", "-i", str(under)], check=True, capture_output=True)


def events_of(service, action: str) -> list[dict]:
    with service.factory() as s:
        rows = s.execute(select(AuditEvent).where(AuditEvent.action == action)).scalars()
        return [json.loads(e.details) for e in rows]


def test_trash_that_cannot_be_deleted_is_reported_and_the_next_run_finishes_it(
    service, monkeypatch
):
    """Before, the trash was deleted with errors ignored: a run said it removed the content,
    exit 0, and the bytes stayed on disk (named again by every later run, silently)."""
    text = "group,count\nstuck,66\n"
    rid, fid, sha = released_with(service, "stuck.csv", text)
    age_release(service, rid, 366)
    store_dir = service.settings.airlock_store_dir
    copy = service.released_root / rid / str(fid) / "stuck.csv"
    with undeletable(copy, store_dir):
        result = cli(service, monkeypatch)
        assert result.exit_code == 1, result.output
        [run] = gc_events(service)
        trashed = f"released/.trash/{run['gc_run']}/{rid}/{fid}/stuck.csv"
        assert f"could not delete 1 item(s) of run {run['gc_run']}" in result.output
        assert f"{store_dir / trashed}: PermissionError: Operation not permitted" in result.output
        assert f"NOT DELETED {trashed}" in result.output
        # the decision stands: its record, and downloads refused
        assert set(purge_events(service)) == {rid}
        assert [p["request"] for p in run["released_content"]] == [rid]
        [incomplete] = events_of(service, "airlock_gc_incomplete")
        assert incomplete["gc_run"] == run["gc_run"]
        assert incomplete["not_deleted"] == [
            {"path": trashed, "error": "PermissionError: Operation not permitted"}
        ]
        with pytest.raises(Gone, match="removed on"):
            service.download(service.who("bob"), rid, fid)
        assert files_holding(store_dir, text.encode()) == [trashed]
        # while it cannot be deleted, every run says so
        again = cli(service, monkeypatch)
        assert again.exit_code == 1 and trashed in again.output
        assert len(events_of(service, "airlock_gc_incomplete")) == 2
    # once it can, the next run deletes it and names it as an earlier run's leftover
    result = cli(service, monkeypatch)
    assert result.exit_code == 0, result.output
    assert "finished an interrupted run: 1 item(s)" in result.output
    assert gc_events(service)[-1]["finished_from_interrupted_run"] == [rid]
    assert files_holding(store_dir, text.encode()) == []
    assert not service.store.exists(sha)
    with service.factory() as s:
        assert verify_chain(s) == []


# --- two runs at once count each removal once ---------------------------------------------------


def test_two_concurrent_runs_count_each_stale_staging_dir_and_upload_once(service, monkeypatch):
    """A run deletes its trash after letting go of the store lock; the stale staging
    directories and killed uploads it had listed were deleted there too, straight from where
    they were, so a second run starting meanwhile listed them again: two events for one
    removal."""
    root = service.released_root
    staging = root / ".staging" / "r-stale-0badcafe"
    (staging / "7").mkdir(parents=True)
    (staging / "7" / "out.csv").write_text("group,count\nstale,67\n")
    backdate(staging, 2 * 3600)
    upload = service.store.tmp / "put-killed"
    upload.write_text("group,count\nkilled,68\n")
    backdate(upload, 2 * 3600)
    real_rmtree = retention.shutil.rmtree
    second: list[retention.GcReport] = []
    started: list[bool] = []

    def rmtree(path, *args, **kwargs):
        if not started:  # the second run starts when the first one starts deleting
            started.append(True)
            second.append(collect(service, POLICY, now=NOW, actor="admin"))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(retention.shutil, "rmtree", rmtree)
    first = collect(service, POLICY, now=NOW)
    assert second, "the first run deleted nothing (it calls rmtree when it does)"
    runs = gc_events(service)
    assert len(runs) == 2
    staged = [s["path"] for r in runs for s in r["stale_staging"]]
    uploads = [u["name"] for r in runs for u in r["stale_uploads"]]
    assert staged == [".staging/r-stale-0badcafe"] and uploads == ["put-killed"]
    assert [r["finished_from_interrupted_run"] for r in runs] == [[], []]
    assert first.counts()["stale_staging"] + second[0].counts()["stale_staging"] == 1
    assert not staging.exists() and not upload.exists()
    assert files_holding(service.settings.airlock_store_dir, b"stale,67") == []
    assert files_holding(service.settings.airlock_store_dir, b"killed,68") == []


# --- working copies of killed disclosure checks -------------------------------------------------

CHECK_WORKER = """
import sys
from pathlib import Path

import airlock.service.core as core
from airlock.service.core import AirlockService, FileSpec
from airlock.service.db import make_engine
from tre.registry import load_registry
from tre.settings import Settings

url, schema, state_dir, policies, path = sys.argv[1:6]


def frozen(named, *args, **kwargs):
    # the check has its copy of the file: say so, and wait (the test kills us, or lets us on)
    print("CHECKING", named, flush=True)
    sys.stdin.readline()
    return real(named, *args, **kwargs)


real, core.run_checks = core.run_checks, frozen
settings = Settings(state_dir=Path(state_dir), policies_dir=Path(policies), airlock_db_url=url)
engine = make_engine(url, schema=schema or None)
service = AirlockService(settings, engine, load_registry(Path(policies)))
service.create_request(service.who("alice"), "wilms-outcomes", [FileSpec(path, "g")])
print("DONE", flush=True)
"""


def start_check(service, db, systmp: Path, name: str, text: str) -> subprocess.Popen:
    """A real snapshot (airlock create_request) in a process of its own, stopped inside its
    disclosure check, once the check's copy of the file is written."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CHECK_WORKER,
            db.url,
            db.schema or "",
            str(service.settings.state_dir),
            str(service.settings.policies_dir),
            write(service, name, text),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        # the system's temporary directory of the process: where the copies were made before
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "TMPDIR": str(systmp)},
    )
    line = proc.stdout.readline()
    assert line.startswith("CHECKING"), line
    return proc


def kill_9(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(10) == -signal.SIGKILL


def test_what_killed_checks_left_goes_at_the_next_start_or_run(service, db, tmp_path):
    """Privacy: a disclosure check works on a copy of the researcher's file; a worker killed
    during the check (kill -9, OOM) left that copy in /tmp/airlock-check-* for good. Now the
    next start or `airlock gc` removes it, but never the directory of a check still running
    in another process."""
    from airlock.service.runner import prepare

    systmp = tmp_path / "systmp"
    systmp.mkdir()
    checking = service.settings.airlock_store_dir / "checking"

    def copies(needle: str) -> list[str]:
        found = files_holding(systmp, needle.encode())
        return found + (files_holding(checking, needle.encode()) if checking.is_dir() else [])

    killed = start_check(service, db, systmp, "killed.csv", "group,count\nkilled-check,69\n")
    kill_9(killed)
    assert len(copies("killed-check")) == 1  # the check's copy, left behind
    live = start_check(service, db, systmp, "live.csv", "group,count\nlive-check,70\n")
    try:
        # the next start (on a database of its own: the start cleans the store, not the rows)
        prepare(
            service.settings.model_copy(
                update={"airlock_db_url": f"sqlite:///{tmp_path / 'start.sqlite'}"}
            )
        )
        assert copies("killed-check") == []
        assert len(copies("live-check")) == 1  # in use by the other process: kept
        live.stdin.write("\n")
        live.stdin.flush()
        assert live.stdout.readline().strip() == "DONE" and live.wait(30) == 0
    finally:
        if live.poll() is None:
            kill_9(live)
    assert copies("live-check") == []  # removed by its own check once done
    assert [r["title"] for r in service.list_requests(service.who("alice"))] == [""]

    # and at the next collection
    again = start_check(service, db, systmp, "again.csv", "group,count\nkilled-again,71\n")
    kill_9(again)
    [left] = [p for p in checking.iterdir()]
    assert collect(service, POLICY, now=NOW, dry_run=True).stale_checks[0]["name"] == left.name
    assert left.is_dir()
    report = collect(service, POLICY, now=NOW)
    size = len("group,count\nkilled-again,71\n")
    assert report.stale_checks == [{"name": left.name, "files": 1, "bytes": size}]
    assert copies("killed-again") == [] and not left.exists()
    assert gc_events(service)[-1]["stale_checks"] == report.stale_checks
    assert collect(service, POLICY, now=NOW).stale_checks == []

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

import datetime as dt
import hashlib
import os
import random
import subprocess
import sys
import threading
import time

import pytest
from sqlalchemy import select

from airlock.retention import RetentionPolicyError, collect, load_retention_policy
from airlock.service.core import Gone
from airlock.storage import sha256_file
from tests.airlock_service.test_retention import (
    GC_WORKER,
    NOW,
    age,
    age_release,
    cli,
    files_holding,
    gc_events,
    policy_file,
    purge_events,
    released_with,
    request,
    write,
)
from tre.audit import AuditEvent

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
        [
            sys.executable,
            str(GC_WORKER),
            db.url,
            db.schema or "",
            str(service.settings.state_dir),
            str(service.settings.policies_dir),
            when.isoformat(),
            "-1",  # no step to stop at
        ],
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
            with httpx.Client(
                base_url=client.live.base, headers={"Authorization": f"token {token}"}, timeout=60
            ) as http:
                while not stop.is_set():
                    rid = rng.choice(sorted(batch))
                    after = purged.is_set()
                    r = http.get(f"api/requests/{rid}/files/{batch[rid][0]}/download")
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
    assert [r[1:4] for r in results if r[1] not in (200, 410)] == []
    for rid, status, digest, detail, after in results:
        if status == 200:
            assert digest == expected[rid][1] and not after  # whole, exact, and before
        else:
            assert "removed on" in detail
    assert {r[1] for r in results} == {200, 410}
    assert files_holding(service.settings.airlock_store_dir, b"race0x0-") == []

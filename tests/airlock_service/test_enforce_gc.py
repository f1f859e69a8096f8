"""The expiry enforcer runs the airlock's retention collection (``tre project enforce``, on SQLite
and PostgreSQL): on the first pass, then not again until ``gc_interval_hours`` passed since the
last ``airlock_gc`` audit event (whoever ran it); ``--no-gc`` skips it; a failure of the
collection is reported and the enforcement still happens, and the other way round; an airlock
that does not exist yet is a note, not an error."""

from __future__ import annotations

import datetime as dt
import threading

import pytest
from typer.testing import CliRunner

from airlock import retention
from airlock.retention import collect, load_retention_policy
from airlock.service import db as airlock_db
from tests.airlock_service.conftest import _make_db
from tests.airlock_service.test_retention import (
    NOW,
    P,
    age,
    gc_events,
    policy_file,
    request,
    sha_of,
    write,
)
from tests.provision_support import FileExtracts, ListAudit
from tre.audit import AuditEvent
from tre.enforce import enforce, enforce_loop
from tre.project_edit import set_status
from tre.registry import load_registry
from tre.settings import Settings

HOUR = dt.timedelta(hours=1)


@pytest.fixture
def airlock_engine(service, db, monkeypatch):
    """The enforcer opens the airlock database from the settings; on PostgreSQL the test's
    schema cannot be named in a URL, so it gets the fixture's engine."""
    if db.schema:
        monkeypatch.setattr(airlock_db, "make_engine", lambda *_a, **_k: service.engine)
    return service.engine


def ended_snapshot(service, name: str) -> str:
    """The snapshot of a request withdrawn 100 days ago: the collection removes it."""
    rid, [fid] = request(service, write(service, f"{name}.csv", f"group,count\n{name},40\n"))
    service.withdraw(service.who("alice"), rid)
    age(service, rid, 100)
    return sha_of(service, rid, fid)


def run(service, now: dt.datetime, registry=None, extracts=None, **kwargs):
    return enforce(
        service.settings,
        registry or load_registry(service.settings.policies_dir),
        hub=None,
        extracts=extracts or FileExtracts(),
        audit=ListAudit(),
        now=now,
        **kwargs,
    )


def test_gc_runs_on_the_first_pass_then_only_once_the_interval_passed(service, airlock_engine):
    policy_file(service, snapshot_retention_days=30, gc_interval_hours=6)
    first = ended_snapshot(service, "first")
    report = run(service, NOW)
    assert report.ok, report.errors
    assert report.gc.ran and report.gc.last_run is None
    assert report.gc.counts["snapshots"] == 1 and not service.store.exists(first)
    assert report.did_something
    [event] = gc_events(service)
    assert [s["sha256"] for s in event["snapshots"]] == [first]
    with service.factory() as s:
        actors = s.query(AuditEvent.actor).filter(AuditEvent.action == "airlock_gc").all()
    assert actors == [("tre-enforce",)]
    # within the interval (a new process: the audit log is what it remembers): not again
    second = ended_snapshot(service, "second")
    report = run(service, NOW + 5 * HOUR)
    assert report.ok and not report.gc.ran and report.gc.note.startswith("not due")
    assert report.gc.last_run is not None and not report.did_something
    assert service.store.exists(second) and len(gc_events(service)) == 1
    # once it passed: again
    report = run(service, NOW + 7 * HOUR)
    assert report.ok and report.gc.ran and report.gc.counts["snapshots"] == 1
    assert not service.store.exists(second) and len(gc_events(service)) == 2


def test_the_default_interval_is_a_day(service, airlock_engine):
    assert load_retention_policy(service.settings.policies_dir).gc_interval_hours == 24
    assert run(service, NOW).gc.ran
    assert run(service, NOW + 23 * HOUR).gc.note.startswith("not due")
    assert run(service, NOW + 25 * HOUR).gc.ran


def test_an_admins_airlock_gc_counts_as_the_last_run(service, airlock_engine):
    collect(service, load_retention_policy(service.settings.policies_dir))  # `airlock gc`
    sha = ended_snapshot(service, "after-the-admin")
    report = run(service, NOW + 2 * HOUR)
    assert report.gc.note.startswith("not due") and service.store.exists(sha)


def test_a_dry_run_does_not_count(service, airlock_engine):
    sha = ended_snapshot(service, "dry")
    collect(service, load_retention_policy(service.settings.policies_dir), dry_run=True)
    report = run(service, NOW)
    assert report.gc.ran and not service.store.exists(sha)


def test_no_gc_skips_it(service, airlock_engine):
    sha = ended_snapshot(service, "kept")
    report = run(service, NOW, gc=False)
    assert report.ok and not report.gc.ran and "--no-gc" in report.gc.note
    assert service.store.exists(sha) and gc_events(service) == []


def enforce_cli(service, monkeypatch, *args: str):
    from tre.cli import app

    monkeypatch.setenv("TRE_STATE_DIR", str(service.settings.state_dir))
    monkeypatch.setenv("TRE_POLICIES_DIR", str(service.settings.policies_dir))
    monkeypatch.setenv("TRE_AIRLOCK_DB_URL", service.settings.airlock_db_url)
    return CliRunner().invoke(app, ["project", "enforce", "--no-hub", *args])


def test_command_no_gc_then_gc(service, airlock_engine, monkeypatch):
    sha = ended_snapshot(service, "cli")
    skipped = enforce_cli(service, monkeypatch, "--no-gc")
    assert skipped.exit_code == 0, skipped.output
    assert "airlock gc: skipped (--no-gc)" in skipped.output
    assert service.store.exists(sha) and gc_events(service) == []
    ran = enforce_cli(service, monkeypatch)
    assert ran.exit_code == 0, ran.output
    assert "airlock gc: removed 1 snapshot(s) of ended requests" in ran.output
    assert not service.store.exists(sha) and len(gc_events(service)) == 1
    again = enforce_cli(service, monkeypatch)
    assert again.exit_code == 0 and "airlock gc: not due" in again.output


@pytest.mark.parametrize("failure", ["invalid policy", "rename fails"])
def test_a_gc_failure_is_reported_and_the_pass_goes_on(
    service, airlock_engine, monkeypatch, failure
):
    sha = ended_snapshot(service, "failing")
    set_status(service.settings.policies_dir, P, "closed")
    registry = load_registry(service.settings.policies_dir)
    path = service.settings.policies_dir / "retention.yaml"
    good_policy, real_rename = path.read_text(), retention.os.rename
    if failure == "invalid policy":
        path.write_text(good_policy.replace("gc_interval_hours: 24", "gc_interval_hours: 0"))
    else:  # the disk refuses the move into the trash, in the middle of the run

        def refuse(*_args):
            raise PermissionError("simulated: read-only file system")

        monkeypatch.setattr(retention.os, "rename", refuse)
    report = run(service, NOW, registry=registry, archive_without_hub=True)
    # the workspace of the closed project is archived all the same
    assert len(report.archived) == 1 and not (service.settings.workspaces_dir / P).exists()
    # the failure is reported (an error: exit 1), nothing of the collection happened
    assert report.gc.error and not report.gc.ran and not report.ok
    assert report.errors == [report.gc.summary()]
    assert ("gc_interval_hours" if failure == "invalid policy" else "read-only") in report.gc.error
    assert service.store.exists(sha) and gc_events(service) == []
    # no event recorded, so the next pass tries again (and now it works)
    monkeypatch.setattr(retention.os, "rename", real_rename)
    path.write_text(good_policy)
    report = run(service, NOW + HOUR, registry=registry)
    assert report.ok, report.errors
    assert report.gc.ran and not service.store.exists(sha)


class BrokenPooledStore(FileExtracts):
    def source_version(self, settings):
        raise RuntimeError("simulated: the pooled store cannot be read")


def test_an_enforcement_failure_does_not_stop_gc(service, airlock_engine):
    sha = ended_snapshot(service, "enforcement-fails")
    report = run(service, NOW, extracts=BrokenPooledStore())
    assert report.errors == [
        "enforcement failed: RuntimeError: simulated: the pooled store cannot be read"
    ]
    assert report.gc.ran and not service.store.exists(sha)


def test_the_loop_collects_on_its_first_pass_only(service, airlock_engine):
    service.settings.enforce_interval_seconds = 1
    first = ended_snapshot(service, "loop")
    reports, stop = [], threading.Event()

    def on_report(report):
        reports.append(report)
        if len(reports) == 1:
            ended_snapshot(service, "loop-second")
        else:
            stop.set()

    loop = threading.Thread(
        target=enforce_loop,
        args=(service.settings, lambda: load_registry(service.settings.policies_dir)),
        kwargs={
            "extracts": FileExtracts(),
            "audit": ListAudit(),
            "stop": stop,
            "on_report": on_report,
            "use_hub": False,
        },
    )
    loop.start()
    loop.join(60)
    assert not loop.is_alive()
    assert reports[0].gc.ran and not service.store.exists(first)
    assert reports[1].gc.note.startswith("not due") and len(gc_events(service)) == 1
    assert len([s for s, _ in service.store.blobs()]) == 1  # the second pass's snapshot


# --- no airlock yet ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_an_airlock_database_not_migrated_yet_is_a_note(backend, tmp_path, request, monkeypatch):
    from sqlalchemy import inspect

    from tests.airlock_service.conftest import make_policies

    fresh = _make_db(backend, tmp_path, request)  # exists, but no tables
    with fresh.engine.connect():
        pass  # SQLite creates the file on the first connection
    monkeypatch.setattr(airlock_db, "make_engine", lambda *_a, **_k: fresh.engine)
    settings = Settings(
        state_dir=tmp_path / "state", policies_dir=make_policies(tmp_path), airlock_db_url=fresh.url
    )
    (settings.airlock_store_dir / "snapshots").mkdir(parents=True)
    report = enforce(
        settings,
        load_registry(settings.policies_dir),
        hub=None,
        extracts=FileExtracts(),
        audit=ListAudit(),
    )
    assert report.ok, report.errors
    assert report.gc.note == "skipped: the airlock database is not migrated yet"
    assert inspect(fresh.engine).get_table_names() == []  # nothing was created


def test_no_snapshot_store_yet_is_a_note(service, airlock_engine):
    store = service.settings.airlock_store_dir / "snapshots"
    store.rename(store.with_name("elsewhere"))
    report = run(service, NOW)
    assert report.ok and report.gc.note.startswith("skipped: no airlock snapshot store yet")
    assert not store.exists() and gc_events(service) == []


def test_the_enforcer_purges_released_contents_past_their_retention(service, airlock_engine):
    from tests.airlock_service.test_retention import age_release, purge_events, released_with

    rid, _fid, sha = released_with(service, "enforced.csv", "group,count\nenf,51\n")
    age_release(service, rid, 366)  # the shipped policy keeps released contents 365 days
    report = run(service, NOW)
    assert report.ok, report.errors
    assert report.gc.counts["released_content"] == 1 and report.did_something
    assert "purged the file contents of 1 request(s)" in report.gc.summary()
    assert not service.store.exists(sha) and not (service.released_root / rid).exists()
    events = purge_events(service)
    assert set(events) == {rid} and events[rid]["actor"] == "tre-enforce"

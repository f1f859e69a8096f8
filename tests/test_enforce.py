"""The end date enforces itself: a project whose end date is in the past, on a real hub."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import tarfile

import pytest

from tests.provision_hub import RunningHub, proxy_or_skip, start_hub
from tests.provision_support import FileExtracts, ListAudit, make_settings
from tre.enforce import archive_dir, enforce, manifest_path, purge_archives
from tre.project_edit import remove_member, set_end_date, set_status
from tre.provision import AppliedState, HubClient, group_name, reconcile, state_path
from tre.registry import load_registry

TODAY = dt.date(2026, 11, 29)


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> RunningHub:
    running = start_hub(tmp_path_factory.mktemp("hub"), proxy_or_skip())
    yield running
    running.stop()


@pytest.fixture
def env(tmp_path, hub):
    token_file = tmp_path / "hub.token"
    token_file.write_text(hub.token)
    settings = make_settings(tmp_path, hub_api_url=hub.api_url, hub_admin_token_file=token_file)
    client = HubClient(hub.api_url, hub.token)
    for name in client.list_groups():
        client._request("DELETE", f"/groups/{name}")
    extracts, audit = FileExtracts(), ListAudit()
    # provisioned while active
    rec = reconcile(
        settings,
        load_registry(settings.policies_dir),
        actor="admin",
        audit=audit,
        extracts=extracts,
        today=TODAY,
    )
    assert rec.result is not None and rec.result.ok and rec.hub_warning is None
    yield settings, client, extracts, audit
    client.close()


def _workspace(settings, pid: str) -> dict[str, bytes]:
    ws = settings.workspaces_dir / pid
    (ws / "analysis").mkdir(parents=True)
    files = {"analysis/table.csv": b"group,n\nA,12\n", "notes.md": b"# notes\n"}
    for name, data in files.items():
        (ws / name).write_bytes(data)
    return files


def test_expired_project_is_stopped_emptied_removed_and_archived(env, hub):
    settings, client, extracts, audit = env
    files = _workspace(settings, "wilms-outcomes")
    hub.start_server("alice", "wilms-outcomes")
    hub.start_server("carol", "leukaemia-incidence")
    # the end date passes: the declaration now ends before today
    set_end_date(settings.policies_dir, "wilms-outcomes", dt.date(2026, 3, 31))
    registry = load_registry(settings.policies_dir)

    report = enforce(settings, registry, hub=client, extracts=extracts, audit=audit, today=TODAY)
    assert report.ok, report.errors
    # running sandbox stopped, access revoked, extract removed
    assert client.running_servers("wilms-outcomes") == []
    assert client.group_members(group_name("wilms-outcomes")) == set()
    assert not extracts.path(settings, "wilms-outcomes").exists()
    state = AppliedState.load(state_path(settings))
    assert state.projects["wilms-outcomes"]["status"] == "expired"
    # workspace archived with its files and a deletion date of end + retention_days (365)
    assert not (settings.workspaces_dir / "wilms-outcomes").exists()
    [archive] = report.archived
    assert archive.parent == archive_dir(settings) / "wilms-outcomes"
    with tarfile.open(archive) as tar:
        for name, data in files.items():
            assert tar.extractfile(f"wilms-outcomes/{name}").read() == data
    manifest = json.loads(manifest_path(archive).read_text())
    assert manifest["delete_after"] == "2027-03-31"
    # the other, active project is untouched
    assert client.running_servers("leukaemia-incidence") == ["carol"]
    assert extracts.path(settings, "leukaemia-incidence").exists()
    assert client.group_members(group_name("leukaemia-incidence")) == {"carol"}
    # audited
    assert {"project.stop_servers", "project.remove_extract", "project.archive_workspace"} <= set(
        audit.actions()
    )
    # idempotent: a second pass does nothing
    again = enforce(settings, registry, hub=client, extracts=extracts, audit=audit, today=TODAY)
    assert again.ok and not again.did_something
    client.stop_server("carol", "leukaemia-incidence")


def test_enforce_does_not_apply_other_declared_changes(env):
    """Enforcement only takes access away; new grants wait for an admin's `apply`."""
    settings, client, extracts, audit = env
    path = settings.policies_dir / "projects" / "leukaemia-incidence.yaml"
    path.write_text(path.read_text().replace("iccc3_groups: [I]", "iccc3_groups: [I, II]"))
    builds = list(extracts.builds)
    report = enforce(
        settings,
        load_registry(settings.policies_dir),
        hub=client,
        extracts=extracts,
        audit=audit,
        today=TODAY,
    )
    assert report.ok and not report.did_something
    assert extracts.builds == builds


def test_a_member_removed_from_an_active_project_loses_the_running_sandbox_at_once(env, hub):
    """Revocation: bob is taken off an active project by editing its file (as a pull of the
    policies repository, or an editor, does; no `apply`). The enforcer's next pass must stop
    his running sandbox (it mounts the project's data) and take him out of the project's hub
    group; before, it only acted on projects that were no longer active, so his sandbox ran
    on until someone remembered to run `tre project apply`."""
    settings, client, extracts, audit = env
    hub.start_server("alice", "wilms-outcomes")
    hub.start_server("bob", "wilms-outcomes")
    remove_member(settings.policies_dir, "wilms-outcomes", "bob")
    registry = load_registry(settings.policies_dir)

    report = enforce(settings, registry, hub=client, extracts=extracts, audit=audit, today=TODAY)
    assert report.ok, report.errors
    assert client.running_servers("wilms-outcomes") == ["alice"]  # bob's stopped, alice's not
    assert client.group_members(group_name("wilms-outcomes")) == {"alice"}
    assert extracts.path(settings, "wilms-outcomes").exists()  # the project goes on
    assert ("project.stop_servers", {"detail": "bob", "users": ["bob"]}) in [
        (e[1], e[3]) for e in audit.events
    ]
    # taking access away is all it does: nothing granted, nothing rebuilt, and idempotent
    assert {c.action.value for c in report.changes} == {"stop_servers", "hub_revoke"}
    again = enforce(settings, registry, hub=client, extracts=extracts, audit=audit, today=TODAY)
    assert again.ok and not again.did_something
    client.stop_server("alice", "wilms-outcomes")


def test_staff_removed_from_staff_yaml_leave_the_staff_hub_groups(env):
    """The hub group tre-admins holds the tre-admin role; JupyterHub keeps a user's groups on
    their API tokens until a refresh it never makes for someone the registry no longer knows
    (tests/hub/test_revocation.py shows that on a real TRE hub). The enforcer removes from the
    staff groups whoever staff.yaml no longer lists, and adds nobody (that takes a login)."""
    settings, client, extracts, audit = env
    groups = {"tre-admins": ["admin", "former-admin"], "output-checkers": ["checker1", "eve"]}
    for group, users in groups.items():
        client.create_group(group)
        client.add_to_group(group, users)
    registry = load_registry(settings.policies_dir)
    assert registry.staff.admins == ["admin"]
    assert registry.staff.output_checkers == ["checker1", "checker2"]

    report = enforce(settings, registry, hub=client, extracts=extracts, audit=audit, today=TODAY)
    assert report.ok, report.errors
    assert client.group_members("tre-admins") == {"admin"}
    assert client.group_members("output-checkers") == {"checker1"}  # checker2 not added
    assert report.staff_revoked == [
        ("tre-admins", ["former-admin"]),
        ("output-checkers", ["eve"]),
    ]
    assert ("staff.hub_revoke", "group:tre-admins", {"users": ["former-admin"]}) in [
        e[1:] for e in audit.events
    ]
    again = enforce(settings, registry, hub=client, extracts=extracts, audit=audit, today=TODAY)
    assert again.ok and not again.did_something


def test_suspended_project_loses_access_but_keeps_workspace(env):
    settings, client, extracts, audit = env
    _workspace(settings, "leukaemia-incidence")
    set_status(settings.policies_dir, "leukaemia-incidence", "suspended")
    report = enforce(
        settings,
        load_registry(settings.policies_dir),
        hub=client,
        extracts=extracts,
        audit=audit,
        today=TODAY,
    )
    assert report.ok
    assert not extracts.path(settings, "leukaemia-incidence").exists()
    assert client.group_members(group_name("leukaemia-incidence")) == set()
    assert (settings.workspaces_dir / "leukaemia-incidence" / "notes.md").exists()
    assert report.archived == []


def test_archives_past_their_date_are_deleted(env):
    settings, client, extracts, audit = env
    _workspace(settings, "wilms-outcomes")
    set_status(settings.policies_dir, "wilms-outcomes", "closed")
    registry = load_registry(settings.policies_dir)
    report = enforce(settings, registry, hub=client, extracts=extracts, audit=audit, today=TODAY)
    [archive] = report.archived
    manifest = json.loads(manifest_path(archive).read_text())
    # closed before its end date: retention counts from the day it was closed
    assert manifest["ended_on"] == TODAY.isoformat()
    delete_after = dt.date.fromisoformat(manifest["delete_after"])
    assert delete_after == TODAY + dt.timedelta(days=365)
    assert purge_archives(settings, delete_after) == []  # kept through its last day
    assert archive.exists()
    later = delete_after + dt.timedelta(days=1)
    report = enforce(settings, registry, hub=client, extracts=extracts, audit=audit, today=later)
    assert report.deleted == [archive]
    assert not archive.exists() and not manifest_path(archive).exists()
    assert "project.delete_archive" in audit.actions()


def test_unreadable_manifest_is_never_purged(tmp_path):
    settings = make_settings(tmp_path)
    d = archive_dir(settings) / "x-project"
    d.mkdir(parents=True)
    (d / "x-project-1.tar.gz").write_bytes(b"data")
    (d / "x-project-1.json").write_text("{not json")
    assert purge_archives(settings, dt.date(2100, 1, 1)) == []
    assert (d / "x-project-1.tar.gz").exists()


def _run_enforce_loop(settings, on_report, stop, **kwargs) -> tuple:
    """Apply the declarations, then run ``enforce_loop`` (no hub) in a thread until ``stop``
    is set or 30 s pass; return the extracts, and whether the loop was still running."""
    import threading

    from tre.enforce import enforce_loop

    extracts, audit = FileExtracts(), ListAudit()
    reconcile(
        settings,
        load_registry(settings.policies_dir),
        actor="admin",
        use_hub=False,
        audit=audit,
        extracts=extracts,
    )
    loop = threading.Thread(
        target=enforce_loop,
        args=(settings, lambda: load_registry(settings.policies_dir)),
        kwargs={
            "extracts": extracts,
            "audit": audit,
            "stop": stop,
            "on_report": on_report,
            "use_hub": False,
            **kwargs,
        },
    )
    loop.start()
    loop.join(30)
    alive = loop.is_alive()
    stop.set()
    loop.join(10)
    return extracts, alive


def test_enforce_loop_rereads_declarations_each_pass(tmp_path):
    import threading

    settings = make_settings(tmp_path, enforce_interval_seconds=1)
    stop, reports = threading.Event(), []

    def on_report(report):
        reports.append(report)
        if len(reports) == 1:  # between passes, the project is suspended by hand
            set_status(settings.policies_dir, "wilms-outcomes", "suspended")
        else:
            stop.set()

    extracts, alive = _run_enforce_loop(settings, on_report, stop)
    assert not alive
    assert not reports[0].did_something
    assert ("wilms-outcomes", "remove_extract") in {
        (c.project, c.action.value) for c in reports[1].changes
    }
    assert not extracts.path(settings, "wilms-outcomes").exists()


def test_enforce_loop_acts_within_seconds_of_a_declaration_change(tmp_path):
    """Between its passes (every enforce_interval_seconds, 300 s by default) the loop watches
    the declarations: a suspension must take effect within enforce_poll_seconds, not at the
    next interval. Here the interval is an hour; the change must be acted on in seconds (the
    default enforce_poll_seconds, 5)."""
    import threading
    import time

    settings = make_settings(tmp_path, enforce_interval_seconds=3600)
    stop, reports, changed_at = threading.Event(), [], []

    def on_report(report):
        reports.append((time.monotonic(), report))
        if len(reports) == 1:
            time.sleep(0.5)  # the pass is over; the project is suspended while the loop waits
            set_status(settings.policies_dir, "wilms-outcomes", "suspended")
            changed_at.append(time.monotonic())
        else:
            stop.set()

    extracts, _ = _run_enforce_loop(settings, on_report, stop, gc=False)
    assert len(reports) == 2, "no pass after the declaration changed"
    took = reports[1][0] - changed_at[0]
    assert took < 10, took
    assert not extracts.path(settings, "wilms-outcomes").exists()


def test_the_loop_wakes_when_the_local_date_changes(tmp_path, monkeypatch):
    """An end date passes at midnight without any file changing: the wait between passes ends
    at the next poll after the date changes, not an interval (here an hour) later."""
    import threading
    import time

    import tre.enforce as enforce_module

    settings = make_settings(tmp_path, enforce_interval_seconds=3600, enforce_poll_seconds=1)
    days = iter([TODAY, TODAY, TODAY + dt.timedelta(days=1)])
    monkeypatch.setattr(enforce_module, "_local_date", lambda: next(days, TODAY))
    stamp = enforce_module._policies_stamp_or_none(settings)
    start = time.monotonic()
    enforce_module.wait_for_next_pass(settings, stamp, threading.Event())
    assert time.monotonic() - start < 10  # two polls, then the new day


def test_without_a_hub_the_workspace_is_not_archived(tmp_path):
    """Nobody can say whether a sandbox still writes to it: wait, unless told there is no hub."""
    settings = make_settings(tmp_path)
    extracts, audit = FileExtracts(), ListAudit()
    _workspace(settings, "wilms-outcomes")
    set_status(settings.policies_dir, "wilms-outcomes", "closed")
    registry = load_registry(settings.policies_dir)
    report = enforce(settings, registry, hub=None, extracts=extracts, audit=audit, today=TODAY)
    assert report.archived == [] and any("not archived" in e for e in report.errors)
    assert (settings.workspaces_dir / "wilms-outcomes" / "notes.md").exists()
    report = enforce(
        settings,
        registry,
        hub=None,
        extracts=extracts,
        audit=audit,
        today=TODAY,
        archive_without_hub=True,
    )
    assert len(report.archived) == 1 and report.ok
    assert not (settings.workspaces_dir / "wilms-outcomes").exists()


def test_without_an_airlock_database_gc_is_a_note_not_an_error(tmp_path):
    """A fresh install: the enforcer runs before the airlock ever did."""
    settings = make_settings(tmp_path)
    db_file = settings.state_dir / "airlock.sqlite"
    assert settings.airlock_db_url == f"sqlite:///{db_file}"
    report = enforce(
        settings,
        load_registry(settings.policies_dir),
        hub=None,
        extracts=FileExtracts(),
        audit=ListAudit(),
        today=TODAY,
    )
    assert report.ok, report.errors
    assert report.gc is not None and not report.gc.ran
    assert report.gc.note == f"skipped: no airlock database yet ({db_file})"
    # looking created nothing: neither the database nor the store
    assert not db_file.exists() and not settings.airlock_store_dir.exists()


def _nest(root, depth: int) -> None:
    """A chain of ``depth`` directories, made as a sandbox can (one level at a time, relative
    to the last one: no path length limit applies), with a file at the bottom."""
    import os

    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir("d", dir_fd=fd)
        below = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = below
    leaf = os.open("leaf.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
    os.write(leaf, b"bottom\n")
    os.close(leaf)
    os.close(fd)


@pytest.fixture
def deep_tree_cleanup(tmp_path):
    """If the enforcer leaves the deep chain behind, remove it with rm: pytest's own cleanup
    (shutil.rmtree) would hit the RecursionError under attack here, in every later session."""
    import subprocess

    yield
    subprocess.run(["rm", "-rf", "--one-file-system", "--", str(tmp_path)], check=False)


def test_a_hostile_workspace_is_archived_and_stops_nothing_else(
    tmp_path, monkeypatch, deep_tree_cleanup
):
    """What a researcher leaves in the workspace: a directory chain far deeper than Python's
    recursion limit and longer than PATH_MAX, a symlink to a secret file of the host, a FIFO,
    a socket. The enforcer (root) archives links as links and never blocks on the FIFO; the
    deep chain is archived and deleted like the rest; and nothing of it stops the pass for
    the other projects (their archives, the purge of old ones)."""
    import os
    import socket

    settings = make_settings(tmp_path)
    extracts, audit = FileExtracts(), ListAudit()
    secret = tmp_path / "host-secret"
    secret.write_bytes(b"TOP-SECRET-HOST-BYTES")
    os.chmod(secret, 0o600)
    hostile = settings.workspaces_dir / "leukaemia-incidence"  # sorted first: archived first
    hostile.mkdir(parents=True)
    _nest(hostile, 2100)  # 2100 x "d/" > PATH_MAX (4096), and > the recursion limit (1000)
    (hostile / "secret.csv").symlink_to(secret)
    os.mkfifo(hostile / "pipe.csv")
    listener = socket.socket(socket.AF_UNIX)
    monkeypatch.chdir(hostile)  # the socket's path would be too long for AF_UNIX
    listener.bind("server.sock")
    monkeypatch.undo()
    files = _workspace(settings, "wilms-outcomes")
    # an old archive of another project, past its deletion date: this pass must purge it
    old = archive_dir(settings) / "old-project"
    old.mkdir(parents=True)
    (old / "old-project-1.tar.gz").write_bytes(b"old")
    (old / "old-project-1.json").write_text(
        json.dumps({"archive": "old-project-1.tar.gz", "delete_after": "2020-01-01"})
    )
    for pid in ("leukaemia-incidence", "wilms-outcomes"):
        set_status(settings.policies_dir, pid, "closed")
    registry = load_registry(settings.policies_dir)
    try:
        report = enforce(
            settings,
            registry,
            hub=None,
            extracts=extracts,
            audit=audit,
            today=TODAY,
            archive_without_hub=True,
            gc=False,
        )
    finally:
        listener.close()
    assert report.ok, report.errors
    assert report.deleted == [old / "old-project-1.tar.gz"]
    assert {a.parent.name for a in report.archived} == {"leukaemia-incidence", "wilms-outcomes"}
    assert not hostile.exists() and not (settings.workspaces_dir / "wilms-outcomes").exists()
    assert secret.read_bytes() == b"TOP-SECRET-HOST-BYTES"  # untouched
    for archive in report.archived:
        with tarfile.open(archive) as tar:
            members = {m.name: m for m in tar.getmembers()}
            if archive.parent.name == "wilms-outcomes":
                for name, data in files.items():
                    assert tar.extractfile(f"wilms-outcomes/{name}").read() == data
                continue
            link = members["leukaemia-incidence/secret.csv"]
            assert link.issym() and link.linkname == str(secret)
            assert members["leukaemia-incidence/pipe.csv"].isfifo()
            deep = "leukaemia-incidence/" + "d/" * 2100 + "leaf.txt"
            assert tar.extractfile(deep).read() == b"bottom\n"
        with gzip.open(archive) as fh:
            assert b"TOP-SECRET-HOST-BYTES" not in fh.read()

"""Provisioning as code: plan/apply against a real JupyterHub, idempotence, crash safety, edits."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from typer.testing import CliRunner

from tests.provision_hub import RunningHub, proxy_or_skip, start_hub
from tests.provision_support import FileExtracts, ListAudit, make_settings
from tre.project_edit import add_member, create_project, grant, remove_member, set_status
from tre.provision import (
    AppliedState,
    HubClient,
    apply_plan,
    group_name,
    plan,
    reconcile,
    state_path,
)
from tre.registry import RegistryError, load_registry

TODAY = dt.date(2026, 11, 29)


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> RunningHub:
    running = start_hub(tmp_path_factory.mktemp("hub"), proxy_or_skip())
    yield running
    running.stop()


@pytest.fixture
def env(tmp_path, hub):
    """Settings in a fresh state dir, a hub client, an extract builder, an audit sink."""
    token_file = tmp_path / "hub.token"
    token_file.write_text(hub.token)
    settings = make_settings(tmp_path, hub_api_url=hub.api_url, hub_admin_token_file=token_file)
    client = HubClient(hub.api_url, hub.token)
    # each test gets a clean hub: no project groups left by another test
    for name in client.list_groups():
        client._request("DELETE", f"/groups/{name}")
    yield settings, client, FileExtracts(), ListAudit()
    client.close()


def run(settings, hub, extracts, audit, today=TODAY, dry_run=False):
    return reconcile(
        settings,
        load_registry(settings.policies_dir),
        actor="admin",
        dry_run=dry_run,
        audit=audit,
        extracts=extracts,
        today=today,
    )


def actions(changes) -> set[tuple[str, str]]:
    return {(c.project, c.action.value) for c in changes}


def test_first_apply_provisions_everything_and_second_plans_nothing(env):
    settings, hub, extracts, audit = env
    first = run(settings, hub, extracts, audit)
    assert first.hub_warning is None
    assert first.result is not None and first.result.ok
    for pid in ("wilms-outcomes", "leukaemia-incidence"):
        assert (pid, "create") in actions(first.changes)
        assert (pid, "build_extract") in actions(first.changes)
        assert extracts.path(settings, pid).exists()
    # the hub mirrors membership, read back through the real REST API
    assert hub.group_members(group_name("wilms-outcomes")) == {"alice", "bob"}
    assert hub.group_members(group_name("leukaemia-incidence")) == {"carol"}
    # the applied state is on disk
    state = AppliedState.load(state_path(settings))
    assert state.projects["wilms-outcomes"]["members"] == {"alice": "lead", "bob": "researcher"}
    # every applied step was audited
    assert len(audit.events) == len(first.changes)
    assert all(e[0] == "admin" and e[2].startswith("project:") for e in audit.events)
    # idempotent: a second apply plans nothing and changes nothing
    builds = list(extracts.builds)
    second = run(settings, hub, extracts, audit)
    assert second.changes == [] and second.result is None
    assert extracts.builds == builds


def test_dry_run_changes_nothing(env):
    settings, hub, extracts, audit = env
    rec = run(settings, hub, extracts, audit, dry_run=True)
    assert rec.changes and rec.result is None
    assert not state_path(settings).exists()
    assert not any(extracts.path(settings, p).exists() for p in ("wilms-outcomes",))
    assert hub.group_members(group_name("wilms-outcomes")) is None
    assert audit.events == []


def test_grant_change_rebuilds_only_that_extract(env):
    settings, hub, extracts, audit = env
    run(settings, hub, extracts, audit)
    before = extracts.content(settings, "leukaemia-incidence")
    grant(settings.policies_dir, "leukaemia-incidence", "followup", ["*"])
    rec = run(settings, hub, extracts, audit)
    assert actions(rec.changes) == {("leukaemia-incidence", "build_extract")}
    after = extracts.content(settings, "leukaemia-incidence")
    assert "followup" not in before["grants"] and after["grants"]["followup"] == ["*"]
    assert run(settings, hub, extracts, audit).changes == []


def test_row_filter_and_site_condition_changes_rebuild(env):
    settings, hub, extracts, audit = env
    run(settings, hub, extracts, audit)
    # a site withdraws public-health use: only the public-health project's extract is affected
    site = settings.policies_dir / "sites" / "uk-ccr.yaml"
    site.write_text(site.read_text().replace("[academic, public_health]", "[academic]"))
    rec = run(settings, hub, extracts, audit)
    assert ("leukaemia-incidence", "build_extract") in actions(rec.changes)
    assert "uk-ccr" not in extracts.content(settings, "leukaemia-incidence")["sites"]
    # a row filter change rebuilds that project
    path = settings.policies_dir / "projects" / "wilms-outcomes.yaml"
    path.write_text(path.read_text().replace("iccc3_groups: [VI]", "iccc3_groups: [VI, XII]"))
    rec = run(settings, hub, extracts, audit)
    assert actions(rec.changes) == {("wilms-outcomes", "build_extract")}


def test_new_pooled_version_rebuilds_active_extracts(env):
    settings, hub, extracts, audit = env
    run(settings, hub, extracts, audit)
    extracts.pooled_version = "2"  # a new batch was ingested
    rec = run(settings, hub, extracts, audit)
    assert actions(rec.changes) == {
        ("wilms-outcomes", "build_extract"),
        ("leukaemia-incidence", "build_extract"),
    }
    assert run(settings, hub, extracts, audit).changes == []


def test_real_extract_builder_reports_pooled_version(tmp_path):
    from tre.provision import TreExtracts

    settings = make_settings(tmp_path)
    assert TreExtracts().source_version(settings) == "none"


def test_removed_member_loses_group_and_running_server(env, hub):  # noqa: ANN001
    settings, client, extracts, audit = env
    run(settings, client, extracts, audit)
    running_hub: RunningHub = hub
    running_hub.start_server("bob", "wilms-outcomes")
    assert client.running_servers("wilms-outcomes") == ["bob"]
    remove_member(settings.policies_dir, "wilms-outcomes", "bob")
    rec = run(settings, client, extracts, audit)
    assert actions(rec.changes) == {
        ("wilms-outcomes", "remove_member"),
        ("wilms-outcomes", "hub_revoke"),
        ("wilms-outcomes", "stop_servers"),
    }
    assert client.running_servers("wilms-outcomes") == []
    assert client.group_members(group_name("wilms-outcomes")) == {"alice"}
    assert run(settings, client, extracts, audit).changes == []
    # and adding a member back grants access again
    add_member(settings.policies_dir, "wilms-outcomes", "dave", "researcher", "Example College")
    rec = run(settings, client, extracts, audit)
    assert actions(rec.changes) == {
        ("wilms-outcomes", "add_member"),
        ("wilms-outcomes", "hub_grant"),
    }
    assert client.group_members(group_name("wilms-outcomes")) == {"alice", "dave"}


def test_a_narrowed_extract_stops_the_sandboxes_that_mount_the_old_one(env, hub):  # noqa: ANN001
    """A sandbox bind-mounts its project's extract file as it was at start; a rebuild swaps a
    new file in under the same name and the sandbox keeps reading the replaced one (checked
    with bwrap: a bound file that is replaced on the host still reads the old bytes inside).
    So a revoked column, or the rows of a site that withdrew this purpose, stayed readable in
    every running sandbox of the project until it stopped. After such a rebuild the running
    sandboxes are stopped (they restart on the new file); a new ingest alone stops nothing."""
    settings, client, extracts, audit = env
    run(settings, client, extracts, audit)
    running_hub: RunningHub = hub
    running_hub.start_server("alice", "wilms-outcomes")
    running_hub.start_server("carol", "leukaemia-incidence")

    grant(settings.policies_dir, "wilms-outcomes", "event", ["*"], revoke=True)
    rec = run(settings, client, extracts, audit)
    assert "event" not in extracts.content(settings, "wilms-outcomes")["grants"]
    assert client.running_servers("wilms-outcomes") == []
    assert actions(rec.changes) == {
        ("wilms-outcomes", "withdraw_extract"),
        ("wilms-outcomes", "build_extract"),
        ("wilms-outcomes", "stop_servers"),
    }
    assert client.running_servers("leukaemia-incidence") == ["carol"]  # another project
    assert run(settings, client, extracts, audit).changes == []

    # a site withdraws public-health use: carol's project loses that site's rows
    site = settings.policies_dir / "sites" / "uk-ccr.yaml"
    site.write_text(site.read_text().replace("[academic, public_health]", "[academic]"))
    rec = run(settings, client, extracts, audit)
    assert ("leukaemia-incidence", "stop_servers") in actions(rec.changes)
    assert client.running_servers("leukaemia-incidence") == []

    # a new ingest (same grants, more rows) rebuilds but leaves the running sandbox alone
    running_hub.start_server("carol", "leukaemia-incidence")
    extracts.pooled_version = "2"
    rec = run(settings, client, extracts, audit)
    assert ("leukaemia-incidence", "build_extract") in actions(rec.changes)
    assert ("leukaemia-incidence", "stop_servers") not in actions(rec.changes)
    assert client.running_servers("leukaemia-incidence") == ["carol"]
    client.stop_server("carol", "leukaemia-incidence")


def test_suspend_then_reactivate(env):
    settings, hub, extracts, audit = env
    run(settings, hub, extracts, audit)
    set_status(settings.policies_dir, "wilms-outcomes", "suspended")
    rec = run(settings, hub, extracts, audit)
    assert {"status", "hub_revoke", "remove_extract"} <= {
        c.action.value for c in rec.changes if c.project == "wilms-outcomes"
    }
    assert not extracts.path(settings, "wilms-outcomes").exists()
    assert hub.group_members(group_name("wilms-outcomes")) == set()
    assert extracts.path(settings, "leukaemia-incidence").exists()  # the other is untouched
    set_status(settings.policies_dir, "wilms-outcomes", "active")
    run(settings, hub, extracts, audit)
    assert extracts.path(settings, "wilms-outcomes").exists()
    assert hub.group_members(group_name("wilms-outcomes")) == {"alice", "bob"}


def test_undeclared_project_is_taken_down_and_forgotten(env):
    settings, hub, extracts, audit = env
    run(settings, hub, extracts, audit)
    (settings.policies_dir / "projects" / "leukaemia-incidence.yaml").unlink()
    rec = run(settings, hub, extracts, audit)
    assert ("leukaemia-incidence", "forget") in actions(rec.changes)
    assert not extracts.path(settings, "leukaemia-incidence").exists()
    assert hub.group_members(group_name("leukaemia-incidence")) == set()
    assert "leukaemia-incidence" not in AppliedState.load(state_path(settings)).projects
    assert run(settings, hub, extracts, audit).changes == []


def test_failed_step_stops_apply_and_the_rest_is_replanned(env):
    settings, hub, extracts, audit = env
    extracts.fail_for = {"wilms-outcomes"}
    rec = run(settings, hub, extracts, audit)
    assert rec.result is not None and not rec.result.ok
    assert rec.result.failed.project == "wilms-outcomes"
    assert "simulated failure" in rec.result.error
    assert any(a.endswith(".failed") for a in audit.actions())
    # what succeeded is recorded; what did not is still planned
    remaining = run(settings, hub, extracts, audit, dry_run=True).changes
    assert ("wilms-outcomes", "build_extract") in actions(remaining)
    assert ("leukaemia-incidence", "create") not in actions(remaining)
    extracts.fail_for = set()
    assert run(settings, hub, extracts, audit).result.ok
    assert run(settings, hub, extracts, audit).changes == []


def test_state_file_is_replaced_atomically(env, monkeypatch):
    """A crash while writing the state leaves the previous state intact."""
    settings, hub, extracts, audit = env
    run(settings, hub, extracts, audit)
    before = state_path(settings).read_text()
    set_status(settings.policies_dir, "wilms-outcomes", "suspended")
    registry = load_registry(settings.policies_dir)
    changes = plan(
        settings,
        registry,
        AppliedState.load(state_path(settings)),
        hub=hub,
        extracts=extracts,
        today=TODAY,
    )

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("tre.provision.os.replace", crash)
    with pytest.raises(OSError):
        apply_plan(
            settings,
            registry,
            changes,
            hub=hub,
            extracts=extracts,
            audit=audit,
            actor="admin",
            today=TODAY,
        )
    assert state_path(settings).read_text() == before
    assert json.loads(before)["projects"]["wilms-outcomes"]["status"] == "active"
    assert not list(state_path(settings).parent.glob("*.tmp"))


def test_plan_without_hub_still_manages_extracts(tmp_path):
    settings = make_settings(tmp_path)
    extracts, audit = FileExtracts(), ListAudit()
    rec = reconcile(
        settings,
        load_registry(settings.policies_dir),
        actor="admin",
        use_hub=True,  # no token file: the hub part is skipped with a clear reason
        audit=audit,
        extracts=extracts,
        today=TODAY,
    )
    assert "no hub admin token" in (rec.hub_warning or "")
    assert not any(c.action.value.startswith("hub") for c in rec.changes)
    assert extracts.path(settings, "wilms-outcomes").exists()


# --- declarations edited by commands ---------------------------------------------------------


def test_edit_preserves_comments_and_formatting(tmp_path):
    settings = make_settings(tmp_path)
    path = settings.policies_dir / "projects" / "wilms-outcomes.yaml"
    path.write_text("# Approved by the access committee on 2026-01-01\n" + path.read_text())
    add_member(settings.policies_dir, "wilms-outcomes", "erin", "researcher", "Example College")
    text = path.read_text()
    assert text.startswith("# Approved by the access committee on 2026-01-01\n")
    assert "- {username: alice, role: lead, institution: University of Example}" in text
    assert "{username: erin, role: researcher, institution: Example College}" in text
    assert "erin" in load_registry(settings.policies_dir).projects["wilms-outcomes"].member_names()


@pytest.mark.parametrize(
    ("edit", "field", "words"),
    [
        (lambda d: grant(d, "wilms-outcomes", "genome", ["*"]), "grants", "unknown table"),
        (lambda d: add_member(d, "wilms-outcomes", "Not A Name"), "members", "pattern"),
        (lambda d: add_member(d, "wilms-outcomes", "alice"), "members", "already a member"),
        (lambda d: remove_member(d, "wilms-outcomes", "zed"), "members", "not a member"),
        (lambda d: set_status(d, "wilms-outcomes", "paused"), "status", "Input should be"),
        (lambda d: set_status(d, "no-such-project", "closed"), "", "no project"),
    ],
)
def test_bad_edits_name_file_field_problem_and_change_nothing(tmp_path, edit, field, words):
    settings = make_settings(tmp_path)
    before = {p: p.read_bytes() for p in (settings.policies_dir / "projects").glob("*.yaml")}
    with pytest.raises(RegistryError) as info:
        edit(settings.policies_dir)
    problem = info.value.problems[0]
    assert problem.file.parent == settings.policies_dir / "projects"
    assert problem.field.startswith(field)
    assert words in problem.message
    after = {p: p.read_bytes() for p in (settings.policies_dir / "projects").glob("*.yaml")}
    assert before == after


def test_create_project_validates_then_writes(tmp_path):
    settings = make_settings(tmp_path)
    fields = {
        "id": "neuroblastoma-staging",
        "title": "Neuroblastoma staging across registries",
        "lay_summary": "Compares how neuroblastoma is staged in different countries.",
        "purpose": "academic",
        "jurisdiction": "DE",
        "institutions": ["Example Klinik"],
        "members": [{"username": "frank", "role": "lead"}],
        "grants": {"tumour": ["*"]},
        "start_date": dt.date(2026, 1, 1),
        "end_date": dt.date(2027, 1, 1),
    }
    registry = create_project(settings.policies_dir, fields)
    assert "neuroblastoma-staging" in registry.projects
    with pytest.raises(RegistryError, match="already declared"):
        create_project(settings.policies_dir, fields)
    bad = dict(fields, id="other-project", end_date=dt.date(2025, 1, 1))
    with pytest.raises(RegistryError, match="end_date must be after start_date"):
        create_project(settings.policies_dir, bad)
    assert not (settings.policies_dir / "projects" / "other-project.yaml").exists()


def test_cli_apply_dry_run_prints_plan_and_changes_nothing(tmp_path, monkeypatch):
    from tre.cli import app

    settings = make_settings(tmp_path)
    monkeypatch.setenv("TRE_STATE_DIR", str(settings.state_dir))
    monkeypatch.setenv("TRE_POLICIES_DIR", str(settings.policies_dir))
    result = CliRunner().invoke(app, ["project", "apply", "--dry-run", "--no-hub"])
    assert result.exit_code == 0, result.output
    assert "Plan" in result.output and "wilms-outcomes" in result.output
    assert "build_extract" in result.output
    assert not state_path(settings).exists()


def test_cli_edit_with_invalid_value_exits_2_and_names_the_problem(tmp_path, monkeypatch):
    from tre.cli import app

    settings = make_settings(tmp_path)
    monkeypatch.setenv("TRE_STATE_DIR", str(settings.state_dir))
    monkeypatch.setenv("TRE_POLICIES_DIR", str(settings.policies_dir))
    result = CliRunner().invoke(app, ["project", "grant", "wilms-outcomes", "genome", "*"])
    assert result.exit_code == 2
    assert "wilms-outcomes.yaml" in result.output and "unknown table" in result.output


def test_apply_is_recorded_in_the_hash_chained_audit_log(tmp_path):
    from airlock.service.db import make_engine, session_factory
    from tre.audit import iter_events, verify_chain
    from tre.provision import AirlockAudit

    settings = make_settings(tmp_path)
    rec = reconcile(
        settings,
        load_registry(settings.policies_dir),
        actor="admin",
        use_hub=False,
        audit=AirlockAudit(settings),
        extracts=FileExtracts(),
        today=TODAY,
    )
    assert rec.result is not None and rec.result.ok
    with session_factory(make_engine(settings.airlock_db_url))() as session:
        events = list(iter_events(session))
        assert verify_chain(session) == []
    assert len(events) == len(rec.changes)
    assert {(e.actor, e.action, e.target) for e in events} >= {
        ("admin", "project.create", "project:wilms-outcomes"),
        ("admin", "project.build_extract", "project:leukaemia-incidence"),
    }


def test_live_registry_follows_declaration_changes(tmp_path):
    from tre.provision import LiveRegistry

    settings = make_settings(tmp_path)
    live = LiveRegistry(settings.policies_dir)
    first = live()
    assert live() is first  # unchanged files: no re-parse
    set_status(settings.policies_dir, "wilms-outcomes", "suspended")
    assert live().projects["wilms-outcomes"].status.value == "suspended"
    # an invalid edit by hand: reported once, then the last valid registry stays in use
    path = settings.policies_dir / "projects" / "wilms-outcomes.yaml"
    path.write_text(path.read_text().replace("purpose: academic", "purpose: curiosity"))
    with pytest.raises(RegistryError):
        live()
    assert live().projects["wilms-outcomes"].status.value == "suspended"


def test_live_registry_stamp_sees_every_declaration_file(tmp_path):
    """The change stamp covers every *.yaml below the policies directory, nested or reached
    through a symlinked directory (a loop of symlinks is walked once), and nothing else."""
    from tre.provision import LiveRegistry

    root = tmp_path / "policies"
    (root / "projects" / "archive").mkdir(parents=True)
    (root / "projects" / "a.yaml").write_text("a: 1\n")
    (root / "projects" / "archive" / "b.yaml").write_text("b: 1\n")
    (root / "notes.txt").write_text("not a declaration\n")
    shared = tmp_path / "shared-sites"
    shared.mkdir()
    (shared / "site.yaml").write_text("s: 1\n")
    (root / "sites").symlink_to(shared)
    (root / "projects" / "archive" / "loop").symlink_to(root / "projects")
    live = LiveRegistry(root)
    names = [path.rsplit("/", 1)[1] for path, _mtime, _size in live._current_stamp()]
    assert sorted(names) == ["a.yaml", "b.yaml", "site.yaml"]
    before = live._current_stamp()
    (shared / "site.yaml").write_text("s: 22\n")  # a change through the symlink
    assert live._current_stamp() != before


def test_cli_create_writes_a_declaration_like_a_person_would(tmp_path, monkeypatch):
    from tre.cli import app

    settings = make_settings(tmp_path)
    monkeypatch.setenv("TRE_STATE_DIR", str(settings.state_dir))
    monkeypatch.setenv("TRE_POLICIES_DIR", str(settings.policies_dir))
    args = ["project", "create", "neuro-staging", "--title", "Neuroblastoma staging"]
    args += ["--lay-summary", "How neuroblastoma is staged across countries."]
    args += ["--purpose", "academic", "--jurisdiction", "DE", "--lead", "dave"]
    args += ["--grant", "tumour=*", "--grant", "patient=patient_id,sex"]
    args += ["--start-date", "2026-01-01", "--end-date", "2028-01-01", "--no-apply"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    text = (settings.policies_dir / "projects" / "neuro-staging.yaml").read_text()
    assert "- {username: dave, role: lead}" in text
    assert "start_date: 2026-01-01\n" in text and "patient: [patient_id, sex]" in text
    project = load_registry(settings.policies_dir).projects["neuro-staging"]
    assert project.grants == {"tumour": ["*"], "patient": ["patient_id", "sex"]}
    bad = CliRunner().invoke(app, [*args[:-5], "--end-date", "2028-13-01", "--no-apply"])
    assert bad.exit_code == 2


def test_cli_apply_without_data_fails_clearly_and_keeps_what_succeeded(tmp_path, monkeypatch):
    """The real extract builder with no pooled store: the step fails, exit 1, state kept."""
    from tre.cli import app

    settings = make_settings(tmp_path)
    monkeypatch.setenv("TRE_STATE_DIR", str(settings.state_dir))
    monkeypatch.setenv("TRE_POLICIES_DIR", str(settings.policies_dir))
    result = CliRunner().invoke(app, ["project", "apply", "--no-hub", "--actor", "admin"])
    assert result.exit_code == 1
    assert "FAILED" in result.output and "ingest" in result.output
    state = AppliedState.load(state_path(settings))
    assert state.projects  # the steps before the failure are recorded
    assert all(rec.get("extract_fingerprint") is None for rec in state.projects.values())

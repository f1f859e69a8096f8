"""The transparency register and the admin statistics, over a real airlock workflow (SQLite)."""

from __future__ import annotations

import datetime as dt

import pytest

from airlock import permissions as perm
from airlock.service.admin import (
    check_administer,
    members_overview,
    public_projects,
    release_statistics,
)
from airlock.service.core import AirlockService, FileSpec
from airlock.service.db import make_engine, upgrade
from tests.airlock_service.conftest import make_policies, write_workspace_files
from tre.registry import load_registry
from tre.settings import Settings


@pytest.fixture
def service(tmp_path) -> AirlockService:
    policies = make_policies(tmp_path)
    url = f"sqlite:///{tmp_path / 'airlock.sqlite'}"
    settings = Settings(state_dir=tmp_path / "state", policies_dir=policies, airlock_db_url=url)
    write_workspace_files(settings.workspaces_dir)
    (settings.workspaces_dir / "wilms-outcomes" / "outputs" / "blob.bin").write_bytes(b"\x00\x01")
    engine = make_engine(url)
    upgrade(engine)
    return AirlockService(settings, engine, load_registry(policies))


def _released_request(service: AirlockService, files: list[str]) -> str:
    alice = service.who("alice")
    rid = service.create_request(alice, "wilms-outcomes", [FileSpec(f, "tables") for f in files])
    service.submit(alice, rid)
    for checker in ("checker1", "checker2"):
        for f in service.view(service.who(checker), rid)["files"]:
            service.vote(service.who(checker), rid, f["id"], "approve")
    assert service.view(alice, rid)["state"] == "released"
    return rid


def test_public_register_lists_projects_with_released_output_counts(service):
    _released_request(service, ["outputs/table.csv", "notes.txt"])
    # a pending request releases nothing
    alice = service.who("alice")
    service.create_request(alice, "wilms-outcomes", [FileSpec("outputs/small.csv")])
    today = dt.date(2026, 11, 29)
    with service.factory() as session:
        register = {p["id"]: p for p in public_projects(service.registry, session, today)}
    wilms = register["wilms-outcomes"]
    assert wilms["outputs_released"] == 2
    assert register["leukaemia-incidence"]["outputs_released"] == 0
    assert wilms["institutions"] == ["University of Example"]
    assert wilms["purpose"] == "academic"
    assert wilms["datasets"] == ["event", "followup", "patient", "tumour"]
    # the sites are those whose conditions allow this project today
    expected = {
        s.id for s in service.registry.sites_for(service.registry.projects["wilms-outcomes"], today)
    }
    assert {s["id"] for s in wilms["sites"]} == expected and expected
    assert wilms["status"] == "active" and wilms["end_date"] == "2028-12-31"
    # no member names, no request details: the register is public
    assert "alice" not in repr(register)


def test_release_statistics_count_weeks_decisions_and_failed_rules(service):
    _released_request(service, ["outputs/table.csv"])
    alice = service.who("alice")
    rid = service.create_request(alice, "wilms-outcomes", [FileSpec("outputs/blob.bin", "other")])
    service.submit(alice, rid)
    view = service.view(alice, rid)
    failing_rules = {x["rule"] for x in view["files"][0]["findings"] if x["status"] == "fail"}
    assert failing_rules, "a binary blob must fail an automated check"
    with service.factory() as session:
        stats = release_statistics(session)
    assert stats["requests"] == 2
    assert stats["requests_by_state"] == {"released": 1, "submitted": 1}
    [(week, n)] = stats["requests_per_week"]
    assert n == 2 and week.startswith(str(dt.date.today().isocalendar()[0]))
    assert stats["time_to_decision_hours"]["decided"] == 1
    assert stats["time_to_decision_hours"]["median"] >= 0
    assert stats["files_checked"] == 2 and stats["files_failed"] == 1
    by_rule = {r["rule"]: r for r in stats["failed_by_rule"]}
    for rule in failing_rules:
        assert by_rule[rule]["files"] == 1 and by_rule[rule]["share"] == 0.5


def test_members_overview_lists_projects_and_staff(service):
    users = {u["username"]: u for u in members_overview(service.registry, dt.date(2026, 11, 29))}
    registry = service.registry
    expected = sorted(p.id for p in registry.projects.values() if "alice" in p.member_names())
    assert [p["project"] for p in users["alice"]["projects"]] == expected and expected
    roles = {p["project"]: p["role"] for p in users["alice"]["projects"]}
    assert roles["wilms-outcomes"] == "lead"
    assert users["checker1"]["checker"] and not users["checker1"]["projects"]
    assert users["admin"]["admin"]


@pytest.mark.parametrize(
    ("who", "allowed"),
    [
        (perm.Who("admin", is_admin=True), True),
        (perm.Who("admin", is_admin=True, sandbox_project="wilms-outcomes"), False),
        (perm.Who("checker1", is_checker=True), False),
        (perm.Who("alice", projects=frozenset({"wilms-outcomes"})), False),
    ],
)
def test_only_admins_outside_a_sandbox_administer(who, allowed):
    if allowed:
        check_administer(who)
    else:
        with pytest.raises(perm.PermissionDenied):
            check_administer(who)


def test_requests_of_an_ended_project_are_frozen(tmp_path):
    """At expiry the airlock refuses every transition of the project's pending requests."""
    from airlock.service.core import ProjectInactive
    from tre.project_edit import edit_project

    policies = make_policies(tmp_path)
    url = f"sqlite:///{tmp_path / 'airlock.sqlite'}"
    settings = Settings(state_dir=tmp_path / "state", policies_dir=policies, airlock_db_url=url)
    write_workspace_files(settings.workspaces_dir)
    engine = make_engine(url)
    upgrade(engine)
    # the registry is re-read on every call, as in the running service
    service = AirlockService(settings, engine, lambda: load_registry(policies))
    alice = service.who("alice")
    rid = service.create_request(alice, "wilms-outcomes", [FileSpec("outputs/table.csv")])
    service.submit(alice, rid)
    fid = service.view(alice, rid)["files"][0]["id"]
    service.vote(service.who("checker1"), rid, fid, "approve")
    # the project's end date passes
    today = dt.date.today()

    def expire(data):
        data["start_date"] = today - dt.timedelta(days=400)
        data["end_date"] = today - dt.timedelta(days=1)

    edit_project(policies, "wilms-outcomes", expire)
    with pytest.raises(ProjectInactive, match="frozen"):
        service.vote(service.who("checker2"), rid, fid, "approve")
    with pytest.raises(ProjectInactive):
        service.comment(service.who("checker2"), rid, "late", "public")
    admin = service.who("admin")
    assert service.view(admin, rid)["state"] == "partially_reviewed"
    assert not (settings.airlock_store_dir / "released").exists() or not any(
        (settings.airlock_store_dir / "released").rglob("*.csv")
    )

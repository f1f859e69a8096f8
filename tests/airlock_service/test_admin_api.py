"""The admin API, admin pages and public register of the airlock, with REAL hub tokens.

Uses the session's real JupyterHub + proxy + airlock (``live``/``client`` fixtures of this
directory). The pooled store is generated (tests/pooled_synth.py) so that provisioning builds
real extracts with ``tre.extract``.
"""

from __future__ import annotations

import httpx
import pytest
import yaml

from tests.pooled_synth import build_pooled
from tre.audit import iter_events
from tre.pooled import PooledStore
from tre.registry import load_registry

# not a storage test: SQLite is enough (the storage layer runs on PostgreSQL in its own tests)
pytestmark = [pytest.mark.hub, pytest.mark.parametrize("db", ["sqlite"], indirect=True)]

ROLES = {
    "anonymous": None,
    "researcher": "alice",
    "checker": "checker1",
    "admin": "admin",
    "sandbox": "sandbox:alice/wilms-outcomes",
}
ADMIN_ONLY = {"anonymous": 401, "researcher": 403, "checker": 403, "sandbox": 403}
# endpoint -> (method, path, body, status for the admin)
MATRIX = {
    "projects": ("GET", "api/admin/projects", None, 200),
    "plan": ("GET", "api/admin/plan", None, 200),
    "apply": ("POST", "api/admin/apply", None, 200),
    "stats": ("GET", "api/admin/stats", None, 200),
    "create": (
        "POST",
        "api/admin/projects",
        {
            "id": "neuroblastoma-staging",
            "title": "Neuroblastoma staging",
            "lay_summary": "How neuroblastoma is staged in different countries.",
            "purpose": "academic",
            "jurisdiction": "DE",
            "lead": "dave",
            "grants": {"tumour": ["*"]},
            "start_date": "2026-01-01",
            "end_date": "2030-01-01",
        },
        200,
    ),
    "add_member": (
        "POST",
        "api/admin/projects/wilms-outcomes/members",
        {"username": "dave", "role": "researcher"},
        200,
    ),
    "remove_member": ("DELETE", "api/admin/projects/wilms-outcomes/members/bob", None, 200),
    "grant": (
        "POST",
        "api/admin/projects/leukaemia-incidence/grants",
        {"table": "followup", "columns": ["*"]},
        200,
    ),
    "status": (
        "POST",
        "api/admin/projects/leukaemia-incidence/status",
        {"status": "suspended"},
        200,
    ),
}


@pytest.fixture
def pooled(service):
    store = PooledStore(service.settings.pooled_dir)
    build_pooled(store, {"uk-ccr": "GB", "fr-rnce": "FR", "de-gpoh": "DE", "us-nwts": "US"}, 30)
    return store


@pytest.mark.parametrize("endpoint", sorted(MATRIX))
def test_admin_endpoints_are_admin_only(client, pooled, endpoint):
    method, path, body, admin_status = MATRIX[endpoint]
    projects = client.service.settings.policies_dir / "projects"
    before = {p.name: p.read_bytes() for p in projects.glob("*.yaml")}
    for role, who in ROLES.items():
        if role == "admin":
            continue
        r = client.call(who, method, path, json=body)
        assert r.status_code == ADMIN_ONLY[role], (role, r.status_code, r.text)
    # nobody but the admin changed a declaration
    assert {p.name: p.read_bytes() for p in projects.glob("*.yaml")} == before
    r = client.call("admin", method, path, json=body)
    assert r.status_code == admin_status, r.text


def test_admin_routes_are_in_the_openapi_spec(client):
    spec = client.call(None, "GET", "openapi.json").json()
    routes = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
    prefix = client.live.prefix
    for method, path, *_ in MATRIX.values():
        templated = path.replace("wilms-outcomes", "{project_id}").replace(
            "leukaemia-incidence", "{project_id}"
        )
        templated = templated.replace("/bob", "/{username}")
        assert (method, prefix + templated) in routes


def test_add_member_edits_validates_applies_and_audits(client, pooled):
    settings = client.service.settings
    r = client.call(
        "admin",
        "POST",
        "api/admin/projects/wilms-outcomes/members",
        json={"username": "dave", "role": "researcher", "institution": "Example College"},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["error"] is None
    applied = {(c["project"], c["action"]) for c in body["applied"]}
    assert ("wilms-outcomes", "add_member") in applied
    # real extracts were built from the generated pooled store
    assert ("wilms-outcomes", "build_extract") in applied
    assert (settings.extracts_dir / "wilms-outcomes.duckdb").exists()
    # the declaration is edited and valid; the plan is now empty
    registry = load_registry(settings.policies_dir)
    assert "dave" in registry.projects["wilms-outcomes"].member_names()
    plan = client.call("admin", "GET", "api/admin/plan").json()
    assert plan["plan"] == []
    with client.service.factory() as session:
        events = [(e.actor, e.action) for e in iter_events(session)]
    assert ("admin", "declaration.add_member") in events
    assert ("admin", "project.add_member") in events


def test_invalid_admin_edit_is_400_and_changes_nothing(client, pooled):
    path = client.service.settings.policies_dir / "projects" / "wilms-outcomes.yaml"
    before = path.read_bytes()
    r = client.call(
        "admin",
        "POST",
        "api/admin/projects/wilms-outcomes/grants",
        json={"table": "genome", "columns": ["*"]},
    )
    assert r.status_code == 400
    problem = r.json()["problems"][0]
    assert problem["file"] == "wilms-outcomes.yaml" and problem["field"].startswith("grants")
    assert "unknown table" in problem["message"]
    assert path.read_bytes() == before
    r = client.call("admin", "POST", "api/admin/projects/no-such-project/status", json={})
    assert r.status_code == 422  # body validation: status is required


def test_suspension_through_the_api_freezes_the_projects_requests(client, pooled):
    from airlock.service.core import FileSpec

    service = client.service
    carol = service.who("carol")
    rid = service.create_request(carol, "leukaemia-incidence", [FileSpec("notes.txt")])
    service.submit(carol, rid)
    fid = service.view(carol, rid)["files"][0]["id"]
    r = client.call(
        "admin",
        "POST",
        "api/admin/projects/leukaemia-incidence/status",
        json={"status": "suspended"},
    )
    assert r.status_code == 200, r.text
    data = yaml.safe_load(
        (service.settings.policies_dir / "projects" / "leukaemia-incidence.yaml").read_text()
    )
    assert data["status"] == "suspended"
    service._registry = load_registry(service.settings.policies_dir)  # as LiveRegistry would
    vote = client.call(
        "checker1",
        "POST",
        f"api/requests/{rid}/files/{fid}/votes",
        json={"decision": "approve"},
    )
    assert vote.status_code == 409 and "frozen" in vote.text


def test_public_register_needs_no_login(client, pooled):
    r = client.call(None, "GET", "api/public/projects")
    assert r.status_code == 200
    ids = {p["id"] for p in r.json()}
    assert {"wilms-outcomes", "leukaemia-incidence"} <= ids
    page = client.call(None, "GET", "transparency")
    assert page.status_code == 200
    assert "Relapse and survival after Wilms tumour" in page.text
    assert "alice" not in page.text  # no member names in public
    assert "default-src 'none'" in page.headers["content-security-policy"]


def _browser_like_login(client, user: str) -> httpx.Client:
    """Log in at the hub (form), then follow the airlock's OAuth flow, as a browser does."""
    from tests.hubfixture import HUB_PASSWORD

    hub = client.live.hub
    http = httpx.Client(base_url=hub.url, follow_redirects=True, timeout=30)
    http.get("/hub/login")
    r = http.post(
        "/hub/login",
        data={"username": user, "password": HUB_PASSWORD, "_xsrf": http.cookies.get("_xsrf")},
    )
    assert r.status_code == 200, r.text[:300]
    return http


def test_admin_pages_render_for_the_admin_only(client, pooled):
    prefix = client.live.prefix
    admin = _browser_like_login(client, "admin")
    for page, marker in [
        ("admin", 'id="projects"'),
        ("admin/members", 'id="members"'),
        ("admin/sites", 'id="sites"'),
        ("admin/events", 'id="events"'),
        ("admin/stats", 'id="per-week"'),
    ]:
        r = admin.get(f"{prefix}{page}")
        assert r.status_code == 200, (page, r.status_code, r.text[:300])
        assert marker in r.text, page
    alice = _browser_like_login(client, "alice")
    assert alice.get(f"{prefix}admin").status_code == 403


def test_an_admin_cannot_make_themselves_a_member(client, pooled):
    """Separation of duties: membership gives a project's sandbox and data; an admin may
    grant it to others, never to themselves (as a member or as the lead of a new project)."""
    projects = client.service.settings.policies_dir / "projects"
    before = {p.name: p.read_bytes() for p in projects.glob("*.yaml")}
    r = client.call(
        "admin",
        "POST",
        "api/admin/projects/wilms-outcomes/members",
        json={"username": "admin", "role": "researcher"},
    )
    assert r.status_code == 403 and "another admin" in r.text, r.text
    create = dict(MATRIX["create"][2], lead="admin")
    r = client.call("admin", "POST", "api/admin/projects", json=create)
    assert r.status_code == 403, r.text
    assert {p.name: p.read_bytes() for p in projects.glob("*.yaml")} == before
    with client.service.factory() as session:
        assert not [e for e in iter_events(session) if e.action.startswith("declaration.")]

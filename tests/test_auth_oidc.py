"""TREOIDCAuthenticator end to end: a real OpenID Connect provider (npm oidc-provider, on
loopback), a real JupyterHub 6 and configurable-http-proxy, and the real authorization-code flow
(PKCE, client secret, userinfo) driven over HTTP like a browser."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import shutil
import stat
from urllib.parse import urlparse

import httpx
import pytest
from tornado import web

from tests.conftest import REPO_ROOT, require_component
from tests.oidc.harness import free_port, start_hub, start_provider, write_policies
from tre.hub.auth import SubjectBindings, TREOIDCAuthenticator

ACCOUNTS = [
    # registered, and the IdP agrees for one project only (not for neuro-survival)
    {
        "sub": "alice",
        "password": "alice-idp-pass",
        "groups": ["tre-project-wilms-outcomes", "staff"],
    },
    # registered in wilms-outcomes; the IdP also claims a project the registry does not grant
    {
        "sub": "bob",
        "password": "bob-idp-pass",
        "groups": ["tre-project-wilms-outcomes", "tre-project-neuro-survival"],
    },
    # the IdP says project member, the registry has never heard of him
    {
        "sub": "dave",
        "password": "dave-idp-pass",
        "groups": ["tre-project-wilms-outcomes", "tre-admins"],
    },
    # member of a project that has ended
    {"sub": "carol", "password": "carol-idp-pass", "groups": ["tre-project-old-study"]},
    # in the registry (neuro-survival), but the IdP puts him in no TRE group
    {"sub": "frank", "password": "frank-idp-pass", "groups": ["staff"]},
    # staff, through a custom mapping and the default checker group
    {"sub": "checker1", "password": "checker-idp-pass", "groups": ["tre-output-checkers"]},
    {"sub": "admin", "password": "admin-idp-pass", "groups": ["IT-TRE-Administrators"]},
    # attackers: IdP accounts of their own (in alice's and bob's project group, as a colleague
    # would be) whose editable preferred_username names another TRE user
    {
        "sub": "mallory",
        "password": "mallory-idp-pass",
        "preferred_username": "alice",
        "groups": ["tre-project-wilms-outcomes"],
    },
    {
        "sub": "trudy",
        "password": "trudy-idp-pass",
        "preferred_username": "Bob",
        "groups": ["tre-project-wilms-outcomes"],
    },
]
PASSWORD = {a["sub"]: a["password"] for a in ACCOUNTS}


@pytest.fixture(scope="module")
def oidc_hub(tmp_path_factory):
    # module-scoped (one hub for all flows), so the proxy check is done here, not by the fixture
    proxy = REPO_ROOT / "node_modules" / ".bin" / "configurable-http-proxy"
    require_component(proxy.exists(), "configurable-http-proxy (npm ci)")
    require_component(shutil.which("node") is not None, "node (for the OIDC provider)")
    oidc_provider = REPO_ROOT / "node_modules" / "oidc-provider"
    require_component(oidc_provider.exists(), "oidc-provider (npm ci)")
    tmp = tmp_path_factory.mktemp("oidc")
    policies = write_policies(tmp)
    hub_port = free_port()
    hub_url = f"http://127.0.0.1:{hub_port}"
    secret = secrets.token_urlsafe(24)
    provider, issuer = start_provider(
        tmp,
        clients=[
            {
                "client_id": "tre-hub",
                "client_secret": secret,
                "redirect_uris": [f"{hub_url}/hub/oauth_callback"],
            }
        ],
        accounts=ACCOUNTS,
    )
    try:
        hub = start_hub(
            tmp,
            str(proxy),
            f"""
            c.JupyterHub.authenticator_class = "tre.hub.auth.TREOIDCAuthenticator"
            a = c.TREOIDCAuthenticator
            a.policies_dir = "{policies}"
            a.client_id = "tre-hub"
            a.client_secret = "{secret}"
            a.oauth_callback_url = "{hub_url}/hub/oauth_callback"
            a.authorize_url = "{issuer}/auth"
            a.token_url = "{issuer}/token"
            a.userdata_url = "{issuer}/me"
            a.group_mapping = {{"IT-TRE-Administrators": "admin"}}
            a.subjects_file = "{tmp}/secrets/hub-oidc-subjects.json"
            """,
            port=hub_port,
        )
    except Exception:
        provider.stop()
        raise
    hub.subjects_file = tmp / "secrets" / "hub-oidc-subjects.json"
    yield hub, issuer, provider
    hub.process.stop()
    provider.stop()


def oidc_login(hub, username: str, password: str) -> httpx.Response:
    """Start at the hub, get sent to the IdP, sign in there, come back to the hub."""
    with httpx.Client(timeout=30, follow_redirects=True) as client:
        form = client.get(f"{hub.url}/hub/oauth_login")
        assert form.status_code == 200, form.text
        assert "Institutional login" in form.text, form.text
        action = re.search(r'action="([^"]+)"', form.text).group(1)
        return client.post(
            str(form.url.join(action)), data={"login": username, "password": password}
        )


@pytest.mark.hub
def test_registered_user_logs_in_and_lands_in_the_hub(oidc_hub):
    hub, issuer, _ = oidc_hub
    final = oidc_login(hub, "alice", PASSWORD["alice"])
    assert final.status_code == 200, final.text
    assert urlparse(str(final.url)).path == "/hub/home"
    assert str(final.url).startswith(hub.url)
    user = hub.api("/users/alice").json()
    # IdP and registry must agree: neuro-survival is in the registry but not in the IdP groups
    assert user["groups"] == ["project-wilms-outcomes"]
    assert user["admin"] is False


@pytest.mark.hub
def test_idp_groups_are_checked_against_the_registry(oidc_hub):
    hub, _, _ = oidc_hub
    assert oidc_login(hub, "bob", PASSWORD["bob"]).status_code == 200
    # the IdP also claims neuro-survival; the registry does not list bob there
    assert hub.api("/users/bob").json()["groups"] == ["project-wilms-outcomes"]


@pytest.mark.hub
@pytest.mark.parametrize("username", ["dave", "carol"])
def test_user_not_in_the_registry_is_refused(oidc_hub, username):
    hub, _, _ = oidc_hub
    final = oidc_login(hub, username, PASSWORD[username])
    assert final.status_code == 403
    assert "not registered in this trusted research environment" in final.text
    assert hub.api(f"/users/{username}").status_code == 404  # no hub user was created


@pytest.mark.hub
def test_registered_user_whom_the_idp_does_not_confirm_is_refused(oidc_hub):
    hub, _, _ = oidc_hub
    final = oidc_login(hub, "frank", PASSWORD["frank"])
    assert final.status_code == 403
    assert "does not confirm any of your TRE roles" in final.text
    assert hub.api("/users/frank").status_code == 404


@pytest.mark.hub
def test_staff_groups_become_hub_groups(oidc_hub):
    hub, _, _ = oidc_hub
    assert oidc_login(hub, "checker1", PASSWORD["checker1"]).status_code == 200
    checker = hub.api("/users/checker1").json()
    assert checker["groups"] == ["output-checkers"] and checker["admin"] is False
    assert oidc_login(hub, "admin", PASSWORD["admin"]).status_code == 200
    admin = hub.api("/users/admin").json()
    # TRE admin rights come from the tre-admins group (tre-admin role), not the hub admin flag
    assert admin["groups"] == ["tre-admins"] and admin["admin"] is False
    assert oidc_login(hub, "alice", PASSWORD["alice"]).status_code == 200
    groups = {g["name"]: g for g in hub.api("/groups").json()}
    assert groups["output-checkers"]["users"] == ["checker1"]
    assert groups["tre-admins"]["users"] == ["admin"]
    assert "alice" in groups["project-wilms-outcomes"]["users"]
    assert not {"dave", "carol"} & set(groups["project-wilms-outcomes"]["users"])
    # raw IdP group names never become hub groups
    assert not {"staff", "tre-project-wilms-outcomes", "IT-TRE-Administrators"} & set(groups)


@pytest.mark.hub
def test_wrong_idp_password_never_reaches_the_hub(oidc_hub):
    hub, issuer, _ = oidc_hub
    final = oidc_login(hub, "alice", "not-alice-password")
    assert final.status_code == 401
    assert str(final.url).startswith(issuer)
    assert "Wrong user name or password" in final.text


@pytest.mark.hub
def test_a_renamed_idp_account_cannot_take_over_an_existing_user(oidc_hub):
    hub, _, _ = oidc_hub
    assert oidc_login(hub, "alice", PASSWORD["alice"]).status_code == 200
    # mallory's IdP account says preferred_username=alice: she must not become alice
    final = oidc_login(hub, "mallory", PASSWORD["mallory"])
    assert final.status_code == 403, final.text
    assert "belongs to another identity" in final.text
    assert urlparse(str(final.url)).path != "/hub/home"
    bindings = json.loads(hub.subjects_file.read_text())["subjects"]
    assert bindings["alice"] == "alice"  # alice's own sub, unchanged
    assert stat.S_IMODE(hub.subjects_file.stat().st_mode) == 0o600
    assert "mallory" not in bindings.values()
    # alice still gets in
    assert oidc_login(hub, "alice", PASSWORD["alice"]).status_code == 200


@pytest.mark.hub
def test_idp_names_are_not_case_folded_onto_tre_users(oidc_hub):
    hub, _, _ = oidc_hub
    # trudy's "Bob" at the IdP would be lower-cased by JupyterHub into bob, before bob has ever
    # logged in (so no subject binding protects him yet)
    final = oidc_login(hub, "trudy", PASSWORD["trudy"])
    assert final.status_code == 403, final.text
    assert "is not a TRE user name" in final.text
    assert "trudy" not in json.loads(hub.subjects_file.read_text())["subjects"].values()
    assert oidc_login(hub, "bob", PASSWORD["bob"]).status_code == 200  # bob is unaffected


def test_subject_bindings_first_login_wins_and_can_be_released(tmp_path):
    bindings = SubjectBindings(tmp_path / "s.json")
    assert bindings.bind("alice", "sub-1")
    assert bindings.bind("alice", "sub-1")
    assert not bindings.bind("alice", "sub-2")
    assert bindings.subjects() == {"alice": "sub-1"}
    assert bindings.unbind("alice")
    assert bindings.bind("alice", "sub-2")


def test_cli_oidc_unbind_releases_a_name(tmp_path):
    from typer.testing import CliRunner

    from tre.cli import app

    path = tmp_path / "subjects.json"
    SubjectBindings(path).bind("alice", "old-sub")
    runner = CliRunner()
    out = runner.invoke(app, ["hub", "oidc-unbind", "alice", "--subjects-file", str(path)])
    assert out.exit_code == 0, out.output
    assert SubjectBindings(path).subjects() == {}
    again = runner.invoke(app, ["hub", "oidc-unbind", "alice", "--subjects-file", str(path)])
    assert again.exit_code == 1 and "not bound" in again.output


def test_non_canonical_idp_names_are_refused():
    auth = TREOIDCAuthenticator(username_claim="preferred_username")
    assert auth.user_info_to_username({"preferred_username": "alice"}) == "alice"
    for name in ["Alice", "alice ", " alice", "\u212aate", "ａlice", "al/ice", "a" * 65]:
        with pytest.raises(web.HTTPError) as err:
            auth.user_info_to_username({"preferred_username": name})
        assert err.value.status_code == 403


# ---------------------------------------------------------------- the mapping rule, unit level


def grants(groups, **config):
    return TREOIDCAuthenticator(**config).idp_grants(groups)


def test_idp_group_mapping():
    assert grants(["tre-project-a1b", "x", "tre-output-checkers"]) == ({"a1b"}, True, False)
    assert grants(["Admins"], group_mapping={"Admins": "admin"}) == (set(), False, True)
    assert grants(["Grp"], group_mapping={"Grp": "project:wilms-outcomes"}) == (
        {"wilms-outcomes"},
        False,
        False,
    )
    assert grants(["lab-x-"], project_group_prefix="lab-x-") == ({""}, False, False)


def test_bad_group_mapping_is_refused():
    with pytest.raises(Exception, match="expected 'project:<id>'"):
        TREOIDCAuthenticator(group_mapping={"G": "superuser"})


def test_update_auth_model_without_idp_groups_refuses(tmp_path):
    policies = write_policies(tmp_path)
    auth = TREOIDCAuthenticator(policies_dir=str(policies))
    model = {"name": "alice", "admin": None, "auth_state": {"oauth_user": {"sub": "alice"}}}
    model = asyncio.run(auth.update_auth_model(model))
    assert model["auth_state"]["tre_groups"] == []
    with pytest.raises(Exception, match="does not confirm any of your TRE roles"):
        asyncio.run(auth.check_allowed("alice", model))
    stranger = {"name": "dave", "admin": None, "auth_state": {"oauth_user": {"groups": []}}}
    stranger = asyncio.run(auth.update_auth_model(stranger))
    with pytest.raises(Exception, match="not registered"):
        asyncio.run(auth.check_allowed("dave", stranger))
    relaxed = TREOIDCAuthenticator(
        policies_dir=str(policies),
        require_idp_groups=False,
        subjects_file=str(tmp_path / "subjects.json"),
    )
    model = {"name": "alice", "admin": None, "auth_state": {"oauth_user": {"sub": "alice"}}}
    model = asyncio.run(relaxed.update_auth_model(model))
    assert model["auth_state"]["tre_groups"] == ["project-neuro-survival", "project-wilms-outcomes"]


def test_refresh_without_auth_state_drops_admin_rights_the_registry_withdrew(tmp_path):
    # an admin removed from staff.yaml but still in a project kept admin rights until their
    # next login (the session cookie lasts days) unless the refresh lowers them
    from types import SimpleNamespace

    policies = write_policies(tmp_path)  # admins: ["admin"]; alice is a project member only
    auth = TREOIDCAuthenticator(policies_dir=str(policies))
    project, admins = (SimpleNamespace(name=n) for n in ("project-wilms-outcomes", "tre-admins"))
    # alice: a hub admin and in tre-admins (from an older version, or by hand)
    alice = SimpleNamespace(name="alice", admin=True, groups=[project, admins])
    refreshed = asyncio.run(auth.refresh_user(alice))
    assert refreshed["admin"] is False  # nobody is a JupyterHub admin
    assert refreshed["groups"] == ["project-wilms-outcomes"]  # alice is no admin in the registry
    admin = SimpleNamespace(name="admin", admin=True, groups=[admins])
    kept = asyncio.run(auth.refresh_user(admin))
    assert kept["groups"] == ["tre-admins"] and kept["admin"] is False  # still a TRE admin
    not_confirmed = SimpleNamespace(name="admin", admin=False, groups=[])
    # never raised by a refresh: only a login where the IdP confirms the role does that
    assert asyncio.run(auth.refresh_user(not_confirmed))["groups"] == []


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.mark.hub
@pytest.mark.browser
def test_login_in_a_real_browser(oidc_hub, require_chromium):
    """The same flow in headless Chromium: real cookies, redirects and form posts."""
    from playwright.sync_api import sync_playwright

    hub, issuer, _ = oidc_hub
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=require_chromium, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.goto(f"{hub.url}/hub/login")
            page.click("a#login-main, a[href*='oauth_login']")
            page.wait_for_url(f"{issuer}/interaction/**")
            page.fill("input[name=login]", "bob")
            page.fill("input[name=password]", PASSWORD["bob"])
            page.click("button[type=submit]")
            page.wait_for_url(f"{hub.url}/hub/home")
            assert "bob" in page.content()
            # a refused user sees the registry message, in the browser too
            other = browser.new_page()
            other.context.clear_cookies()
            other.goto(f"{hub.url}/hub/oauth_login")
            other.fill("input[name=login]", "dave")
            other.fill("input[name=password]", PASSWORD["dave"])
            other.click("button[type=submit]")
            other.wait_for_url(f"{hub.url}/hub/oauth_callback**")
            assert "not registered in this trusted research environment" in other.content()
        finally:
            browser.close()


def test_idp_settings_from_the_environment():
    """What docs/login.md tells operators of the generated hub configuration to set (in a fresh
    process: oauthenticator reads some of these variables when it is imported)."""
    import json
    import os
    import subprocess
    import sys

    env = {
        "OAUTH_CLIENT_ID": "tre-hub",
        "OAUTH_CLIENT_SECRET": "s3cret",
        "OAUTH_CALLBACK_URL": "https://tre.example.org/hub/oauth_callback",
        "OAUTH2_AUTHORIZE_URL": "https://idp.example.org/auth",
        "OAUTH2_TOKEN_URL": "https://idp.example.org/token",
        "OAUTH2_USERDATA_URL": "https://idp.example.org/me",
        "OAUTH2_BASIC_AUTH": "true",
    }
    code = (
        "import json; from tre.hub.auth import TREOIDCAuthenticator as A; a = A(); "
        "print(json.dumps([a.client_id, a.client_secret, a.oauth_callback_url, "
        "a.authorize_url, a.token_url, a.userdata_url, a.basic_auth]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [
        "tre-hub",
        "s3cret",
        env["OAUTH_CALLBACK_URL"],
        env["OAUTH2_AUTHORIZE_URL"],
        env["OAUTH2_TOKEN_URL"],
        env["OAUTH2_USERDATA_URL"],
        True,
    ]

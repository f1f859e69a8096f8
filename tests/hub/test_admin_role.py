"""Separation of duties: a TRE admin runs the hub but cannot act as a researcher.

A real hub (generated config, real proxy, bubblewrap sandboxes); the TRE admin ``admin``
(policies/staff.yaml) logs in through the hub's login form via the proxy, as a browser does,
and attacks a researcher (bob) whose sandbox is running: opening it, issuing tokens for him or
with his rights, starting servers as someone else, changing groups, making themselves a
JupyterHub admin. Each attack is first shown to have a target (bob's own token reaches his
server, the admin's session is valid). What the admin must keep working is tested too: the
admin page and its listings, stopping a server.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterator

import httpx
import pytest

from tre.hub.auth import PasswordFile
from tre.hub.config import password_file
from tre.hub.harness import PROXY_EPIPE_ATTEMPTS, loopback_client, loopback_request
from tre.hub.roles import ADMINS_GROUP

pytestmark = [pytest.mark.hub, pytest.mark.sandbox]

ADMIN = "admin"  # a TRE admin in the test installation's staff.yaml
ADMIN_PASSWORD = "admin-correct-horse-battery"
VICTIM, PROJECT = "bob", "wilms-outcomes"


def send(call, *args: object, **kwargs: object) -> httpx.Response:  # noqa: ANN001
    """``call(*args, **kwargs)``, again while the proxy answers 503: configurable-http-proxy
    turns an upstream that answered (e.g. 403) and closed while it was still writing the request
    into a 503 (EPIPE), which says nothing about the hub's decision."""
    for _ in range(PROXY_EPIPE_ATTEMPTS):
        r = call(*args, **kwargs)
        if r.status_code != 503:
            break
    return r


class AdminSession:
    """The admin's browser (cookies through the proxy) and an API token of their own."""

    def __init__(self, hub) -> None:  # noqa: ANN001 - HubInstance
        self.hub = hub
        # the hub's public host, as a browser reaches it (researchers' servers are on hosts of
        # their own: the session cookie is not sent there, the server's OAuth asks the hub)
        self.browser = loopback_client(base_url=hub.public_url, follow_redirects=True, timeout=60)
        self.server = hub.server_url(VICTIM, PROJECT)
        page = self.browser.get("/hub/login")
        xsrf = re.search(r'name="_xsrf"[^>]*value="([^"]+)"', page.text)
        data = {"username": ADMIN, "password": ADMIN_PASSWORD}
        if xsrf:
            data["_xsrf"] = xsrf.group(1)
        r = self.browser.post("/hub/login?next=/hub/home", data=data)
        assert r.status_code == 200 and "/hub/home" in str(r.url), r.text[:500]
        # the admin's own token, as the token page or the admin page's API calls would get it
        r = self.ui_api("POST", f"/users/{ADMIN}/tokens", json={"note": "admin's own"})
        assert r.status_code == 201, r.text
        self.token = r.json()["token"]

    def ui_api(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        """The hub API as the admin page calls it: session cookie + the XSRF header."""
        xsrf = self.browser.cookies.get("_xsrf", path="/hub/")
        headers = {"X-XSRFToken": xsrf} if xsrf else {}
        return send(self.browser.request, method, f"/hub/api{path}", headers=headers, **kwargs)

    def api(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        """The hub API with the admin's own token."""
        return send(self.hub.api, method, path, token=self.token, **kwargs)


@pytest.fixture(scope="module")
def victim_server(hub) -> Iterator[str]:
    """bob's running sandbox; the token bob's own browser/API would use for it."""
    r = hub.start_server(VICTIM, PROJECT)
    assert r.status_code in (201, 202), r.text
    token = hub.user_token(VICTIM)
    yield token
    hub.stop_server(VICTIM, PROJECT)


@pytest.fixture(scope="module")
def admin(hub, victim_server) -> AdminSession:
    PasswordFile(password_file(hub.settings)).set_password(ADMIN, ADMIN_PASSWORD)
    return AdminSession(hub)


def _base(scopes: list[str]) -> set[str]:
    return {s.split("!", 1)[0] for s in scopes}


# -- what the admin is --------------------------------------------------------------------------


def test_a_tre_admin_is_no_jupyterhub_admin_but_holds_the_tre_admin_role(hub, admin):
    model = hub.api("GET", f"/users/{ADMIN}").json()
    assert model["admin"] is False
    assert ADMINS_GROUP in model["groups"]
    held = admin.api("GET", "/user").json()["scopes"]
    assert {"admin-ui", "list:users", "read:users", "delete:servers"} <= set(held)
    # nothing beyond their own servers and tokens
    beyond_own = {s for s in held if not s.endswith((f"!user={ADMIN}", "!service=airlock"))}
    assert not _base(sorted(beyond_own)) & {
        "access:servers",
        "tokens",
        "read:tokens",
        "admin:users",
        "users",
        "servers",
        "start:servers",
        "admin:auth_state",
        "groups",
    }, beyond_own


# -- attacks: every one must be refused ----------------------------------------------------------


def test_the_admin_cannot_open_a_researchers_server_in_the_browser(admin, victim_server):
    # the target is there: bob's own token reaches his server through the proxy
    own = loopback_request(
        "GET", f"{admin.server}/api/contents/", headers={"Authorization": f"token {victim_server}"}
    )
    assert own.status_code == 200 and own.json()["type"] == "directory", own.text[:300]
    # the admin's browser follows the server's OAuth redirect to the hub, which refuses
    page = admin.browser.get(f"{admin.server}/lab")
    assert "/hub/api/oauth2/authorize" in str(page.url)
    if page.status_code == 200 and 'name="scopes"' in page.text:
        # a consent page (what a JupyterHub admin gets): click "Authorize", as they would
        hidden = r'<input type="hidden" name="(_xsrf|scopes)" value="([^"]*)"'
        form: dict[str, list[str]] = {}
        for name, value in re.findall(hidden, page.text):
            form.setdefault(name, []).append(html.unescape(value))
        page = admin.browser.post(str(page.url), data=form)
    assert page.status_code == 403, (page.status_code, str(page.url))
    listing = admin.browser.get(f"{admin.server}/api/contents/")
    assert listing.status_code == 403, listing.text[:300]


def test_the_admin_cannot_use_a_researchers_server_with_a_token(admin, victim_server):
    headers = {"Authorization": f"token {admin.token}"}
    r = send(loopback_request, "GET", f"{admin.server}/api/contents/", headers=headers)
    assert r.status_code == 403, r.text[:300]
    # start a kernel (the default one: no body) to run code on bob's data
    kernel = send(loopback_request, "POST", f"{admin.server}/api/kernels", headers=headers)
    assert kernel.status_code == 403, kernel.text[:300]


@pytest.mark.parametrize("via", ["token", "admin page"])
@pytest.mark.parametrize("victim", [VICTIM, "checker1"])  # a researcher; an airlock voter
def test_the_admin_cannot_issue_a_token_for_another_user(admin, hub, via, victim):
    hub.create_user(victim)
    call = admin.api if via == "token" else admin.ui_api
    before = hub.api("GET", f"/users/{victim}/tokens").json()["api_tokens"]
    r = call("POST", f"/users/{victim}/tokens", json={"note": "impersonation"})
    assert r.status_code in (403, 404), r.text
    after = hub.api("GET", f"/users/{victim}/tokens").json()["api_tokens"]
    assert [t["id"] for t in after] == [t["id"] for t in before]
    assert call("GET", f"/users/{victim}/tokens").status_code in (403, 404)


@pytest.mark.parametrize(
    "scopes",
    [
        [f"access:servers!server={VICTIM}/{PROJECT}"],
        [f"access:servers!user={VICTIM}"],
        ["access:servers"],
        [f"tokens!user={VICTIM}"],
        ["tokens!user=checker1"],
        ["admin:users"],
        ["servers"],
    ],
)
def test_the_admin_cannot_give_their_own_token_another_users_rights(admin, scopes):
    r = admin.api("POST", f"/users/{ADMIN}/tokens", json={"note": "escalate", "scopes": scopes})
    assert r.status_code in (400, 403), r.text
    assert "token" not in r.json()


def test_the_admin_cannot_start_a_server_as_another_user(admin, hub):
    before = hub.api("GET", "/users/carol").json()["servers"].get("leukaemia-incidence")
    r = admin.api("POST", "/users/carol/servers/leukaemia-incidence")
    try:
        assert r.status_code in (403, 404), r.text  # 404: JupyterHub's "no access"
        after = hub.api("GET", "/users/carol").json()["servers"].get("leukaemia-incidence")
        assert after == before
    finally:
        if before is None and r.status_code in (201, 202):  # the old behaviour: undo it
            hub.wait_ready("carol", "leukaemia-incidence")
            hub.stop_server("carol", "leukaemia-incidence")


def test_the_admin_cannot_make_themselves_a_jupyterhub_admin(admin, hub):
    r = admin.api("PATCH", f"/users/{ADMIN}", json={"admin": True})
    assert r.status_code == 403, r.text
    assert hub.api("GET", f"/users/{ADMIN}").json()["admin"] is False
    r = admin.api("POST", "/users/newadmin", json={"admin": True})
    assert r.status_code == 403, r.text
    assert hub.api("GET", "/users/newadmin").status_code == 404


def test_the_admin_cannot_change_groups(admin, hub):
    """Group membership grants roles (tre-admins holds tre-admin): only the registry decides it,
    through the authenticators and provisioning."""
    r = admin.ui_api("POST", f"/groups/{ADMINS_GROUP}/users", json={"users": [VICTIM]})
    try:
        assert r.status_code == 403, r.text
        assert VICTIM not in admin.api("GET", f"/groups/{ADMINS_GROUP}").json()["users"]
    finally:
        if r.status_code == 200:  # the old behaviour: undo it
            hub.api("DELETE", f"/groups/{ADMINS_GROUP}/users", json={"users": [VICTIM]})
    r = admin.api("DELETE", f"/groups/{ADMINS_GROUP}/users", json={"users": [ADMIN]})
    assert r.status_code == 403, r.text
    assert admin.api("POST", "/groups/made-up-group").status_code == 403


# -- what must keep working ----------------------------------------------------------------------


def test_the_admin_page_loads_and_lists_users_servers_and_groups(admin):
    home = admin.browser.get("/hub/home")
    assert home.status_code == 200 and 'href="/hub/admin"' in home.text  # the nav link
    page = admin.browser.get("/hub/admin")
    assert page.status_code == 200, page.text[:300]
    assert "admin-react.js" in page.text
    # the admin page's own API calls (static/js/admin-react.js)
    users = admin.ui_api("GET", "/users?include_stopped_servers=1&offset=0&limit=50")
    assert users.status_code == 200, users.text
    by_name = {u["name"]: u for u in users.json()}
    assert {VICTIM, ADMIN} <= set(by_name)
    assert by_name[VICTIM]["servers"][PROJECT]["ready"] is True
    assert by_name[VICTIM]["last_activity"]  # read:users:activity
    groups = admin.ui_api("GET", "/groups?offset=0&limit=50")
    assert groups.status_code == 200, groups.text
    assert ADMIN in {g["name"]: g for g in groups.json()}[ADMINS_GROUP]["users"]


@pytest.mark.browser
def test_the_admin_page_works_in_chromium_and_a_researchers_server_does_not(
    admin, hub, require_chromium
):
    """The admin page is a React app calling the hub API with the session: in a real browser it
    lists bob's running server; bob's server itself answers the admin with 403."""
    from playwright.sync_api import sync_playwright

    from tre.hub.harness import CHROMIUM_LOOPBACK_RULES

    args = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=require_chromium, args=[*args, CHROMIUM_LOOPBACK_RULES]
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            failed: list[str] = []
            page.on(
                "response",
                lambda r: (
                    failed.append(f"{r.status} {r.url}")
                    if "/hub/api/" in r.url and r.status >= 400
                    else None
                ),
            )
            page.goto(f"{hub.public_url}/hub/login")
            page.fill("#username_input", ADMIN)
            page.fill("#password_input", ADMIN_PASSWORD)
            page.click("#login_submit")
            page.wait_for_url("**/hub/home**")
            page.goto(f"{hub.public_url}/hub/admin")
            # one row per named server: bob's sandbox, running, with the admin page's Stop
            row = page.locator(f'tr[data-testid="user-row-{VICTIM}-{PROJECT}"]')
            row.wait_for(timeout=30_000)
            assert row.locator(".stop-button").inner_text() == "Stop Server"
            assert failed == []  # every API call of the admin page was allowed
            response = page.goto(f"{hub.server_url(VICTIM, PROJECT)}/lab")
            assert response is not None and response.status == 403
            assert "/user/bob/" not in page.url or "oauth2/authorize" in page.url
        finally:
            browser.close()


def test_the_admin_can_stop_a_researchers_server_last(admin, hub, victim_server):
    """Last in this module: it stops the server the attacks above targeted."""
    r = admin.ui_api("DELETE", f"/users/{VICTIM}/servers/{PROJECT}")
    assert r.status_code in (202, 204), r.text
    hub.stop_server(VICTIM, PROJECT)  # waits until it is down
    model = hub.api("GET", f"/users/{VICTIM}").json()
    assert PROJECT not in model["servers"] or not model["servers"][PROJECT].get("ready")
    gone = loopback_request(
        "GET",
        f"{admin.server}/api/contents/",
        headers={"Authorization": f"token {victim_server}"},
        follow_redirects=False,
    )
    assert gone.status_code != 200

"""Origin separation, attacked in real Chromium through the real hub, proxy and airlock.

The threat: whatever answers at a researcher's server is the researcher's code (a sandbox can
serve anything on its own routes, without the hub's login). If a checker opens a link to it,
its script runs in the browser with the checker's cookies. On one shared origin that script
could read the airlock's pages as the checker (their CSRF token included) and vote; with
``subdomain_host`` the researcher's server is on a host of its own and can read nothing of the
hub's or the airlock's.

The test puts an attacker's page on alice's server route (a proxy route to a page server of the
test's own, exactly where the hub routes alice's servers), logs checker1 in to the hub and the
airlock, then opens the page. A positive control serves the same probe on the airlock's own host:
there it must read the checker's page, which shows the probe would catch a shared origin.
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
from conftest import PASSWORDS

from tre.hub.config import hub_dir, public_host_of
from tre.hub.harness import CHROMIUM_LOOPBACK_RULES, free_port, loopback_request

pytestmark = [pytest.mark.hub, pytest.mark.sandbox, pytest.mark.browser]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", CHROMIUM_LOOPBACK_RULES]

PROBE = """<!doctype html><meta charset="utf-8"><title>results</title><script>
async function probe(url, init) {
  try {
    const r = await fetch(url, Object.assign({credentials: "include", redirect: "follow"}, init));
    return {status: r.status, url: r.url, text: await r.text()};
  } catch (e) {
    return {error: String(e)};
  }
}
window.results = (async () => ({
  airlock_same_path: await probe("/services/airlock/queue"),
  airlock_own_host: await probe(AIRLOCK + "queue"),
  airlock_api: await probe(AIRLOCK + "api/requests"),
  hub_same_path: await probe("/hub/api/user"),
  hub_own_host: await probe(HUB + "/hub/home"),
  cookies: document.cookie,
}))();
</script>"""


@pytest.fixture
def attacker_pages(hub) -> Iterator[str]:
    """A page server of the test (stands for code answering on a sandbox's route)."""
    airlock, public = hub.airlock_url, hub.public_url
    page = PROBE.replace("AIRLOCK", json.dumps(airlock)).replace("HUB", json.dumps(public))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            body = page.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def add_route(hub, public_url: str, target: str) -> str:
    """Route ``public_url``'s host + path to ``target`` in the hub's proxy, as the hub routes a
    server (host routing: the route spec is host + path)."""
    parts = urlsplit(public_url)
    spec = f"/{parts.hostname}{parts.path}"
    token = (hub_dir(hub.settings) / "proxy_auth_token").read_text().strip()
    api = f"http://127.0.0.1:{hub.settings.hub.proxy_api_port}/api/routes{spec}"
    r = loopback_request(
        "POST", api, headers={"Authorization": f"token {token}"}, json={"target": target}
    )
    assert r.status_code == 201, r.text
    return spec


def delete_route(hub, spec: str) -> None:
    token = (hub_dir(hub.settings) / "proxy_auth_token").read_text().strip()
    api = f"http://127.0.0.1:{hub.settings.hub.proxy_api_port}/api/routes{spec}"
    loopback_request("DELETE", api, headers={"Authorization": f"token {token}"})


def test_every_server_and_the_airlock_have_origins_of_their_own(hub, alice_server):
    origins = {
        hub.public_url,
        public_host_of(hub.settings, "alice"),
        public_host_of(hub.settings, "carol"),
        hub.airlock_url.split("/services/")[0],
    }
    assert len(origins) == 4, origins
    # the hub routes alice's servers to alice's host, and the airlock to its own
    token = (hub_dir(hub.settings) / "proxy_auth_token").read_text().strip()
    routes = loopback_request(
        "GET",
        f"http://127.0.0.1:{hub.settings.hub.proxy_api_port}/api/routes",
        headers={"Authorization": f"token {token}"},
    ).json()
    airlock_host = urlsplit(hub.airlock_url).hostname
    alice_host = urlsplit(public_host_of(hub.settings, "alice")).hostname
    assert f"/{airlock_host}/services/airlock" in routes, sorted(routes)  # (listed without /)
    assert f"/{alice_host}/user/alice/{alice_server}" in routes, sorted(routes)
    assert not any(spec.startswith(("/services/", "/user/")) for spec in routes), sorted(routes)


def test_a_researchers_server_cannot_read_the_airlock_as_a_checker(
    hub, attacker_pages, require_chromium
):
    from playwright.sync_api import sync_playwright

    evil = add_route(hub, hub.server_url("alice", "evil") + "/", attacker_pages)
    control = add_route(hub, hub.airlock_url + "evil-control/", attacker_pages)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=require_chromium, args=FLAGS)
            try:
                page = browser.new_context().new_page()
                page.goto(f"{hub.public_url}/hub/login")
                page.fill("#username_input", "checker1")
                page.fill("#password_input", PASSWORDS["checker1"])
                page.click("#login_submit")
                page.wait_for_url("**/hub/home**")
                # the checker logs in to the airlock (OAuth through the hub, on its own host)
                page.goto(f"{hub.airlock_url}queue")
                page.wait_for_selector("span.who")
                assert urlsplit(page.url).hostname == urlsplit(hub.airlock_url).hostname
                csrf = page.locator("input[name=csrf_token]").first.get_attribute("value")
                assert csrf and "checker1" in page.locator("span.who").inner_text()

                page.goto(f"{hub.server_url('alice', 'evil')}/link-sent-to-the-checker")
                seen = page.evaluate("window.results")
                page.goto(f"{hub.airlock_url}evil-control/")
                control_seen = page.evaluate("window.results")
            finally:
                browser.close()
    finally:
        delete_route(hub, evil)
        delete_route(hub, control)

    # positive control: on the airlock's own origin the probe reads the checker's page
    leaked = control_seen["airlock_same_path"]
    assert leaked.get("status") == 200 and csrf in leaked["text"], leaked
    # from alice's server: nothing of the airlock or the hub as the checker
    for name in ("airlock_same_path", "airlock_own_host", "airlock_api", "hub_same_path"):
        result = seen[name]
        text = result.get("text", "")
        assert csrf not in text and "checker1" not in text, (name, result)
    assert "error" in seen["airlock_own_host"], seen["airlock_own_host"]  # CORS: unreadable
    assert "error" in seen["airlock_api"], seen["airlock_api"]
    assert "checker1" not in seen["hub_own_host"].get("text", ""), seen["hub_own_host"]
    for cookie in ("airlock-session", "jupyterhub-hub-login", "jupyterhub-services"):
        assert cookie not in seen["cookies"], seen["cookies"]

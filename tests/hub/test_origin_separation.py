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
The other tests attack from the same place with what crosses origins within one site: cookies
set for the parent domain (cookie tossing), cross-site POSTs, frames, the hub's OAuth and
``next=``, and websockets (docs/airlock.md, "Origin separation").
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import quote, urlencode, urlsplit

import pytest
from conftest import PASSWORDS

from tre.hub.config import hub_dir, public_host_of
from tre.hub.harness import (
    CHROMIUM_LOOPBACK_RULES,
    execute_in_kernel,
    free_port,
    loopback_request,
)

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


@dataclass
class AttackerPages:
    """A page server of the test (stands for code answering on a sandbox's route): answers
    every path with ``pages[<last path segment>]`` (the probe by default) and records the
    paths it was asked for."""

    url: str
    pages: dict[str, str] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)


@pytest.fixture
def attacker_pages(hub) -> Iterator[AttackerPages]:
    airlock, public = hub.airlock_url, hub.public_url
    probe = PROBE.replace("AIRLOCK", json.dumps(airlock)).replace("HUB", json.dumps(public))
    served = AttackerPages(url="")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            served.requests.append(self.path)
            name = self.path.split("?")[0].rstrip("/").rpartition("/")[2]
            body = served.pages.get(name, probe).encode()
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
    served.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield served
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

    evil = add_route(hub, hub.server_url("alice", "evil") + "/", attacker_pages.url)
    control = add_route(hub, hub.airlock_url + "evil-control/", attacker_pages.url)
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


def hub_login(page, hub, user: str) -> None:
    page.goto(f"{hub.public_url}/hub/login")
    page.fill("#username_input", user)
    page.fill("#password_input", PASSWORDS[user])
    page.click("#login_submit")
    page.wait_for_url("**/hub/home**")


def airlock_page(page, hub, path: str) -> tuple[str, str]:
    """Open an airlock page; (who is shown, the page's CSRF token), or (the answer, "")."""
    page.goto(f"{hub.airlock_url}{path}")  # (HTTP redirects, the hub's OAuth, are followed)
    if not page.locator("span.who").count():
        return page.locator("body").inner_text(), ""
    csrf = page.locator("input[name=csrf_token]").first.get_attribute("value") or ""
    return page.locator("span.who").inner_text(), csrf


def test_a_session_cookie_tossed_by_a_researchers_page_is_refused_and_expired(
    hub, attacker_pages, require_chromium
):
    """Cookie tossing (http: no __Host- cookies): alice's page sets the airlock's session cookie
    for the parent domain with her own valid session. Before OneSessionCookie the checker's
    next airlock page ran in alice's session (login CSRF; the queue answered "only output
    checkers have a queue"); now a request with the name twice uses neither and its answer
    expires the tossed copies, so the checker goes on as themselves."""
    from playwright.sync_api import sync_playwright

    parent = urlsplit(hub.public_url).hostname
    prefix = urlsplit(hub.airlock_url).path
    evil = add_route(hub, hub.server_url("alice", "evil") + "/", attacker_pages.url)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=require_chromium, args=FLAGS)
            try:
                # alice's own airlock session (hers to take: her browser, her cookie)
                alice = browser.new_context()
                hub_login(alice.new_page(), hub, "alice")
                airlock_page(alice.pages[0], hub, "requests")
                mine = next(c for c in alice.cookies() if c["name"] == "airlock-session")
                assert mine["domain"] == urlsplit(hub.airlock_url).hostname  # host-only

                checker = browser.new_context()
                page = checker.new_page()
                hub_login(page, hub, "checker1")
                who, _ = airlock_page(page, hub, "queue")
                assert "checker1" in who
                toss = "".join(
                    f"document.cookie = {json.dumps(cookie)};"
                    for cookie in (
                        f"airlock-session={mine['value']}; Domain={parent}; Path={prefix}",
                        f"airlock-session={mine['value']}; Domain={parent}; Path={prefix}queue",
                    )
                )
                attacker_pages.pages["toss"] = f"<script>{toss}</script>"
                page.goto(f"{hub.server_url('alice', 'evil')}/toss")
                tossed = [
                    c
                    for c in checker.cookies()
                    if c["name"] == "airlock-session" and c["domain"] == f".{parent}"
                ]
                assert len(tossed) == 2, checker.cookies()  # the browser took them

                who, csrf = airlock_page(page, hub, "queue")
                url = page.url
                left = [
                    c
                    for c in checker.cookies()
                    if c["name"] == "airlock-session" and c["domain"] == f".{parent}"
                ]
            finally:
                browser.close()
    finally:
        delete_route(hub, evil)
    assert "checker1" in who and "alice" not in who, who
    assert url == f"{hub.airlock_url}queue" and csrf, url
    assert not left, left  # expired by the airlock's answer


ACT = """<!doctype html><meta charset="utf-8"><body>
<iframe src=AIRLOCK_QUEUE></iframe><iframe src=HUB_HOME></iframe><iframe src=HUB_TOKEN></iframe>
<script>
async function post(url, body) {
  try {
    const r = await fetch(url, {method: "POST", mode: "no-cors", credentials: "include",
                                headers: {"Content-Type": "text/plain"}, body: body});
    return r.type;
  } catch (e) {
    return "error " + e;
  }
}
window.results = (async () => ({
  hub_token: await post(HUB + "/hub/api/users/checker1/tokens", '{"note": "made-by-alice"}'),
  hub_token_xsrf: await post(HUB + "/hub/api/users/checker1/tokens?_xsrf=x",
                             '{"note": "made-by-alice"}'),
  airlock_logout: await post(AIRLOCK + "logout", "csrf_token=x"),
}))();
</script>"""

SOCKETS = """<!doctype html><meta charset="utf-8"><script>
function attempt(url, code) {
  return new Promise(resolve => {
    const seen = {opened: false, executed: false};
    const done = () => { clearTimeout(timer); resolve(seen); };
    const timer = setTimeout(done, 8000);
    let ws;
    try { ws = new WebSocket(url); } catch (e) { seen.error = String(e); return done(); }
    ws.onopen = () => {
      seen.opened = true;
      if (!code) return done();
      ws.send(JSON.stringify({header: {msg_id: "m1", username: "x", session: "s",
                                       msg_type: "execute_request", version: "5.3"},
                              parent_header: {}, metadata: {}, channel: "shell",
                              content: {code: code, silent: false, allow_stdin: false}}));
    };
    ws.onmessage = e => {
      if (String(e.data).includes("OWN" + "ED")) { seen.executed = true; done(); }
    };
    ws.onerror = done;
    ws.onclose = done;
  });
}
window.results = (async () => ({
  kernel: await attempt(KERNEL, "print('OWN' + 'ED')"),
  terminal: await attempt(TERMINAL, ""),
}))();
</script>"""


def test_a_researchers_page_cannot_act_for_its_visitor(
    hub, alice_server, carol_server, attacker_pages, require_chromium
):
    """What holds (regression): from alice's server, a checker's or another researcher's
    browser can be made to send requests, but none acts as them. Cross-site POSTs without the
    hub's xsrf or the airlock's CSRF token change nothing; the airlock's and the hub's pages
    refuse to be framed (clickjacking); the hub's OAuth refuses a redirect_uri on alice's host
    and a client of alice's server for anyone without access to it, and login ``next=`` to
    alice's host lands on the hub's host: no code or token reaches alice's server. Websockets
    (no CORS) to carol's kernel and terminal from alice's origin are refused by the single-user
    server's origin check, while the same page on carol's own host runs code in her kernel
    (positive control: the probe would catch a missing check)."""
    from playwright.sync_api import sync_playwright

    carol = hub.server_url("carol", carol_server)
    carol_token = hub.user_token("carol")
    auth = {"Authorization": f"token {carol_token}"}
    kernel = loopback_request(
        "POST", f"{carol}/api/kernels", headers=auth, json={"name": "python3"}
    )
    terminal = loopback_request("POST", f"{carol}/api/terminals", headers=auth)
    assert kernel.status_code == 201 and terminal.status_code == 200, (kernel.text, terminal.text)
    # a kernel that answers (a websocket to a kernel still starting waits for it)
    assert execute_in_kernel(carol, kernel.json()["id"], auth, "print(1)")["stdout"] == "1\n"
    ws = carol.replace("http://", "ws://", 1)
    attacker_pages.pages["act"] = (
        ACT.replace("AIRLOCK_QUEUE", json.dumps(f"{hub.airlock_url}queue"))
        .replace("HUB_HOME", json.dumps(f"{hub.public_url}/hub/home"))
        .replace("HUB_TOKEN", json.dumps(f"{hub.public_url}/hub/token"))
        .replace("AIRLOCK", json.dumps(hub.airlock_url))
        .replace("HUB", json.dumps(hub.public_url))
    )
    attacker_pages.pages["sockets"] = SOCKETS.replace(
        "KERNEL", json.dumps(f"{ws}/api/kernels/{kernel.json()['id']}/channels")
    ).replace("TERMINAL", json.dumps(f"{ws}/terminals/websocket/{terminal.json()['name']}"))
    evil_base = hub.server_url("alice", "evil")
    evil = add_route(hub, evil_base + "/", attacker_pages.url)
    control = add_route(hub, carol + "/evil-control/", attacker_pages.url)
    authorize = f"{hub.public_url}/hub/api/oauth2/authorize?"
    oauth = {
        "airlock client, redirect to alice": (
            400,
            {"client_id": "service-airlock", "redirect_uri": f"{evil_base}/callback"},
        ),
        "alice's server's client": (
            403,
            {
                "client_id": f"jupyterhub-user-alice-{alice_server}",
                "redirect_uri": f"{hub.server_url('alice', alice_server)}/oauth_callback",
            },
        ),
    }
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=require_chromium, args=FLAGS)
            try:
                page = browser.new_context().new_page()
                hub_login(page, hub, "checker1")
                who, csrf = airlock_page(page, hub, "queue")
                assert "checker1" in who and csrf
                page.goto(f"{evil_base}/act")
                posted = page.evaluate("window.results")
                page.wait_for_timeout(500)
                framed = [(f.url, f.content()) for f in page.frames[1:]]
                asked = len(attacker_pages.requests)
                answers = {}
                for name, (_, params) in oauth.items():
                    query = urlencode({**params, "response_type": "code", "state": "s"})
                    response = page.goto(authorize + query)
                    answers[name] = (response.status if response else None, page.url)
                page.goto(f"{hub.public_url}/hub/login?next={quote(evil_base + '/next')}")
                after_next = page.url
                reached = attacker_pages.requests[asked:]
                who_after, csrf_after = airlock_page(page, hub, "queue")

                visitor = browser.new_context().new_page()
                hub_login(visitor, hub, "carol")
                # her server's login (OAuth through the hub, a cookie on her host)
                visitor.goto(f"{carol}/lab", wait_until="commit")
                server_cookie = f"jupyterhub-user-carol-{carol_server}"
                for _ in range(300):
                    if any(c["name"] == server_cookie for c in visitor.context.cookies()):
                        break
                    visitor.wait_for_timeout(100)
                visitor.goto(f"{evil_base}/sockets")
                sockets = visitor.evaluate("window.results")
                visitor.goto(f"{carol}/evil-control/sockets")
                control_sockets = visitor.evaluate("window.results")
            finally:
                browser.close()
    finally:
        delete_route(hub, evil)
        delete_route(hub, control)
        loopback_request("DELETE", f"{carol}/api/kernels/{kernel.json()['id']}", headers=auth)
        loopback_request("DELETE", f"{carol}/api/terminals/{terminal.json()['name']}", headers=auth)

    # cross-site POSTs changed nothing: no token for the checker, the airlock session is theirs
    assert all(kind == "opaque" for kind in posted.values()), posted  # sent, unreadable
    notes = [t.get("note") for t in hub.api("GET", "/users/checker1/tokens").json()["api_tokens"]]
    assert "made-by-alice" not in notes, notes
    assert "checker1" in who_after and csrf_after == csrf
    # no frame shows the checker's airlock or hub page
    assert len(framed) == 3, [url for url, _ in framed]
    for url, content in framed:
        assert "checker1" not in content and csrf not in content, url
    # OAuth and next=: refused, and nothing reached alice's server
    for name, (status, _) in oauth.items():
        assert answers[name][0] == status, (name, answers[name])
        assert urlsplit(answers[name][1]).hostname == urlsplit(hub.public_url).hostname
    assert urlsplit(after_next).hostname == urlsplit(hub.public_url).hostname, after_next
    assert reached == [], reached
    # websockets from alice's origin: refused; the same page on carol's host: runs code
    assert control_sockets["kernel"]["executed"], control_sockets
    assert control_sockets["terminal"]["opened"], control_sockets
    assert not sockets["kernel"]["opened"] and not sockets["kernel"]["executed"], sockets
    assert not sockets["terminal"]["opened"], sockets

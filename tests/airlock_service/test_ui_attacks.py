"""Red team of the airlock's pages: a researcher controls file names and contents, titles,
context, controls, comments and (through the checks) the cells quoted in findings. If any of it
ran script in the airlock's origin, the researcher could vote as the checker who opened the
page. Every field and file here carries payloads; every page a checker, an author and an admin
sees is opened in real headless Chromium, twice (with the CSP the airlock sends, and with the
CSP stripped, so that escaping alone is tested too), and nothing may run, load or appear as an
element. File-serving URLs must never be rendered as documents of the airlock's origin; forms
need the session's CSRF token; the login's ``next`` never leaves the site.
"""

from __future__ import annotations

import http.server
import json
import re
import threading
from collections import Counter
from pathlib import Path
from urllib.parse import quote, unquote, urljoin, urlsplit

import httpx
import nbformat
import pytest
from PIL import Image

from airlock.service.app import create_app
from airlock.service.core import FileSpec
from tests.hubfixture import HUB_PASSWORD

from .test_bad_requests import login
from .test_browser import FLAGS

pytestmark = [pytest.mark.hub]


@pytest.fixture
def db(tmp_path):
    """SQLite only: what is under attack here is the HTML, not the store."""
    from airlock.service.db import make_engine, upgrade

    from .conftest import DB

    url = f"sqlite:///{tmp_path / 'airlock.sqlite'}"
    engine = make_engine(url)
    upgrade(engine)
    return DB(url, None, engine)


# --- canaries: anything that fires is counted -------------------------------------------------


class CanaryServer:
    """A loopback HTTP server counting every request (images, forms, css a payload loads)."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        hits = self.hits

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                hits[self.path] += 1
                self.send_response(204)
                self.end_headers()

            do_POST = do_GET  # noqa: N815

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class SameOriginCanary:
    """Wraps the airlock app: ``<prefix>__canary/...`` (same origin, so htmx and the CSP would
    allow a request to it) counts hits instead of reaching the app."""

    def __init__(self, app, prefix: str) -> None:
        self.app, self.path = app, prefix + "__canary/"
        self.hits: Counter[str] = Counter()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(self.path):
            self.hits[scope["path"]] += 1
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        await self.app(scope, receive, send)


def payloads(tag: str, port: int, prefix: str) -> str:
    """One string with every trick, each marked ``data-pwn`` and calling ``pwn('<tag>-...')``."""
    ext = f"http://127.0.0.1:{port}/{tag}"
    return "\n".join(
        [
            f"<script data-pwn>pwn('{tag}-script')</script>",
            f"<img data-pwn src=x onerror=\"pwn('{tag}-img')\">",
            f"\"><svg data-pwn onload=pwn('{tag}-svg')>",
            f"' onmouseover='pwn(\"{tag}-attr\")' x='",
            f"</textarea></title></pre></code><script data-pwn>pwn('{tag}-close')</script>",
            f"<a data-pwn href=\"javascript:pwn('{tag}-js')\">click</a> javascript:pwn('{tag}')",
            f'<div data-pwn hx-get="{prefix}__canary/{tag}" hx-trigger="load">htmx</div>',
            f'<button data-pwn hx-post="{prefix}__canary/{tag}-post" hx-trigger="load">b</button>',
            f'<img data-pwn src="{ext}-img">',
            f"<iframe data-pwn srcdoc=\"<script>parent.pwn('{tag}-srcdoc')</script>\"></iframe>",
            f"<meta data-pwn http-equiv=refresh content=\"0;url=javascript:pwn('{tag}-meta')\">",
            f'<base data-pwn href="{ext}-base/">',
            f"<style data-pwn>@import '{ext}-css';</style>",
            f'<form data-pwn action="{ext}-form"><button>go</button></form>',
            f"<math data-pwn><mtext><table><mglyph><style><img src=x onerror=pwn('{tag}-mx')>",
            "{{7*7}} {% raw %}x{% endraw %} ${7*7} #{7*7}",
            f"[md link](javascript:pwn('{tag}-md')) ![md]({ext}-md.png) **bold**",
            f"\u202e<script data-pwn>pwn('{tag}-rlo')</script>\u2028\ufeff\uff1cscript\uff1e",
        ]
    )


SHORT = (
    "<img data-pwn src=x onerror=pwn('{tag}')>{{{{7*7}}}}\"'</title><svg data-pwn onload=pwn(1)>"
)


def make_hostile_workspace(ws: Path, port: int, prefix: str) -> list[str]:
    """Files whose names and contents are payloads; returns their workspace paths."""
    out = ws / "outputs"
    out.mkdir(parents=True, exist_ok=True)
    cell = "<img data-pwn src=x onerror=pwn('cell')>"
    paths: dict[str, bytes | str] = {
        # names are payloads (a name is one path component: no '/')
        "outputs/<img data-pwn src=x onerror=pwn('name')>.csv": (
            f'"{cell}",count\n"<script data-pwn>pwn(\'cell2\')</script>",3\n'
            f'"" onmouseover="pwn(\'cell3\')",30\n{{{{7*7}}}},2\n'
        ),
        "outputs/\"><svg data-pwn onload=pwn('name2')>.txt": payloads("txt", port, prefix),
        "outputs/page.html": payloads("html", port, prefix),
        "outputs/page.svg": (
            '<svg xmlns="http://www.w3.org/2000/svg" onload="pwn(\'svgfile\')">'
            "<script>pwn('svgfile2')</script></svg>"
        ),
        "outputs/page.xml": (
            '<?xml version="1.0"?><html xmlns="http://www.w3.org/1999/xhtml">'
            "<script>pwn('xml')</script></html>"
        ),
        "outputs/notes.md": payloads("md", port, prefix),
        # an "image" that is HTML/SVG: served as image/png, it must not be sniffed into a page
        "outputs/fake.png": "<html><script>pwn('fakepng')</script><svg onload=pwn('fp2')></html>",
        "outputs/fake.jpg": '<svg xmlns="http://www.w3.org/2000/svg" onload="pwn(\'fakejpg\')"/>',
    }
    for rel, data in paths.items():
        target = ws / rel
        target.write_bytes(data.encode() if isinstance(data, str) else data)
    Image.new("RGB", (20, 10), (200, 30, 30)).save(out / "\"'><img src=x onerror=pwn(3)>.png")
    # a workbook whose cells and sheet name are payloads (findings quote cells)
    import openpyxl

    wb = openpyxl.Workbook()
    sheet = wb.active
    sheet.title = "x<svg onload=pwn(4)>"[:31].replace("/", "")
    sheet.append([cell, "count"])
    sheet.append(["<script>pwn('xlsx')</script>", 2])
    wb.save(out / "cells.xlsx")
    # a notebook with every kind of active output
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell(payloads("nbmd", port, prefix)),
        nbformat.v4.new_code_cell(
            "x",
            outputs=[
                nbformat.v4.new_output(
                    "display_data",
                    data={
                        "text/html": payloads("nbhtml", port, prefix),
                        "image/svg+xml": (
                            "<svg onload=\"pwn('nbsvg')\"><script>pwn('nbs')</script></svg>"
                        ),
                        "application/javascript": "pwn('nbjs')",
                        "text/markdown": f"[x](javascript:pwn('nbmd2')) ![y](http://127.0.0.1:{port}/nbmd)",
                    },
                ),
                nbformat.v4.new_output(
                    "stream", name="stdout", text="<script>pwn('nbstream')</script>"
                ),
            ],
        ),
    ]
    nbformat.write(nb, out / "nb<img src=x onerror=pwn(5)>.ipynb")
    return sorted(str(p.relative_to(ws)) for p in out.iterdir())


# what counts as "a payload got in": run in every frame after every page load
DOM_PROBE = """() => {
  const bad = [];
  for (const el of document.querySelectorAll('*')) {
    if (el.hasAttribute('data-pwn')) bad.push('element ' + el.outerHTML.slice(0, 80));
    for (const a of el.attributes) {
      if (a.name.startsWith('on')) bad.push('handler ' + a.name + ' on ' + el.tagName);
      if (/^\\s*javascript:/i.test(a.value)) bad.push('javascript: URL in ' + a.name);
    }
    if (el.tagName === 'SCRIPT' && !/static\\/htmx\\.min\\.js$/.test(el.src || ''))
      bad.push('script ' + el.outerHTML.slice(0, 80));
  }
  return bad;
}"""


def test_no_researcher_content_runs_in_the_airlock(client, tre_settings, require_chromium):
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    live, service = client.live, client.service
    prefix, base = live.prefix, live.hub.url + live.prefix
    canary = CanaryServer()
    same_origin = SameOriginCanary(live.holder.app, prefix)
    live.holder.app = same_origin
    try:
        ws = tre_settings.workspaces_dir / "wilms-outcomes"
        paths = make_hostile_workspace(ws, canary.port, prefix)
        alice, checker2 = service.who("alice"), service.who("checker2")
        text = payloads("field", canary.port, prefix)
        rid = service.create_request(
            alice,
            "wilms-outcomes",
            [FileSpec(p) for p in paths],
            title=SHORT.format(tag="title")[:200],
            context=text.replace("field", "context"),
            controls=text.replace("field", "controls"),
        )
        service.submit(alice, rid)
        service.comment(alice, rid, text.replace("field", "comment"), "public")
        # the second checker's comments are shown to the first (and in their own edit form)
        view = service.view(alice, rid)
        for f in view["files"]:
            service.vote(checker2, rid, f["id"], "request_changes", text.replace("field", "vote"))
        files = service.view(alice, rid)["files"]
        assert any(f["findings"] for f in files), "no finding quotes a hostile cell"
        # group names are restricted: a payload group is refused outright
        with pytest.raises(Exception, match="group name"):
            service.create_request(
                alice, "wilms-outcomes", [FileSpec(paths[0], "<svg onload=pwn()>")]
            )

        fired: list[str] = []
        problems: list[str] = []
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=require_chromium, args=FLAGS)

            def session(user: str, strip_csp: bool):
                ctx = browser.new_context(viewport={"width": 1200, "height": 900})
                ctx.expose_function("pwn", lambda what=None: fired.append(f"{user}: {what}"))
                page = ctx.new_page()
                page.on("dialog", lambda d: (fired.append(f"dialog {d.message}"), d.dismiss()))
                page.on(
                    "console",
                    lambda m: (
                        problems.append(f"console: {m.text}")
                        if "Content Security Policy" in m.text
                        else None
                    ),
                )
                page.goto(base + "requests")
                page.fill("#username_input", user)
                page.fill("#password_input", HUB_PASSWORD)
                page.click("#login_submit")
                page.wait_for_url(base + "**")
                if strip_csp:

                    def strip(route):
                        response = route.fetch(max_redirects=0)
                        headers = {
                            k: v
                            for k, v in response.headers.items()
                            if k.lower() != "content-security-policy"
                        }
                        route.fulfill(response=response, headers=headers)

                    page.route(f"**{prefix}**", strip)
                return page

            def visit(page, url: str, wait: str | None = None) -> None:
                try:
                    page.goto(url)
                except PlaywrightError as exc:
                    if "Download is starting" in str(exc):
                        return  # served as an attachment: not rendered, which is the point
                    raise
                if wait:
                    try:
                        page.wait_for_selector(wait, timeout=10000)
                    except PlaywrightError:
                        problems.append(f"{url}: {wait} never appeared (the page was broken)")
                page.wait_for_timeout(300)  # let htmx, onload and timers have their go
                page.mouse.move(5, 5)
                page.mouse.move(600, 400)  # hover what an onmouseover would need
                if not page.url.startswith(live.hub.url):
                    problems.append(f"{url} navigated to {page.url}")
                    return
                for frame in page.frames:
                    try:
                        for bad in frame.evaluate(DOM_PROBE):
                            problems.append(f"{url} [{frame.url}]: {bad}")
                    except PlaywrightError as exc:
                        problems.append(f"{url} [{frame.url}]: probe failed {exc}")

            raw_images = [
                f"{base}requests/{rid}/files/{f['id']}/raw"
                for f in files
                if f["name"].endswith((".png", ".jpg"))
            ]
            previews = [
                f"{base}requests/{rid}/files/{f['id']}/preview"
                for f in files
                if f["name"].endswith((".csv", ".txt", ".html", ".svg", ".md"))
            ]
            notebooks = [
                f"{base}requests/{rid}/files/{f['id']}/notebook"
                for f in files
                if f["name"].endswith(".ipynb")
            ]
            assert raw_images and previews and notebooks
            for strip_csp in (False, True):
                checker = session("checker1", strip_csp)
                visit(checker, base + "queue")
                visit(checker, base + f"requests/{rid}", wait=".preview table")
                body = checker.inner_text("body")
                # the payloads are shown, as text
                for shown in ("<script data-pwn>pwn('context-script')</script>", "{{7*7}}"):
                    if shown not in body:
                        problems.append(f"the request page does not show {shown!r} as text")
                frames = checker.locator("iframe.notebook")
                if frames.count() != 1 or frames.get_attribute("sandbox") != "":
                    problems.append("the notebook is not in one iframe with sandbox=''")
                # a boosted navigation: htmx would keep the page it leaves (private content,
                # the CSRF token) in the tab's storage, where it outlives a logout
                checker.click("header a[href$='/queue']")
                checker.wait_for_selector("#count-waiting")
                kept = checker.evaluate(
                    "() => [localStorage, sessionStorage].map(s => s.getItem('htmx-history-cache'))"
                )
                if any(kept):
                    problems.append(f"htmx kept a page in the browser's storage: {kept!r:.80}")
                for url in previews + notebooks + raw_images:
                    visit(checker, url)
                checker.context.close()
                voter = session("checker2", strip_csp)  # their own comments in textareas
                visit(voter, base + f"requests/{rid}", wait=".preview table")
                voter.context.close()
                author = session("alice", strip_csp)
                visit(author, base + "requests")
                visit(author, base + f"requests/{rid}", wait=".preview table")
                author.context.close()
                admin = session("admin", strip_csp)
                for page_path in ("audit", "admin", "admin/members", "admin/events", "admin/stats"):
                    visit(admin, base + page_path)
                visit(admin, base + "transparency")
                admin.context.close()
            browser.close()
        report = [f"ran: {x}" for x in fired] + problems
        report += [f"loaded: {x}" for x in list(canary.hits) + list(same_origin.hits)]
        assert report == [], "\n".join(report[:60])
    finally:
        canary.close()


# --- file-serving URLs: never a document of the airlock's origin ------------------------------

HOSTILE_FILES = {
    "outputs/page.html": "<html><body><script>alert(1)</script><img src=x onerror=alert(2)>",
    "outputs/page.svg": '<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"/>',
    "outputs/page.xml": '<html xmlns="http://www.w3.org/1999/xhtml"><script>alert(1)</script></html>',
    "outputs/page.txt": "<html><script>alert(1)</script></html>",
    "outputs/page.htm": "<script>alert(1)</script>",
    "outputs/fake.png": "<html><script>alert(1)</script></html>",
    "outputs/page.csv": "group,count\n<script>alert(1)</script>,30\nb,30\n",
}


def _released_hostile_request(service, ws: Path) -> tuple[str, list[dict]]:
    for rel, text in HOSTILE_FILES.items():
        (ws / rel).write_text(text)
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("<script>alert(1)</script>")]
    nbformat.write(nb, ws / "outputs" / "nb.ipynb")
    alice = service.who("alice")
    paths = [*HOSTILE_FILES, "outputs/nb.ipynb"]
    rid = service.create_request(alice, "wilms-outcomes", [FileSpec(p) for p in paths])
    service.submit(alice, rid)
    for checker in ("checker1", "checker2"):
        for f in service.view(alice, rid)["files"]:
            service.vote(service.who(checker), rid, f["id"], "approve", "", "reviewed by eye")
    view = service.view(alice, rid)
    assert view["state"] == "released", view["state"]
    return rid, view["files"]


def _not_rendered_here(r: httpx.Response) -> str | None:
    """Why this response could be rendered as a page of the airlock's origin, or None."""
    media = r.headers.get("content-type", "").split(";")[0].strip().lower()
    csp = r.headers.get("content-security-policy", "")
    if r.headers.get("x-content-type-options", "").lower() != "nosniff":
        return "no 'X-Content-Type-Options: nosniff'"
    if r.headers.get("content-disposition", "").lower().startswith("attachment"):
        return None
    if media in ("image/png", "image/jpeg") and "sandbox" in csp:
        return None
    if media == "text/html" and re.search(r"(^|;)\s*sandbox\s*(;|$)", csp):
        return None  # an opaque origin: no script, no cookies of ours
    return f"served inline as {media!r} with CSP {csp!r}"


def _private_headers(r: httpx.Response) -> list[str]:
    """What a page or file only its viewer may see must send."""
    wrong = []
    if "no-store" not in r.headers.get("cache-control", ""):
        wrong.append(f"Cache-Control {r.headers.get('cache-control')!r} lets caches keep it")
    if r.headers.get("x-content-type-options", "").lower() != "nosniff":
        wrong.append("no nosniff")
    csp = r.headers.get("content-security-policy", "")
    if "frame-ancestors 'none'" not in csp and "frame-ancestors 'self'" not in csp:
        wrong.append(f"can be framed by another site (CSP {csp!r})")
    return wrong


def test_file_urls_are_never_rendered_in_the_airlock_origin(client, tre_settings):
    live, service = client.live, client.service
    ws = tre_settings.workspaces_dir / "wilms-outcomes"
    rid, files = _released_hostile_request(service, ws)
    http = login(live, "alice")
    checker = login(live, "checker1")
    token = {"Authorization": f"token {live.tokens['alice']}"}
    problems = []
    try:
        for f in files:
            fid, name = f["id"], f["name"]
            page = f"{live.prefix}requests/{rid}/files/{fid}"
            urls = {
                "raw": (checker, f"{page}/raw"),
                "download": (http, f"{page}/download"),
                "api download": (
                    client.http,
                    f"{live.base}api/requests/{rid}/files/{fid}/download",
                ),
            }
            if name.endswith(".ipynb"):
                urls["notebook"] = (checker, f"{page}/notebook")
            for what, (who, url) in urls.items():
                r = who.get(url, headers=token if who is client.http else None)
                assert r.status_code == 200, (what, name, r.status_code, r.text[:200])
                for wrong in filter(None, [_not_rendered_here(r), *_private_headers(r)]):
                    problems.append(f"{what} of {name}: {wrong}")
            # the preview is a page fragment of ours: it must show the file as text only
            r = checker.get(f"{page}/preview")
            assert r.status_code == 200
            if re.search(r"<(script|svg|img|html)\b", r.text, re.I):
                problems.append(f"preview of {name} holds live markup: {r.text[:200]!r}")
            problems += [f"preview of {name}: {w}" for w in _private_headers(r)]
        # the private pages themselves
        for who, path in [
            (http, "requests"),
            (http, f"requests/{rid}"),
            (checker, "queue"),
            (checker, f"requests/{rid}"),
        ]:
            r = who.get(live.prefix + path)
            assert r.status_code == 200, path
            problems += [f"page {path}: {w}" for w in _private_headers(r)]
        # answers that are not pages (JSON errors, redirects, the API) are not sniffed either
        for r in [
            http.post(f"{live.prefix}requests/{rid}/comment", data={"comment": "<b>x</b>"}),
            http.get(f"{live.prefix}requests/{'0' * 32}"),
            client.http.get("api/me", headers=token),
            client.http.get("requests", follow_redirects=False),
        ]:
            if r.headers.get("x-content-type-options") != "nosniff":
                problems.append(f"{r.request.url.path} {r.status_code}: no nosniff")
            if "frame-ancestors 'none'" not in r.headers.get("content-security-policy", ""):
                problems.append(f"{r.request.url.path} {r.status_code}: can be framed")
        # the session cookie: not for scripts, not sent on cross-site subrequests
        cookie = next(c for c in http.cookies.jar if c.name == "airlock-session")
        attrs = {k.lower(): (v or "").lower() for k, v in cookie._rest.items()}  # noqa: SLF001
        assert cookie.path == live.prefix
        assert "httponly" in attrs and attrs.get("samesite") in ("lax", "strict"), attrs
    finally:
        http.close()
        checker.close()
    assert problems == [], "\n".join(problems)


# --- CSRF ------------------------------------------------------------------------------------


def _csrf(http: httpx.Client, url: str) -> str:
    page = http.get(url)
    assert page.status_code == 200, page.text[:200]
    return re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)


def test_every_page_form_needs_the_sessions_own_csrf_token(client, tre_settings):
    """Each state-changing page endpoint, as the user entitled to use it, refuses a request
    without a token, with a forged one, and with another user's valid token (in the form or in
    htmx's header); the refused requests change nothing; the right token works."""
    from tre.audit import export_events

    live, service = client.live, client.service
    prefix = live.prefix
    alice = service.who("alice")
    ws = tre_settings.workspaces_dir / "wilms-outcomes"
    (ws / "outputs" / "second.csv").write_text("group,count\na,40\nb,50\n")
    pending = service.create_request(
        alice, "wilms-outcomes", [FileSpec("outputs/table.csv"), FileSpec("notes.txt")]
    )
    in_review = service.create_request(alice, "wilms-outcomes", [FileSpec("outputs/table.csv")])
    service.submit(alice, in_review)
    fid = service.view(alice, in_review)["files"][0]["id"]
    pending_fid = service.view(alice, pending)["files"][0]["id"]
    service.vote(service.who("checker2"), in_review, fid, "approve")
    sessions = {u: login(live, u) for u in ("alice", "checker1", "checker2")}
    tokens = {u: _csrf(h, prefix + "requests") for u, h in sessions.items()}
    # (user, path, form) for every state-changing form the pages have
    forms = [
        ("alice", "requests", {"project": "wilms-outcomes", "paths": "notes.txt"}),
        ("alice", f"requests/{pending}/add-file", {"path": "outputs/second.csv"}),
        ("alice", f"requests/{pending}/withdraw-file", {"file_id": str(pending_fid)}),
        ("alice", f"requests/{pending}/submit", {}),
        ("alice", f"requests/{pending}/withdraw", {}),
        ("alice", f"requests/{pending}/comment", {"comment": "hello"}),
        ("checker1", f"requests/{in_review}/files/{fid}/vote", {"decision": "approve"}),
        (
            "checker2",
            f"requests/{in_review}/files/{fid}/vote/change",
            {"decision": "reject", "comment": "no"},
        ),
        ("checker1", f"requests/{in_review}/return", {"comment": "no"}),
        ("checker1", f"requests/{in_review}/reject", {"comment": "no"}),
        ("checker1", f"requests/{in_review}/comment", {"comment": "x", "visibility": "private"}),
        ("alice", f"requests/{in_review}/release", {}),
        ("alice", "logout", {}),
    ]

    def state():
        with service.factory() as s:
            events = len(list(export_events(s)))
        return (
            events,
            service.count_requests(),
            json.dumps([service.view(alice, r) for r in (pending, in_review)], default=str),
        )

    before = state()
    try:
        for user, path, form in forms:
            http = sessions[user]
            other = tokens["checker2" if user != "checker2" else "alice"]
            attempts = [
                ({}, {}),
                ({"csrf_token": "forged"}, {}),
                ({"csrf_token": other}, {}),
                ({}, {"X-CSRF-Token": other, "HX-Request": "true"}),
                ({"csrf_token": tokens[user]}, {"X-CSRF-Token": other}),  # the header wins
            ]
            for extra, headers in attempts:
                r = http.post(
                    prefix + path,
                    data={**form, **extra},
                    headers=headers,
                    follow_redirects=False,
                )
                assert r.status_code == 403 and "CSRF" in r.text, (path, extra, headers, r.text)
            # a GET never changes anything
            assert http.get(prefix + path, follow_redirects=False).status_code in (200, 405)
        assert state() == before
        # the same forms with the session's own token do work (so the 403s above were CSRF's)
        ok = sessions["alice"].post(
            f"{prefix}requests/{pending}/comment",
            data={"comment": "hello", "csrf_token": tokens["alice"]},
            follow_redirects=False,
        )
        assert ok.status_code == 303
        ok = sessions["checker1"].post(
            f"{prefix}requests/{in_review}/files/{fid}/vote",
            headers={"X-CSRF-Token": tokens["checker1"], "HX-Request": "true"},
            data={"decision": "approve"},
            follow_redirects=False,
        )
        assert ok.status_code == 303
        assert service.view(alice, in_review)["state"] == "released"
        # no CORS: a cross-site script may not send the custom header htmx uses
        pre = sessions["alice"].options(
            f"{prefix}requests/{pending}/submit",
            headers={
                "Origin": "https://evil.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "x-csrf-token",
            },
        )
        assert "access-control-allow-origin" not in pre.headers
    finally:
        for h in sessions.values():
            h.close()


def test_every_state_changing_page_route_checks_csrf(client):
    """Structural guard: a new page form that forgets the CSRF dependency fails here."""
    app = client.live.holder.app
    prefix = client.live.prefix
    unguarded = []
    for route in app.routes:
        methods = getattr(route, "methods", set()) or set()
        if not methods & {"POST", "PUT", "PATCH", "DELETE"}:
            continue
        if route.path.startswith(prefix + "api/"):
            continue  # token-authenticated: the cookie never authenticates the API
        calls = {d.call.__name__ for d in route.dependant.dependencies}
        if "check_csrf" not in calls:
            unguarded.append(f"{sorted(methods)} {route.path}")
    assert unguarded == []
    # and the API really ignores the cookie (checked in test_bad_requests.test_csrf_on_forms)


# --- login redirect --------------------------------------------------------------------------

HOSTILE_NEXT = [
    "https://evil.example/",
    "//evil.example/",
    "///evil.example/",
    "/\\evil.example/",
    "\\\\evil.example/",
    "/\t/evil.example/",
    "javascript:alert(1)",
    "data:text/html,<script>alert(1)</script>",
    "http:evil.example",
    "%2F%2Fevil.example",
    "{prefix}..//evil.example",
    "{prefix}\\\\evil.example",
    "{prefix}/\\evil.example",
    "{prefix}%0d%0aSet-Cookie:x=1",
    "{prefix}\r\nLocation: https://evil.example",
    "https://evil.example{prefix}",
    "{prefix}@evil.example",
    "{prefix}\u3002evil.example",
]


def _browser_resolve(location: str, base: str) -> tuple[str, str]:
    """(scheme, host) a browser would go to: WHATWG URL parsing treats '\\' as '/' and drops
    tabs and newlines in special URLs, which ``urljoin`` does not."""
    cleaned = re.sub(r"[\t\n\r]", "", location).replace("\\", "/")
    target = urlsplit(urljoin(base, cleaned))
    return target.scheme, target.netloc


@pytest.mark.parametrize("prefix", ["/services/airlock/", "/"])
def test_login_next_never_leaves_the_site(prefix):
    """Through the whole OAuth round trip (a fake hub token exchange): wherever ``next``
    points, the callback lands on the airlock's own origin, under its prefix."""
    import anyio

    from airlock.service.auth import HubConfig, HubIdentityProvider

    class FakeHub(HubIdentityProvider):
        async def token_for_code(self, code: str, verifier: str) -> str:
            return "token-" + code

    identity = FakeHub(
        HubConfig(api_url="http://127.0.0.1:9/hub/api", api_token="x", prefix=prefix)
    )
    app = create_app(object(), identity, prefix=prefix, session_secret="s")  # type: ignore[arg-type]
    base = "http://airlock.test"

    async def landing(http: httpx.AsyncClient, nxt: str) -> str:
        """Where the browser is sent after logging in from ``login?next=<nxt>``."""
        r = await http.get(f"{prefix}login?next={quote(nxt, safe='')}")
        assert r.status_code == 302
        query = dict(p.split("=", 1) for p in urlsplit(r.headers["location"]).query.split("&"))
        r = await http.get(f"{prefix}oauth_callback?code=c&state={query['state']}")
        assert r.status_code == 302, (nxt, r.text)
        return r.headers["location"]

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=base) as http:
            for raw in HOSTILE_NEXT:
                nxt = raw.format(prefix=prefix)
                location = await landing(http, nxt)
                scheme, host = _browser_resolve(location, base + prefix)
                assert (scheme, host) == ("http", "airlock.test"), (nxt, location)
                assert urlsplit(urljoin(base, location)).path.startswith(prefix), (nxt, location)
                assert not re.search(r"[\x00-\x1f\\]", location), (nxt, location)
            # a same-site next is kept
            assert await landing(http, prefix + "queue") == prefix + "queue"

    anyio.run(main)


def test_on_its_own_https_host_the_session_cookie_cannot_be_tossed(monkeypatch):
    """Behind the hub with origin separation the airlock has a host of its own: the hub's
    OAuth sends the browser back to that host (JUPYTERHUB_PUBLIC_URL), and on https the
    session cookie is ``__Host-`` (Secure, Path=/, no Domain), which a researcher's server on a
    sibling host cannot overwrite with a cookie of its own for the parent domain."""
    import anyio

    from airlock.service.auth import HubConfig, HubIdentityProvider

    public = "https://airlock--service.tre.example.org/services/airlock/"
    monkeypatch.setenv("JUPYTERHUB_API_URL", "http://127.0.0.1:9/hub/api")
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "x")
    monkeypatch.setenv("JUPYTERHUB_HOST", "https://tre.example.org")
    monkeypatch.setenv("JUPYTERHUB_PUBLIC_URL", public)
    config = HubConfig.from_env()
    assert config.oauth_redirect_uri == public + "oauth_callback"

    class FakeHub(HubIdentityProvider):
        async def token_for_code(self, code: str, verifier: str) -> str:
            return "token-" + code

    identity = FakeHub(config)
    prefix = config.prefix
    app = create_app(object(), identity, prefix=prefix, session_secret="s", https_only=True)  # type: ignore[arg-type]

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        origin = "https://airlock--service.tre.example.org"
        async with httpx.AsyncClient(transport=transport, base_url=origin) as http:
            r = await http.get(f"{prefix}login")
            assert r.status_code == 302
            target = urlsplit(r.headers["location"])
            assert (target.scheme, target.netloc) == ("https", "tre.example.org")  # the hub
            query = dict(p.split("=", 1) for p in target.query.split("&"))
            assert unquote(query["redirect_uri"]) == public + "oauth_callback"
            cookie = r.headers["set-cookie"]
            assert cookie.startswith("__Host-airlock-session="), cookie
            attributes = {a.strip().split("=")[0].lower() for a in cookie.split(";")[1:]}
            assert {"secure", "path"} <= attributes and "domain" not in attributes, cookie
            assert "path=/;" in cookie.replace(" ", "").lower() + ";", cookie

    anyio.run(main)

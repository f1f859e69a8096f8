"""The researcher's way in, in real headless Chromium: login -> home -> start -> JupyterLab.

Also checks what the browser fetched: everything from the hub's loopback address (JupyterLab
asks for no news, no extension index, nothing outside)."""

from __future__ import annotations

import json
import re
from urllib.parse import urlparse

import pytest
from conftest import PASSWORDS

from tre.hub.harness import CHROMIUM_LOOPBACK_RULES, loopback_request
from tre.settings import REPO_ROOT

pytestmark = [pytest.mark.hub, pytest.mark.sandbox, pytest.mark.browser]
SCREENSHOTS = REPO_ROOT / "docs" / "screenshots"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    CHROMIUM_LOOPBACK_RULES,
]


@pytest.mark.slow
def test_login_spawn_jupyterlab_in_chromium(hub, require_chromium):
    from playwright.sync_api import sync_playwright

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    requested: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=require_chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.on("request", lambda req: requested.append(req.url))
            page.goto(f"{hub.public_url}/hub/login")
            page.fill("#username_input", "bob")
            page.fill("#password_input", PASSWORDS["bob"])
            page.click("#login_submit")
            page.wait_for_selector("#tre-projects")
            rows = page.locator("tr.tre-project")
            assert rows.count() == 1
            assert rows.first.get_attribute("data-project") == "wilms-outcomes"
            page.screenshot(path=str(SCREENSHOTS / "hub-home.png"))
            page.locator("tr.tre-project a.btn").first.click()
            page.wait_for_url("**/user/bob/wilms-outcomes/lab**", timeout=120_000)
            page.wait_for_selector(".jp-LabShell", timeout=120_000)
            page.wait_for_selector(".jp-DirListing-content", timeout=60_000)
            page.wait_for_timeout(3000)  # give a news prompt, if any, the chance to appear
            assert "official Jupyter news" not in page.content()
            page.screenshot(path=str(SCREENSHOTS / "jupyterlab-sandbox.png"))
        finally:
            browser.close()
    hosts = {urlparse(u).hostname for u in requested if u.startswith(("http", "ws"))}
    # the hub's host and bob's own; nothing else (the airlock is not visited here)
    hub_host = urlparse(hub.public_url).hostname
    assert hosts == {hub_host, f"bob.{hub_host}"}, hosts
    assert not any("extensions" in u and "pypi" in u for u in requested)
    hub.stop_server("bob", "wilms-outcomes")


def test_jupyterlab_settings_switch_off_every_outbound_fetch(hub, alice_server, alice_token):
    """The sandbox's JupyterLab serves the TRE's settings: no news, no update check, no
    extension manager; its news and update endpoints answer without fetching anything."""

    base = hub.server_url("alice", alice_server)
    headers = {"Authorization": f"token {alice_token}"}
    notification = loopback_request(
        "GET",
        f"{base}/lab/api/settings/@jupyterlab/apputils-extension:notification",
        headers=headers,
    ).json()
    # overrides.json becomes the schema's defaults, which is what JupyterLab then uses
    defaults = notification["schema"]["properties"]
    assert defaults["fetchNews"]["default"] == "false", defaults["fetchNews"]
    assert defaults["checkForUpdates"]["default"] is False
    news = loopback_request("GET", f"{base}/lab/api/news", headers=headers)
    assert news.status_code == 200 and news.json()["news"] == []
    update = loopback_request("GET", f"{base}/lab/api/update", headers=headers)
    assert update.status_code == 200 and not update.json().get("notification")
    lab = loopback_request("GET", f"{base}/lab", headers=headers).text
    match = re.search(
        r'<script id="jupyter-config-data" type="application/json">(.*?)</script>', lab, re.S
    )
    page_config = json.loads(match.group(1))
    manager = page_config["extensionManager"]
    assert manager["can_install"] is False, manager
    disabled = page_config["disabledExtensions"]
    assert "@jupyterlab/extensionmanager-extension:plugin" in disabled, disabled
    assert "@jupyterlab/apputils-extension:announcements" in disabled, disabled
    # and the extension listing answers from the read-only manager, without any index
    listing = loopback_request("GET", f"{base}/lab/api/extensions", headers=headers)
    assert listing.status_code == 200

"""In real headless Chromium through the hub's proxy and OAuth: a researcher submits, two
checkers approve, the researcher downloads the released file and its bytes match.

Screenshots go to a temporary directory; set AIRLOCK_UPDATE_SCREENSHOTS=1 to refresh
docs/screenshots/.
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from PIL import Image

from tests.hubfixture import HUB_PASSWORD

from .conftest import postgres_db


@pytest.fixture
def db(request, tmp_path):
    return postgres_db(request, tmp_path)


pytestmark = [pytest.mark.postgres, pytest.mark.browser, pytest.mark.hub]

DOCS_SHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def make_outputs(ws: Path) -> dict[str, bytes]:
    (ws / "outputs" / "figure.png").parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (120, 60), (40, 90, 160)).save(ws / "outputs" / "figure.png")
    nb = nbformat.v4.new_notebook()
    counts = (
        '<table class="dataframe"><thead><tr><th>era</th><th>relapses</th><th>children</th>'
        "</tr></thead><tbody><tr><td>1990-1999</td><td>45</td><td>310</td></tr>"
        "<tr><td>2000-2009</td><td>40</td><td>355</td></tr>"
        "<tr><td>2010-2020</td><td>35</td><td>390</td></tr></tbody></table>"
    )
    nb.cells = [
        nbformat.v4.new_markdown_cell(
            "# Relapse by study era\n\nWilms tumour, all contributing sites; counts rounded "
            "to 5, cells below 10 suppressed."
        ),
        nbformat.v4.new_code_cell(
            "relapses_by_era",
            outputs=[
                nbformat.v4.new_output(
                    "execute_result", data={"text/html": counts}, execution_count=1
                )
            ],
        ),
        nbformat.v4.new_code_cell(
            "print('counts rounded to 5')",
            outputs=[nbformat.v4.new_output("stream", name="stdout", text="counts rounded to 5\n")],
        ),
        nbformat.v4.new_code_cell(
            "html",
            outputs=[
                nbformat.v4.new_output(
                    "display_data", data={"text/html": "<b>bold</b><script>alert(1)</script>"}
                )
            ],
        ),
    ]
    nbformat.write(nb, ws / "outputs" / "analysis.ipynb")
    return {
        p: (ws / p).read_bytes()
        for p in ("outputs/table.csv", "outputs/figure.png", "outputs/analysis.ipynb")
    }


def test_submit_two_approvals_download(client, tre_settings, require_chromium, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    live = client.live
    shots = DOCS_SHOTS if os.environ.get("AIRLOCK_UPDATE_SCREENSHOTS") else tmp_path / "shots"
    shots.mkdir(parents=True, exist_ok=True)
    originals = make_outputs(tre_settings.workspaces_dir / "wilms-outcomes")
    base = live.hub.url + live.prefix

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=require_chromium, args=FLAGS)

        def session(user):
            ctx = browser.new_context(
                accept_downloads=True, viewport={"width": 1200, "height": 900}
            )
            page = ctx.new_page()
            page.goto(base + "requests")
            page.fill("#username_input", user)
            page.fill("#password_input", HUB_PASSWORD)
            page.click("#login_submit")
            page.wait_for_url(base + "requests")
            return page

        alice = session("alice")
        alice.select_option("select[name=project]", "wilms-outcomes")
        alice.fill("input[name=title]", "Relapse by era")
        alice.fill("textarea[name=paths]", "\n".join(originals))
        alice.fill("textarea[name=context]", "Relapse counts by study era, all sites, 1990-2020.")
        alice.fill("textarea[name=controls]", "Counts rounded to 5; cells below 10 suppressed.")
        alice.click("#new-request button[type=submit]")
        alice.wait_for_selector("#request-state:text('submitted')")
        request_url = alice.url
        alice.screenshot(path=str(shots / "request-author.png"), full_page=True)

        for checker in ("checker1", "checker2"):
            page = session(checker)
            page.goto(base + "queue")
            assert page.inner_text("#count-waiting") == "1"
            if checker == "checker1":
                page.screenshot(path=str(shots / "queue.png"), full_page=True)
            page.click("#queue-waiting a")
            page.wait_for_selector("form.vote-form")
            # the notebook is in a sandboxed iframe and its script did not run
            frame = page.locator("iframe.notebook")
            assert frame.get_attribute("sandbox") == ""
            nb_frame = page.locator("iframe.notebook").element_handle().content_frame()
            nb_frame.wait_for_load_state()
            nb_frame.wait_for_selector("text=counts rounded to 5")
            html = nb_frame.content()
            assert "Relapse by study era" in html and "counts rounded to 5" in html
            assert "<script" not in html  # sanitised, and scripts could not run anyway
            assert "<th>relapses</th>" in html  # a table output keeps its column labels
            if checker == "checker1":
                page.screenshot(path=str(shots / "request-checker.png"), full_page=True)
                card = page.locator("div.file", has=page.locator("iframe.notebook"))
                card.scroll_into_view_if_needed()
                card.screenshot(path=str(shots / "notebook-preview.png"))
            while page.locator("form.vote-form").count():
                page.wait_for_selector(".preview table")  # htmx has loaded the table preview
                before = page.locator("form.vote-form").count()
                form = page.locator("form.vote-form").first
                radio = form.locator("input[value=approve]")
                for _ in range(5):  # a late htmx swap can eat a click: retry until checked
                    radio.click()
                    if radio.is_checked():
                        break
                    page.wait_for_timeout(200)
                form.locator("button").click()
                expect(page.locator("form.vote-form")).to_have_count(before - 1)
            page.context.close()

        alice.goto(request_url)
        alice.wait_for_selector("#request-state:text('released')")
        released_nb = alice.locator("iframe.notebook").element_handle().content_frame()
        released_nb.wait_for_selector("text=counts rounded to 5")
        alice.screenshot(path=str(shots / "request-released.png"), full_page=True)
        links = alice.locator("a.download")
        assert links.count() == len(originals)
        got = {}
        for i in range(links.count()):
            with alice.expect_download() as info:
                links.nth(i).click()
            got[info.value.suggested_filename] = Path(info.value.path()).read_bytes()
        assert got == {Path(p).name: data for p, data in originals.items()}
        browser.close()

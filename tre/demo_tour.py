"""``tre demo --tour``: the whole story, headless, through the real HTTP interfaces.

Every step talks to the running TRE the way a person or a browser would: the hub's login form,
the hub REST API with the user's own token, a kernel in the live sandbox over the proxy's
websocket, the airlock's JSON API (from inside the sandbox over its unix socket, and from
outside), the public register. A step that cannot be done FAILS the tour, loudly, with the
reason; nothing is skipped or faked. The exit status is 0 only if every step worked.

With ``screenshots``, headless Chromium (Playwright) also photographs the hub, JupyterLab with
the example notebook, the airlock review page, the transparency register and the admin page.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tre.demo import EXAMPLE_NOTEBOOK, DemoContext, example_notebook
from tre.hub.harness import CHROMIUM_LOOPBACK_RULES, loopback_client

PROJECT = "wilms-outcomes"
OTHER_PROJECT = "leukaemia-incidence"
OUTPUT = "outputs/relapse_by_stage.csv"
CHROMIUM_FLAGS = [
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


class TourFailure(RuntimeError):
    pass


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise TourFailure(message)


@dataclass
class TourState:
    tokens: dict[str, str] = field(default_factory=dict)
    request_id: str | None = None
    file_ids: list[int] = field(default_factory=list)
    reviewed_sha256: dict[int, str] = field(default_factory=dict)
    kernel_id: str | None = None


class Tour:
    def __init__(self, ctx: DemoContext, screenshots: Path | None) -> None:
        self.ctx = ctx
        self.screenshots = screenshots
        self.state = TourState()
        self.base = ctx.hub_url
        self.airlock = ctx.airlock_url

    # -- helpers ----------------------------------------------------------------------------

    def client(self, **kw: Any) -> httpx.Client:
        # trust_env=False: never route through an outside proxy; everything here is loopback
        # (the hub's public host names are sent to 127.0.0.1, never looked up)
        return loopback_client(base_url=self.base, timeout=60, trust_env=False, **kw)

    def auth(self, user: str) -> dict[str, str]:
        return {"Authorization": f"token {self.state.tokens[user]}"}

    def login(self, user: str) -> str:
        """Log in through the hub's login form; return a token the user created for itself."""
        password = self.ctx.passwords[user]
        with self.client(follow_redirects=False) as c:
            page = c.get("/hub/login")
            expect(page.status_code == 200, f"GET /hub/login answered {page.status_code}")
            xsrf = c.cookies.get("_xsrf", "")
            wrong = c.post(
                "/hub/login",
                data={"username": user, "password": password + "x", "_xsrf": xsrf},
            )
            expect(wrong.status_code != 302, f"a wrong password logged {user} in")
            resp = c.post(
                "/hub/login", data={"username": user, "password": password, "_xsrf": xsrf}
            )
            expect(
                resp.status_code == 302,
                f"login of {user} answered {resp.status_code}: {resp.text[:300]}",
            )
            xsrf = c.cookies.get("_xsrf", xsrf)
            token = c.post(
                f"/hub/api/users/{user}/tokens",
                json={"note": "demo tour", "expires_in": 3600},
                headers={"X-XSRFToken": xsrf},
            )
            expect(
                token.status_code in (200, 201),
                f"{user} could not create a token with the login session: {token.status_code} "
                f"{token.text[:300]}",
            )
            self.state.tokens[user] = token.json()["token"]
        return f"{user} logged in through the form (a wrong password was refused)"

    def server_model(self, user: str, name: str) -> dict[str, Any]:
        with self.client() as c:
            r = c.get(f"/hub/api/users/{user}", headers=self.auth(user))
            expect(r.status_code == 200, f"GET /hub/api/users/{user}: {r.status_code}")
            return (r.json().get("servers") or {}).get(name) or {}

    def run_in_kernel(self, code: str, timeout: float = 120) -> dict[str, Any]:
        from tre.hub.harness import execute_in_kernel

        try:
            return execute_in_kernel(
                self.ctx.server_url("alice", PROJECT),
                self.state.kernel_id,
                self.auth("alice"),
                code,
                timeout,
            )
        except (TimeoutError, RuntimeError) as exc:
            raise TourFailure(f"the kernel did not answer: {exc}") from None

    # -- the story ----------------------------------------------------------------------------

    def step_login(self) -> str:
        return self.login("alice")

    def step_start_sandbox(self) -> str:
        with self.client() as c:
            refused = c.post(
                f"/hub/api/users/alice/servers/{OTHER_PROJECT}", headers=self.auth("alice")
            )
            expect(
                refused.status_code >= 400,
                f"alice could start a sandbox of {OTHER_PROJECT}, a project she is not in",
            )
            r = c.post(f"/hub/api/users/alice/servers/{PROJECT}", headers=self.auth("alice"))
            expect(
                r.status_code in (201, 202, 400),
                f"starting alice/{PROJECT}: {r.status_code} {r.text[:300]}",
            )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            model = self.server_model("alice", PROJECT)
            if model.get("ready"):
                return f"alice's {PROJECT} sandbox is ready; {OTHER_PROJECT} was refused"
            expect(bool(model), f"the {PROJECT} server vanished while starting (see hub log)")
            time.sleep(0.5)
        raise TourFailure(f"alice's {PROJECT} sandbox was not ready within 120 s")

    def step_query(self) -> str:
        with self.client() as c:
            r = c.post(
                f"{self.ctx.server_url('alice', PROJECT)}/api/kernels",
                headers=self.auth("alice"),
                json={"name": "python3"},
            )
            expect(
                r.status_code in (200, 201), f"starting a kernel: {r.status_code} {r.text[:200]}"
            )
            self.state.kernel_id = r.json()["id"]
        # the example analysis from notebooks/, cell by cell, as JupyterLab would run it
        for i, cell in enumerate(example_notebook().cells):
            if cell.cell_type != "code":
                continue
            out = self.run_in_kernel(cell.source)
            expect(
                out["error"] is None,
                f"cell {i} of notebooks/{EXAMPLE_NOTEBOOK} failed in the sandbox: {out['error']}",
            )
        code = f"""
import json, os
import polars as pl
names = con.sql("SELECT table_name FROM information_schema.tables").fetchall()
print(json.dumps({{
    "tables": sorted(r[0] for r in names), "rows": df.height, "status": str(t.status),
    "polars": isinstance(df, pl.DataFrame), "saved": os.path.isfile({OUTPUT!r}),
}}))
"""
        out = self.run_in_kernel(code)
        expect(out["error"] is None, f"the analysis failed in the sandbox: {out['error']}")
        result = json.loads(out["stdout"].strip().splitlines()[-1])
        expect(result["rows"] > 0, "the extract holds no staged Wilms tumours")
        expect(result["polars"], "the query did not give a polars DataFrame")
        expect(result["saved"], f"the notebook did not save {OUTPUT}")
        expect("treatment" not in result["tables"], "the extract holds an ungranted table")
        return (
            f"DuckDB + polars on the read-only extract: relapse by stage over {result['rows']} "
            f"tumours, checked by tre.outputs ({result['status']}) and saved"
        )

    def step_request_release(self) -> str:
        code = f"""
import json, os, httpx
transport = httpx.HTTPTransport(uds=os.environ["TRE_AIRLOCK_SOCKET"])
with httpx.Client(transport=transport, base_url="http://airlock", timeout=60) as c:
    r = c.post(
        "/services/airlock/api/requests",
        headers={{"Authorization": "token " + os.environ["JUPYTERHUB_API_TOKEN"]}},
        json={{
            "project": {PROJECT!r},
            "title": "Relapse by stage",
            "context": "Wilms tumours (stages I-IV) with and without a relapse, all sites.",
            "controls": "tre.outputs frequency table; small cells would be suppressed.",
            "files": [{{"path": {OUTPUT!r}, "group": "tables"}}],
            "submit": True,
        }},
    )
print(json.dumps({{"status": r.status_code, "body": r.json()}}))
"""
        out = self.run_in_kernel(code)
        expect(out["error"] is None, f"requesting the release from the sandbox: {out['error']}")
        answer = json.loads(out["stdout"].strip().splitlines()[-1])
        expect(answer["status"] == 201, f"the airlock answered {answer}")
        body = answer["body"]
        expect(body["state"] == "submitted", f"the request is {body['state']}, not submitted")
        self.state.request_id = body["id"]
        self.state.file_ids = [f["id"] for f in body["files"]]
        statuses = [f.get("check_status") for f in body["files"]]
        return f"request {body['id'][:8]} submitted from inside the sandbox; checks: {statuses}"

    def step_reviews(self) -> str:
        rid = self.state.request_id
        expect(rid is not None, "no request to review")
        states = []
        for checker in ("checker1", "checker2"):
            self.login(checker)
            with self.client() as c:
                view = c.get(f"{self.airlock}api/requests/{rid}", headers=self.auth(checker))
                expect(view.status_code == 200, f"{checker} cannot see the request: {view.text}")
                for f in view.json()["files"]:
                    self.state.reviewed_sha256[f["id"]] = f["sha256"]
                    expect(
                        f.get("check_status") != "fail",
                        f"the automated checks FAIL {f['path']}: {f.get('findings')}",
                    )
                    vote = c.post(
                        f"{self.airlock}api/requests/{rid}/files/{f['id']}/votes",
                        headers=self.auth(checker),
                        json={"decision": "approve", "comment": "checked: counts are safe"},
                    )
                    expect(vote.status_code == 201, f"{checker}'s vote: {vote.text[:300]}")
                    states.append(vote.json()["state"])
        expect(states[-1] == "released", f"after two approvals the request is {states[-1]}")
        return f"checker1 and checker2 approved independently: {' -> '.join(states)}"

    def step_download(self) -> str:
        rid = self.state.request_id
        assert self.ctx.settings.workspaces_dir is not None
        original = (self.ctx.settings.workspaces_dir / PROJECT / OUTPUT).read_bytes()
        with self.client() as c:
            for fid in self.state.file_ids:
                r = c.get(
                    f"{self.airlock}api/requests/{rid}/files/{fid}/download",
                    headers=self.auth("alice"),
                )
                expect(r.status_code == 200, f"download: {r.status_code} {r.text[:200]}")
                digest = hashlib.sha256(r.content).hexdigest()
                expect(digest == self.state.reviewed_sha256[fid], "released bytes != reviewed")
                expect(r.content == original, "released bytes differ from the workspace file")
        return f"alice downloaded the released file; sha256 {digest[:12]}… matches the review"

    def step_audit(self) -> str:
        self.login("admin")
        with self.client() as c:
            r = c.get(f"{self.airlock}api/audit/verify", headers=self.auth("admin"))
            expect(r.status_code == 200, f"audit verify: {r.status_code} {r.text[:200]}")
            expect(r.json()["ok"], f"the audit chain does not verify: {r.json()['problems']}")
            events = c.get(f"{self.airlock}api/audit", headers=self.auth("admin")).json()
        actions = {e["action"] for e in events}
        for needed in ("project.create", "state_change"):
            expect(needed in actions, f"no {needed!r} event in the audit log")
        return f"the hash chain verifies ({len(events)} events, provisioning included)"

    def step_transparency(self) -> str:
        with self.client() as c:
            page = c.get(f"{self.airlock}transparency")
            expect(page.status_code == 200, f"the public register answered {page.status_code}")
            data = c.get(f"{self.airlock}api/public/projects").json()
            admin_only = c.get(f"{self.airlock}api/admin/projects", headers=self.auth("alice"))
            expect(admin_only.status_code == 403, "a researcher could read the admin API")
            admin = c.get(f"{self.airlock}api/admin/projects", headers=self.auth("admin"))
            expect(admin.status_code == 200, f"admin API: {admin.status_code}")
            plan = c.get(f"{self.airlock}api/admin/plan", headers=self.auth("admin")).json()
            expect(plan["hub_warning"] is None, f"the airlock cannot see the hub: {plan}")
            expect(plan["plan"] == [], f"the system does not match the declarations: {plan}")
        wilms = next(p for p in data if p["id"] == PROJECT)
        expect(wilms["outputs_released"] >= 1, "the register does not count the release")
        expect(wilms["title"] in page.text, "the register page does not show the project")
        return (
            f"public register (no login): {PROJECT} has {wilms['outputs_released']} release(s); "
            "admin API: the plan is empty (declarations, extracts and hub groups agree)"
        )

    def step_stop_sandbox(self) -> str:
        with self.client() as c:
            r = c.delete(f"/hub/api/users/alice/servers/{PROJECT}", headers=self.auth("alice"))
            expect(r.status_code in (202, 204), f"stopping the sandbox: {r.status_code}")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            model = self.server_model("alice", PROJECT)
            if not model or not (model.get("ready") or model.get("pending")):
                return "alice's sandbox stopped"
            time.sleep(0.5)
        raise TourFailure("the sandbox did not stop within 60 s")

    # -- screenshots (headless Chromium) --------------------------------------------------------

    def shoot_before_review(self) -> str:
        from playwright.sync_api import sync_playwright

        out = self.screenshots
        assert out is not None
        out.mkdir(parents=True, exist_ok=True)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_FLAGS)
            try:
                page = self._browser_login(browser, "alice")
                page.goto(f"{self.base}/hub/home")
                page.screenshot(path=str(out / "demo-hub-home.png"))
                page.goto(f"{self.ctx.server_url('alice', PROJECT)}/lab/tree/{EXAMPLE_NOTEBOOK}")
                page.wait_for_selector(".jp-Notebook", timeout=60000)
                page.wait_for_timeout(2500)
                page.screenshot(path=str(out / "demo-jupyterlab-notebook.png"))
                page = self._browser_login(browser, "checker1")
                page.goto(f"{self.airlock}requests/{self.state.request_id}")
                page.wait_for_load_state("networkidle")
                page.screenshot(path=str(out / "demo-airlock-review.png"), full_page=True)
            finally:
                browser.close()
        return "hub home, JupyterLab with the example notebook, airlock review page"

    def shoot_after_release(self) -> str:
        from playwright.sync_api import sync_playwright

        out = self.screenshots
        assert out is not None
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_FLAGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(f"{self.airlock}transparency")
                page.screenshot(path=str(out / "demo-transparency.png"), full_page=True)
                page = self._browser_login(browser, "admin")
                page.goto(f"{self.airlock}admin")
                page.wait_for_load_state("networkidle")
                page.screenshot(path=str(out / "demo-admin-projects.png"), full_page=True)
                page.goto(f"{self.airlock}admin/stats")
                page.screenshot(path=str(out / "demo-admin-stats.png"), full_page=True)
            finally:
                browser.close()
        return "transparency register, admin projects and statistics"

    def _browser_login(self, browser: Any, user: str) -> Any:
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        page.goto(f"{self.base}/hub/login")
        if user == "alice" and self.screenshots is not None:
            page.screenshot(path=str(self.screenshots / "demo-hub-login.png"))
        page.fill("input[name=username]", user)
        page.fill("input[name=password]", self.ctx.passwords[user])
        page.click("input[type=submit], button[type=submit]")
        page.wait_for_url("**/hub/**", timeout=30000)
        return page


def run_tour(ctx: DemoContext, screenshots: Path | None = None) -> int:
    tour = Tour(ctx, screenshots)
    steps: list[tuple[str, Callable[[], str]]] = [
        ("log in (hub login form)", tour.step_login),
        ("start a sandbox (hub REST API)", tour.step_start_sandbox),
        ("query the extract in the sandbox kernel", tour.step_query),
        ("request a release from inside the sandbox", tour.step_request_release),
    ]
    if screenshots is not None:
        steps.append(("screenshots: hub, JupyterLab, review page", tour.shoot_before_review))
    steps += [
        ("two independent reviews", tour.step_reviews),
        ("download the released file", tour.step_download),
        ("verify the audit chain", tour.step_audit),
        ("public register and admin API", tour.step_transparency),
    ]
    if screenshots is not None:
        steps.append(("screenshots: register and admin pages", tour.shoot_after_release))
    steps.append(("stop the sandbox", tour.step_stop_sandbox))
    console = ctx.console
    console.rule("[bold]Tour")
    for i, (title, step) in enumerate(steps, 1):
        started = time.monotonic()
        try:
            detail = step()
        except Exception as exc:  # noqa: BLE001 (every failure is reported as the step's)
            console.print(f"[bold red]✗ {i}. {title}: FAILED[/]\n  {type(exc).__name__}: {exc}")
            console.print(f"[red]The tour stopped at step {i} of {len(steps)}.[/]")
            return 1
        console.print(f"[green]✓ {i}. {title}[/] ({time.monotonic() - started:.1f}s): {detail}")
    console.print(f"[bold green]Tour complete: all {len(steps)} steps worked.[/]")
    return 0

"""The airlock web application: JSON API (``<prefix>api/...``, OpenAPI at ``<prefix>openapi.json``)
and server-rendered pages (Jinja2 + htmx, vendored; no CDN, no build step).

The API authenticates with ``Authorization: token <hub token>`` only (no cookies, so no CSRF);
pages authenticate with the hub OAuth login stored in a signed session cookie, and every page
form carries a CSRF token that is checked on POST.
"""

import functools
import ipaddress
import logging
import os
import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated, Any, BinaryIO, Literal
from urllib.parse import quote

import anyio.to_thread
from anyio import CapacityLimiter
from fastapi import APIRouter, Depends, FastAPI, Form, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, ConfigDict, Field
from starlette.middleware.sessions import SessionMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from airlock import permissions as perm
from airlock.checks.findings import describe_places
from airlock.release import ReleaseError
from airlock.retention import RetentionPolicyError
from airlock.service import admin, preview
from airlock.service.auth import HubIdentityProvider, Identity, IdentityProvider, TokenRefused
from airlock.service.core import (
    AirlockService,
    BadInput,
    Conflict,
    FileSpec,
    Gone,
    NotFound,
)
from airlock.storage import StorageError
from airlock.workflow import TransitionError
from tre.audit import verify_chain

log = logging.getLogger("airlock.web")
HERE = Path(__file__).resolve().parent
MAX_BODY_BYTES = 1024 * 1024
QUEUE_PAGE_ROWS = 50  # requests listed per queue section on the page (most recent first)

PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:;"
    " frame-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none';"
    " object-src 'none'"
)
# what a rendered notebook or a raw snapshot may do: nothing (no scripts, no requests)
INERT_CSP = "sandbox; default-src 'none'; img-src data:; style-src 'unsafe-inline'"
# for answers that are no page (JSON, redirects, errors): render nothing, run nothing
NO_PAGE_CSP = "default-src 'none'; sandbox; frame-ancestors 'none'"


# --- request bodies -----------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FileIn(_Body):
    path: str = Field(min_length=1, max_length=512, description="Relative to the workspace.")
    group: str = Field(default="default", min_length=1, max_length=64)


class CreateRequestIn(_Body):
    project: str = Field(min_length=1, max_length=64)
    title: str = Field(default="", max_length=200)
    context: str = Field(default="", max_length=20000)
    controls: str = Field(default="", max_length=20000)
    files: list[FileIn] = Field(default_factory=list, max_length=100)
    submit: bool = False


class EditRequestIn(_Body):
    context: str | None = Field(default=None, max_length=20000)
    controls: str | None = Field(default=None, max_length=20000)


class VoteIn(_Body):
    decision: Literal["approve", "reject", "request_changes"]
    comment: str = Field(default="", max_length=10000)
    justification: str = Field(default="", max_length=10000)


class CommentIn(_Body):
    body: str = Field(min_length=1, max_length=10000)
    visibility: Literal["public", "private"] = "public"


class DecisionIn(_Body):
    action: Literal["return", "reject"]
    comment: str = Field(min_length=1, max_length=10000)


# --- plumbing -----------------------------------------------------------------------------


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes (declared or streamed) with 413."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            if declared.isdigit() and int(declared) <= 16 * self.limit:
                await _drain(receive, 16 * self.limit)  # so the client reads our 413, not a reset
            await _too_large(send, self.limit)
            return
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        # read the (small) body first, so an oversized stream is refused before the app runs
        chunks, seen, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # client went away
            chunk = message.get("body", b"")
            seen += len(chunk)
            more = message.get("more_body", False)
            if seen > self.limit:
                # drain (bounded) what the client is still sending, so that it reads our 413
                # instead of a connection reset; then refuse without running the app
                if more:
                    await _drain(receive, 16 * self.limit - seen)
                await _too_large(send, self.limit)
                return
            chunks.append(chunk)
        body = b"".join(chunks)
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _drain(receive: Receive, budget: int) -> None:
    """Read and drop up to ``budget`` bytes the client is still sending."""
    seen, more = 0, True
    while more and seen < budget:
        message = await receive()
        if message["type"] != "http.request":
            return
        seen += len(message.get("body", b""))
        more = message.get("more_body", False)


async def _too_large(send: Send, limit: int) -> None:
    body = f'{{"detail":"request body larger than {limit} bytes"}}'.encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


class SecurityHeaders:
    """Headers every answer gets unless its endpoint set its own: no MIME sniffing, no framing
    by another site (``frame-ancestors 'none'`` added to a CSP that does not say), and
    ``Cache-Control: no-store``: pages, snapshots and downloads are one user's and must stay
    in no cache, shared or the browser's (static files excepted)."""

    def __init__(self, app: ASGIApp, static_prefix: str) -> None:
        self.app, self.static_prefix = app, static_prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = scope["path"].startswith(self.static_prefix)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                names = {k.lower() for k, _ in headers}
                if b"x-content-type-options" not in names:
                    headers.append((b"x-content-type-options", b"nosniff"))
                if b"referrer-policy" not in names:
                    headers.append((b"referrer-policy", b"same-origin"))
                if b"cache-control" not in names and not static:
                    headers.append((b"cache-control", b"no-store"))
                if b"content-security-policy" not in names:
                    headers.append((b"content-security-policy", NO_PAGE_CSP.encode()))
                else:
                    headers = [
                        (k, v + b"; frame-ancestors 'none'")
                        if k.lower() == b"content-security-policy" and b"frame-ancestors" not in v
                        else (k, v)
                        for k, v in headers
                    ]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class OneSessionCookie:
    """Refuse a session cookie that comes twice, and expire the copies set for parent domains.

    The airlock sets its session cookie on its own host only (no ``Domain``). On http the name
    cannot be ``__Host-``, so a page on a sibling host (a researcher's server,
    ``alice.tre.localhost``) can set a cookie of the same name for the parent domain
    (``Domain=tre.localhost``): cookie tossing. The browser then sends both, the session layer
    would take one of them, and a checker's next page or vote would run in the researcher's
    session (or fail). The airlock cannot tell which copy is its own, so a request that carries
    the name twice carries neither (not logged in: pages go to the hub login, POSTs fail their
    CSRF check), and the answer expires the name for every parent domain on every path that
    could have sent it; the copy the airlock set itself is left to the session layer."""

    def __init__(self, app: ASGIApp, cookie_name: str) -> None:
        self.app, self.name = app, cookie_name

    def _count(self, headers: list[tuple[bytes, bytes]]) -> int:
        return sum(
            1
            for key, value in headers
            if key.lower() == b"cookie"
            for chunk in value.decode("latin-1").split(";")
            if chunk.partition("=")[0].strip() == self.name
        )

    def _without_name(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        kept = []
        for key, value in headers:
            if key.lower() == b"cookie":
                chunks = [
                    c
                    for c in value.decode("latin-1").split(";")
                    if c.partition("=")[0].strip() != self.name
                ]
                value = ";".join(chunks).strip().encode("latin-1")
            kept.append((key, value))
        return kept

    def _expiries(self, scope: Scope) -> list[tuple[bytes, bytes]]:
        host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1").lower()
        host = host if host.endswith("]") else host.rpartition(":")[0] or host
        labels = host.split(".")
        if _is_ip(host.strip("[]")):
            labels = []  # no parent domains (and cookies with Domain= are refused anyway)
        parents = [".".join(labels[i:]) for i in range(1, len(labels) - 1)]  # no bare TLD
        path = scope.get("path") or "/"
        paths = {"/", path}
        for i, ch in enumerate(path):
            if ch == "/" and i:
                paths.update({path[:i], path[: i + 1]})
        return [
            (
                b"set-cookie",
                f"{self.name}=; Domain={domain}; Path={p}; Max-Age=0; "
                "Expires=Thu, 01 Jan 1970 00:00:00 GMT".encode("latin-1"),
            )
            for domain in parents
            for p in sorted(paths)
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = list(scope.get("headers") or [])
        if scope["type"] != "http" or self._count(headers) < 2:
            await self.app(scope, receive, send)
            return
        log.warning("request with %s twice (cookie tossing?): neither used", self.name)
        expiries = self._expiries(scope)

        async def send_expiring(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*(message.get("headers") or []), *expiries]}
            await send(message)

        await self.app({**scope, "headers": self._without_name(headers)}, receive, send_expiring)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class LoginRequired(Exception):  # noqa: N818
    def __init__(self, next_url: str) -> None:
        self.next_url = next_url


class CsrfFailed(Exception):  # noqa: N818
    pass


ERRORS: list[tuple[type[Exception], int]] = [
    (NotFound, 404),
    (Gone, 410),
    (perm.PermissionDenied, 403),
    (TokenRefused, 403),
    (TransitionError, 409),
    (Conflict, 409),
    (BadInput, 400),
    (StorageError, 400),
    (ReleaseError, 409),
    (CsrfFailed, 403),
    # the retention policy cannot be read: released contents are not served until it can be
    # (they may be past their period), and the answer names the file and the field
    (RetentionPolicyError, 503),
]


def create_app(
    service: AirlockService,
    identity: IdentityProvider,
    *,
    prefix: str = "/services/airlock/",
    session_secret: str | None = None,
    https_only: bool = False,
    max_body_bytes: int = MAX_BODY_BYTES,
    snapshot_threads: int = 8,
) -> FastAPI:
    """The ASGI application; ``identity`` validates hub tokens (``HubIdentityProvider``)."""
    if not prefix.startswith("/") or not prefix.endswith("/"):
        raise ValueError("prefix must start and end with '/'")
    app = FastAPI(
        title="Airlock",
        version="1",
        description="Release requests, independent output checking and release of outputs.",
        openapi_url=f"{prefix}openapi.json",
        docs_url=None,  # Swagger UI loads from a CDN: nothing here fetches from the internet
        redoc_url=None,
    )
    app.state.service = service
    app.state.identity = identity
    app.state.prefix = prefix
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.globals["prefix"] = prefix
    templates.env.filters["places"] = describe_places
    app.mount(f"{prefix}static", StaticFiles(directory=HERE / "static"), name="static")
    # on https, a __Host- cookie (path / on the airlock's own host): a sibling host under the
    # same domain (a researcher's server) cannot overwrite it; on http, OneSessionCookie
    session_cookie = "__Host-airlock-session" if https_only else "airlock-session"
    app.add_middleware(
        SessionMiddleware,
        secret_key=session_secret or secrets.token_hex(32),
        session_cookie=session_cookie,
        path="/" if https_only else prefix,
        same_site="lax",
        https_only=https_only,
        max_age=8 * 3600,
    )
    app.add_middleware(OneSessionCookie, cookie_name=session_cookie)  # runs before the session
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    app.add_middleware(SecurityHeaders, static_prefix=f"{prefix}static/")

    for exc_type, status in ERRORS:

        def _handler(_req: Request, exc: Exception, status: int = status) -> JSONResponse:
            return JSONResponse({"detail": str(exc) or exc.__class__.__name__}, status_code=status)

        app.add_exception_handler(exc_type, _handler)

    @app.exception_handler(LoginRequired)
    async def _login(_req: Request, exc: LoginRequired) -> RedirectResponse:
        from urllib.parse import quote

        return RedirectResponse(f"{prefix}login?next={quote(exc.next_url)}", status_code=303)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(e.get("loc", [])), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        return JSONResponse({"detail": errors}, status_code=422)

    # --- identities -----------------------------------------------------------------------

    async def _who_for_token(token: str) -> perm.Who | None:
        ident: Identity | None = await identity.identify(token)
        if ident is None:
            return None
        return service.who(ident.name, ident.sandbox_project)

    async def api_user(request: Request) -> perm.Who:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() not in ("token", "bearer") or not token.strip():
            raise _Unauthorized("send 'Authorization: token <JupyterHub token>'")
        who = await _who_for_token(token.strip())
        if who is None:
            raise _Unauthorized("the hub does not know this token")
        return who

    async def page_user(request: Request) -> perm.Who:
        token = request.session.get("token")
        who = await _who_for_token(token) if token else None
        if who is None:
            request.session.pop("token", None)
            raise LoginRequired(str(request.url.path))
        if who.in_sandbox:  # a sandbox never gets a browser session
            raise perm.PermissionDenied("sandbox tokens cannot use the web pages")
        return who

    @app.exception_handler(_Unauthorized)
    async def _unauth(_req: Request, exc: _Unauthorized) -> JSONResponse:
        return JSONResponse(
            {"detail": str(exc)}, status_code=401, headers={"WWW-Authenticate": "token"}
        )

    ApiUser = Annotated[perm.Who, Depends(api_user)]
    PageUser = Annotated[perm.Who, Depends(page_user)]

    def csrf_token(request: Request) -> str:
        token = request.session.get("csrf")
        if not token:
            token = request.session["csrf"] = secrets.token_urlsafe(32)
        return token

    async def check_csrf(request: Request) -> None:
        expected = request.session.get("csrf")
        sent = request.headers.get("x-csrf-token")
        if sent is None:
            form = await request.form()
            sent = form.get("csrf_token")  # type: ignore[assignment]
        if not expected or not isinstance(sent, str) or not secrets.compare_digest(sent, expected):
            raise CsrfFailed("missing or wrong CSRF token: reload the page and try again")

    Csrf = Depends(check_csrf)

    # Endpoints that snapshot files wait for the disclosure checks (a check process, see
    # runner.py): they run in threads of their own, so that a burst of submissions cannot take
    # every thread that page views and votes need (the default pool is small on purpose).
    snapshot_limiter: list[CapacityLimiter] = []

    async def in_snapshot_thread(fn: Callable[..., Any], *args: Any) -> Any:
        if not snapshot_limiter:  # created in the event loop, on first use
            snapshot_limiter.append(CapacityLimiter(snapshot_threads))
        return await anyio.to_thread.run_sync(
            functools.partial(fn, *args), limiter=snapshot_limiter[0]
        )

    # --- JSON API -------------------------------------------------------------------------

    api = APIRouter(prefix=f"{prefix}api", tags=["api"])

    @api.get("/health")
    def health() -> dict[str, Any]:
        return {"ok": True}

    @api.get("/me")
    def me(who: ApiUser) -> dict[str, Any]:
        return {
            "name": who.name,
            "projects": sorted(who.projects),
            "checker": who.is_checker,
            "admin": who.is_admin,
            "sandbox_project": who.sandbox_project,
        }

    @api.get("/requests")
    def list_requests(who: ApiUser) -> list[dict[str, Any]]:
        return service.list_requests(who)

    def _create_request(body: CreateRequestIn, who: perm.Who) -> dict[str, Any]:
        rid = service.create_request(
            who,
            body.project,
            [FileSpec(f.path, f.group) for f in body.files],
            title=body.title,
            context=body.context,
            controls=body.controls,
        )
        if body.submit:
            service.submit(who, rid)
        return service.view(who, rid)

    @api.post("/requests", status_code=201)
    async def create_request(body: CreateRequestIn, who: ApiUser) -> dict[str, Any]:
        return await in_snapshot_thread(_create_request, body, who)

    @api.get("/requests/{request_id}")
    def get_request(request_id: str, who: ApiUser) -> dict[str, Any]:
        return service.view(who, request_id)

    @api.patch("/requests/{request_id}")
    def edit_request(request_id: str, body: EditRequestIn, who: ApiUser) -> dict[str, Any]:
        service.update_context(who, request_id, body.context, body.controls)
        return service.view(who, request_id)

    def _add_file(request_id: str, body: FileIn, who: perm.Who) -> dict[str, Any]:
        fid = service.add_file(who, request_id, FileSpec(body.path, body.group))
        return {"file_id": fid, "request": service.view(who, request_id)}

    @api.post("/requests/{request_id}/files", status_code=201)
    async def add_file(request_id: str, body: FileIn, who: ApiUser) -> dict[str, Any]:
        return await in_snapshot_thread(_add_file, request_id, body, who)

    @api.post("/requests/{request_id}/files/{file_id}/withdraw")
    def withdraw_file(request_id: str, file_id: int, who: ApiUser) -> dict[str, Any]:
        service.withdraw_file(who, request_id, file_id)
        return service.view(who, request_id)

    @api.post("/requests/{request_id}/submit")
    def submit(request_id: str, who: ApiUser) -> dict[str, Any]:
        return {"state": service.submit(who, request_id)}

    @api.post("/requests/{request_id}/withdraw")
    def withdraw(request_id: str, who: ApiUser) -> dict[str, Any]:
        return {"state": service.withdraw(who, request_id)}

    @api.post("/requests/{request_id}/files/{file_id}/votes", status_code=201)
    def vote(request_id: str, file_id: int, body: VoteIn, who: ApiUser) -> dict[str, Any]:
        state = service.vote(
            who, request_id, file_id, body.decision, body.comment, body.justification
        )
        return {"state": state}

    @api.put("/requests/{request_id}/files/{file_id}/votes/mine")
    def change_vote(request_id: str, file_id: int, body: VoteIn, who: ApiUser) -> dict[str, Any]:
        """Change my vote on a file while it waits for its second review (409 after that)."""
        state = service.change_vote(
            who, request_id, file_id, body.decision, body.comment, body.justification
        )
        return {"state": state}

    @api.post("/requests/{request_id}/comments", status_code=201)
    def comment(request_id: str, body: CommentIn, who: ApiUser) -> dict[str, Any]:
        return {"comment_id": service.comment(who, request_id, body.body, body.visibility)}

    @api.post("/requests/{request_id}/decision")
    def decision(request_id: str, body: DecisionIn, who: ApiUser) -> dict[str, Any]:
        return {"state": service.decide(who, request_id, body.action, body.comment)}

    @api.post("/requests/{request_id}/release")
    def release(request_id: str, who: ApiUser) -> dict[str, Any]:
        return {"state": service.release(who, request_id)}

    @api.get(
        "/requests/{request_id}/files/{file_id}/download",
        response_class=StreamingResponse,
        responses={200: {"content": {"application/octet-stream": {}}}},
    )
    def download(request_id: str, file_id: int, who: ApiUser) -> StreamingResponse:
        fh, name = service.open_download(who, request_id, file_id)
        return _attachment(fh, name)

    @api.get("/queue")
    def queue(who: ApiUser) -> dict[str, Any]:
        perm._deny(who.is_checker and not who.in_sandbox, "only output checkers have a queue")
        return service.queue(who)

    @api.get("/audit")
    def audit(who: ApiUser) -> list[dict[str, Any]]:
        return service.audit_events(who)

    @api.get("/audit/verify")
    def audit_verify(who: ApiUser) -> dict[str, Any]:
        perm.check_view_audit(who)
        with service.factory() as session:
            problems = verify_chain(session)
        return {"ok": not problems, "problems": [str(p) for p in problems]}

    app.include_router(api)

    # --- login ----------------------------------------------------------------------------

    @app.get(f"{prefix}login", include_in_schema=False)
    def login(request: Request, next: str = "") -> RedirectResponse:  # noqa: A002
        if not isinstance(identity, HubIdentityProvider):
            raise NotFound("no hub login configured")
        state = secrets.token_urlsafe(24)
        verifier, challenge = identity.pkce()
        safe_next = next if next.startswith(prefix) and "//" not in next else prefix
        request.session["oauth"] = {"state": state, "verifier": verifier, "next": safe_next}
        return RedirectResponse(identity.authorize_url(state, challenge), status_code=302)

    @app.get(f"{prefix}oauth_callback", include_in_schema=False)
    async def oauth_callback(request: Request, code: str = "", state: str = "") -> Response:
        pending = request.session.pop("oauth", None)
        if not pending or not code or not secrets.compare_digest(state, pending.get("state", "")):
            return JSONResponse({"detail": "OAuth state mismatch: log in again"}, status_code=403)
        assert isinstance(identity, HubIdentityProvider)
        token = await identity.token_for_code(code, pending["verifier"])
        request.session["token"] = token
        request.session["csrf"] = secrets.token_urlsafe(32)
        return RedirectResponse(pending["next"], status_code=302)

    @app.post(f"{prefix}logout", include_in_schema=False, dependencies=[Csrf])
    def logout(request: Request) -> RedirectResponse:
        request.session.clear()
        return RedirectResponse(f"{identity_logout_url(identity)}", status_code=303)

    # --- pages ----------------------------------------------------------------------------

    def render(request: Request, name: str, who: perm.Who, **ctx: Any) -> HTMLResponse:
        response = templates.TemplateResponse(
            request, name, {"who": who, "csrf": csrf_token(request), **ctx}
        )
        response.headers["Content-Security-Policy"] = PAGE_CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "same-origin"
        return response

    def back_to(request_id: str) -> RedirectResponse:
        return RedirectResponse(f"{prefix}requests/{request_id}", status_code=303)

    @app.get(prefix, include_in_schema=False)
    def home(who: PageUser) -> RedirectResponse:
        target = "queue" if who.is_checker and not who.projects else "requests"
        return RedirectResponse(f"{prefix}{target}", status_code=303)

    @app.get(f"{prefix}requests", include_in_schema=False)
    def my_requests(request: Request, who: PageUser) -> HTMLResponse:
        mine = who.projects | who.ended_projects  # ended: to download during the grace period
        rows = [r for r in service.list_requests(who) if r["project"] in mine]
        return render(request, "requests.html", who, requests=rows)

    @app.post(f"{prefix}requests", include_in_schema=False, dependencies=[Csrf])
    async def create_from_form(
        who: PageUser,
        project: Annotated[str, Form(max_length=64)],
        paths: Annotated[str, Form(max_length=20000)],
        group: Annotated[str, Form(max_length=64)] = "default",
        title: Annotated[str, Form(max_length=200)] = "",
        context: Annotated[str, Form(max_length=20000)] = "",
        controls: Annotated[str, Form(max_length=20000)] = "",
        submit: Annotated[str, Form(max_length=8)] = "",
    ) -> RedirectResponse:
        files = [FileSpec(p.strip(), group) for p in paths.splitlines() if p.strip()]

        def create() -> str:
            rid = service.create_request(
                who, project, files, title=title, context=context, controls=controls
            )
            if submit:
                service.submit(who, rid)
            return rid

        return back_to(await in_snapshot_thread(create))

    @app.get(f"{prefix}queue", include_in_schema=False)
    def queue_page(request: Request, who: PageUser) -> HTMLResponse:
        perm._deny(who.is_checker, "only output checkers have a queue")
        # the page lists the latest of each list and counts all (every request: api/queue)
        queue, totals = service.queue_with_totals(who, limit=QUEUE_PAGE_ROWS)
        return render(request, "queue.html", who, queue=queue, totals=totals)

    @app.get(f"{prefix}requests/{{request_id}}", include_in_schema=False)
    def request_page(request: Request, request_id: str, who: PageUser) -> HTMLResponse:
        view = service.view(who, request_id)
        for f in view["files"]:
            f["preview_kind"] = preview.kind_for(f["name"])
        return render(request, "request.html", who, r=view)

    @app.get(f"{prefix}requests/{{request_id}}/files/{{file_id}}/preview", include_in_schema=False)
    def file_preview(
        request: Request, request_id: str, file_id: int, who: PageUser
    ) -> HTMLResponse:
        fh, f = service.open_snapshot(who, request_id, file_id)
        with fh:
            kind = preview.kind_for(f.name)
            table = preview.table_preview(fh, f.name, f.findings) if kind == "table" else None
            text = preview.text_preview(fh) if kind == "text" else None
        return render(
            request,
            "preview.html",
            who,
            f=f,
            kind=kind,
            table=table,
            text=text,
            request_id=request_id,
        )

    @app.get(f"{prefix}requests/{{request_id}}/files/{{file_id}}/raw", include_in_schema=False)
    def file_raw(request_id: str, file_id: int, who: PageUser) -> Response:
        fh, f = service.open_snapshot(who, request_id, file_id)
        media = preview.image_media_type(f.name)
        if media is None:
            return _attachment(fh, f.name)
        response = OpenFileResponse(fh, media_type=media)
        response.headers["Content-Security-Policy"] = INERT_CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    @app.get(f"{prefix}requests/{{request_id}}/files/{{file_id}}/notebook", include_in_schema=False)
    def file_notebook(request_id: str, file_id: int, who: PageUser) -> HTMLResponse:
        fh, f = service.open_snapshot(who, request_id, file_id)
        with fh:
            html = preview.notebook_html(fh)
        return HTMLResponse(
            html,
            headers={
                "Content-Security-Policy": INERT_CSP + "; frame-ancestors 'self'",
                "X-Content-Type-Options": "nosniff",
            },
        )

    @app.post(
        f"{prefix}requests/{{request_id}}/files/{{file_id}}/vote",
        include_in_schema=False,
        dependencies=[Csrf],
    )
    def vote_form(
        request_id: str,
        file_id: int,
        who: PageUser,
        decision: Annotated[str, Form(max_length=32)],
        comment: Annotated[str, Form(max_length=10000)] = "",
        justification: Annotated[str, Form(max_length=10000)] = "",
    ) -> RedirectResponse:
        service.vote(who, request_id, file_id, decision, comment, justification)
        return back_to(request_id)

    @app.post(
        f"{prefix}requests/{{request_id}}/files/{{file_id}}/vote/change",
        include_in_schema=False,
        dependencies=[Csrf],
    )
    def change_vote_form(
        request_id: str,
        file_id: int,
        who: PageUser,
        decision: Annotated[str, Form(max_length=32)],
        comment: Annotated[str, Form(max_length=10000)] = "",
        justification: Annotated[str, Form(max_length=10000)] = "",
    ) -> RedirectResponse:
        service.change_vote(who, request_id, file_id, decision, comment, justification)
        return back_to(request_id)

    @app.post(
        f"{prefix}requests/{{request_id}}/{{action}}",
        include_in_schema=False,
        dependencies=[Csrf],
    )
    def request_action(
        request_id: str,
        action: str,
        who: PageUser,
        comment: Annotated[str, Form(max_length=10000)] = "",
        visibility: Annotated[str, Form(max_length=16)] = "public",
        file_id: Annotated[int | None, Form()] = None,
        path: Annotated[str, Form(max_length=512)] = "",
        group: Annotated[str, Form(max_length=64)] = "default",
    ) -> RedirectResponse:
        if action == "submit":
            service.submit(who, request_id)
        elif action == "withdraw":
            service.withdraw(who, request_id)
        elif action in ("return", "reject"):
            service.decide(who, request_id, action, comment)
        elif action == "comment":
            service.comment(who, request_id, comment, visibility)
        elif action == "release":
            service.release(who, request_id)
        elif action == "withdraw-file" and file_id is not None:
            service.withdraw_file(who, request_id, file_id)
        elif action == "add-file":
            service.add_file(who, request_id, FileSpec(path, group))
        else:
            raise NotFound("no such action")
        return back_to(request_id)

    @app.get(f"{prefix}requests/{{request_id}}/files/{{file_id}}/download", include_in_schema=False)
    def download_page(request_id: str, file_id: int, who: PageUser) -> StreamingResponse:
        fh, name = service.open_download(who, request_id, file_id)
        return _attachment(fh, name)

    @app.get(f"{prefix}audit", include_in_schema=False)
    def audit_page(request: Request, who: PageUser) -> HTMLResponse:
        events = service.audit_events(who, limit=500)
        with service.factory() as session:
            problems = [str(p) for p in verify_chain(session)]
        return render(request, "audit.html", who, events=events, problems=problems)

    app.include_router(admin.make_router(service, prefix, api_user, page_user, render))
    return app


class _Unauthorized(Exception):  # noqa: N818
    pass


def identity_logout_url(identity: IdentityProvider) -> str:
    if isinstance(identity, HubIdentityProvider):
        return identity.config.hub_host + identity.config.hub_prefix + "logout"
    return "/"


class OpenFileResponse(StreamingResponse):
    """The bytes of a file the service already opened (and, for a download, verified), sent
    from that open file: ``airlock gc`` may move or delete the path meanwhile, and a response
    that opened the path again (Starlette's FileResponse) then failed with a 500 halfway or
    could send other bytes than the ones verified. No ranges: every answer is the whole file."""

    chunk_size = 256 * 1024

    def __init__(
        self, fh: BinaryIO, media_type: str, headers: dict[str, str] | None = None
    ) -> None:
        size = os.fstat(fh.fileno()).st_size

        async def chunks() -> AsyncIterator[bytes]:
            try:
                while chunk := await anyio.to_thread.run_sync(fh.read, self.chunk_size):
                    yield chunk
            finally:
                fh.close()

        super().__init__(
            chunks(),
            media_type=media_type,
            headers={**(headers or {}), "content-length": str(size)},
        )


def _attachment(fh: BinaryIO, name: str) -> OpenFileResponse:
    # the name the sandbox chose: plain ASCII as is, anything else percent-encoded, so it can
    # neither end the header nor add one (tests/airlock_service/test_download_names.py)
    quoted = quote(name)
    disposition = (
        f'attachment; filename="{name}"'
        if quoted == name
        else f"attachment; filename*=utf-8''{quoted}"
    )
    response = OpenFileResponse(
        fh, "application/octet-stream", headers={"content-disposition": disposition}
    )
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Content-Security-Policy"] = INERT_CSP
    return response

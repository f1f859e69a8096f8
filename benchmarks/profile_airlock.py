"""Where the airlock's CPU per request goes: cProfile of the service layer (no HTTP) on
PostgreSQL with the production registry (``LiveRegistry``), after the load benchmark's setup
(about 200 requests in review). Not a benchmark (see ``bench_airlock``); a tool for finding
hot spots.

Run: ``uv run python -m benchmarks.profile_airlock [view|queue|vote|submit|page|all]``; prints
the mean wall ms per operation and the top functions by cumulative time. ``page`` profiles the
request page through the whole ASGI application (middleware, session cookie, FastAPI, Jinja2),
in process, with a stand-in identity provider (the hub's token check is cached in production).
"""

from __future__ import annotations

import cProfile
import os
import pstats
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import text

from airlock.service.auth import Identity
from airlock.service.core import AirlockService, FileSpec
from airlock.service.db import make_engine, upgrade
from benchmarks.bench_airlock import PG, _analyze, _prepare
from tre.provision import LiveRegistry
from tre.settings import Settings


def _profile(name: str, fn: Callable[[int], object], n: int) -> None:
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for i in range(n):
        fn(i)
    prof.disable()
    print(f"\n=== {name}: {(time.perf_counter() - t0) / n * 1000:.1f} ms per call (n={n})")
    pstats.Stats(prof).sort_stats("cumulative").print_stats(28)


class _NamedTokens:
    """Identity provider for the in-process page profile: the token is the user name."""

    async def identify(self, token: str) -> Identity | None:
        return Identity(name=token)


def _profile_page(svc: AirlockService, ids: list[str]) -> None:
    import base64
    import json

    from itsdangerous import TimestampSigner
    from starlette.testclient import TestClient

    from airlock.service.app import create_app

    secret = "profile"
    app = create_app(svc, _NamedTokens(), session_secret=secret)  # type: ignore[arg-type]
    session = {"token": "checker3", "csrf": "x"}  # what the OAuth callback stores
    cookie = TimestampSigner(secret).sign(base64.b64encode(json.dumps(session).encode()))
    with TestClient(app, base_url="http://airlock.test") as http:
        http.cookies.set("airlock-session", cookie.decode())

        def page(i: int) -> None:
            r = http.get(f"/services/airlock/requests/{ids[i % len(ids)]}")
            assert r.status_code == 200, r.status_code

        page(0)
        _profile("request page over ASGI", page, 100)


def main(argv: list[str]) -> None:
    which = set(argv) or {"all"}
    root = Path(tempfile.mkdtemp(prefix="profile-airlock-"))
    schema = f"profile_airlock_{uuid.uuid4().hex[:8]}"
    admin = make_engine(PG)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    engine = make_engine(PG, schema=schema)
    try:
        policies = _prepare(root)
        settings = Settings(state_dir=root / "state", policies_dir=policies, airlock_db_url=PG)
        upgrade(engine)
        svc = AirlockService(settings, engine, LiveRegistry(policies))
        alice = svc.who("alice")
        checkers = [svc.who(c) for c in ("checker1", "checker2", "checker3")]
        ids = []
        for i in range(int(os.environ.get("PROFILE_REQUESTS", "200"))):
            rid = svc.create_request(
                alice, "wilms-outcomes", [FileSpec(f"outputs/table{i % 20}.csv")]
            )
            svc.submit(alice, rid)
            ids.append(rid)
        fids = {rid: svc.view(alice, rid)["files"][0]["id"] for rid in ids}
        _analyze(schema)  # planner statistics, as a running service has them
        if which & {"all", "view"}:
            _profile("view", lambda i: svc.view(checkers[2], ids[i % len(ids)]), 100)
        if which & {"all", "queue"}:
            _profile("queue", lambda i: svc.queue(checkers[2]), 20)
        if which & {"all", "vote"}:
            # each request gets its first and then its approving (releasing) vote
            def vote(i: int) -> None:
                rid = ids[i // 2]
                svc.vote(checkers[i % 2], rid, fids[rid], "approve")

            _profile("vote (first, approving+release alternate)", vote, 60)
        if which & {"all", "submit"}:

            def submit(i: int) -> None:
                rid = svc.create_request(
                    alice, "wilms-outcomes", [FileSpec(f"outputs/table{i % 20}.csv")]
                )
                svc.submit(alice, rid)

            _profile("create + submit", submit, 20)
        if which & {"all", "page"}:
            _profile_page(svc, ids)
    finally:
        engine.dispose()
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])

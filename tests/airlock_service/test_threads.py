"""Submissions waiting for their disclosure checks run in threads of their own: with every one
of them blocked, page views and votes (the default thread pool) still answer."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Executor, Future

import anyio.to_thread
import httpx

from airlock.service.app import create_app
from airlock.service.auth import Identity


class Tokens:
    async def identify(self, token: str) -> Identity:
        return Identity(name=token)


class GatedChecks(Executor):
    """Runs the checks only once ``gate`` is set (a check process that is busy elsewhere)."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.waiting = 0

    def submit(self, fn, /, *args, **kwargs) -> Future:  # noqa: ANN001
        future: Future = Future()
        self.waiting += 1

        def run() -> None:
            self.gate.wait(30)
            future.set_result(fn(*args, **kwargs))

        threading.Thread(target=run, daemon=True).start()
        return future


def test_blocked_submissions_do_not_starve_other_requests(service):
    checks = GatedChecks()
    service.check_pool = checks
    web = create_app(service, Tokens(), session_secret="k" * 32, snapshot_threads=2)
    body = {"project": "wilms-outcomes", "files": [{"path": "outputs/table.csv"}], "submit": True}
    alice = {"Authorization": "token alice"}

    async def scenario() -> None:
        anyio.to_thread.current_default_thread_limiter().total_tokens = 2
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=web), base_url="http://airlock", timeout=30
        ) as http:
            submits = [
                asyncio.create_task(
                    http.post("/services/airlock/api/requests", json=body, headers=alice)
                )
                for _ in range(4)
            ]
            while checks.waiting < 2:  # both snapshot threads are now blocked in the checks
                await asyncio.sleep(0.05)
            # page views and votes use the default pool: it is free
            for _ in range(3):
                me = await asyncio.wait_for(
                    http.get("/services/airlock/api/me", headers=alice), timeout=5
                )
                assert me.status_code == 200
                listed = await asyncio.wait_for(
                    http.get("/services/airlock/api/requests", headers=alice), timeout=5
                )
                assert listed.status_code == 200 and listed.json() == []
            assert not any(t.done() for t in submits) and checks.waiting == 2
            checks.gate.set()
            done = await asyncio.gather(*submits)
            assert [r.status_code for r in done] == [201] * 4
            assert checks.waiting == 4

    asyncio.run(scenario())
    with service.factory() as s:
        from airlock.service.models import RequestFile

        assert s.query(RequestFile).count() == 4


def _cannot_start() -> None:
    raise RuntimeError("this check process cannot start")


def test_broken_check_processes_fall_back_to_checking_in_the_thread(service):
    """A check process that cannot start (e.g. a launcher whose main re-runs under spawn) must
    not make submissions fail: the checks then run in the request's thread."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from airlock.service.core import FileSpec

    pool = ProcessPoolExecutor(
        1, mp_context=multiprocessing.get_context("spawn"), initializer=_cannot_start
    )
    service.check_pool = pool
    try:
        alice = service.who("alice")
        rid = service.create_request(alice, "wilms-outcomes", [FileSpec("outputs/small.csv")])
        files = service.view(alice, rid)["files"]
        # the real checks ran: the small count fails the policy
        assert files[0]["check_status"] == "fail" and files[0]["findings"]
    finally:
        pool.shutdown(wait=True)

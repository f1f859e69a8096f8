"""Build the service from settings and run it: one or two uvicorn servers (TCP for the proxy and
browsers; optionally a unix socket for sandboxes, which have no network) in ``workers``
processes that share the listening sockets.

One Python process runs Python code on one core at a time (the GIL), and the endpoints are
CPU-bound (ORM, templates, hashing), so on 2 cores two worker processes nearly double what the
service can answer. The parent binds the sockets, migrates the database and finishes interrupted
releases ONCE, then forks the workers and restarts any that dies; SIGTERM/SIGINT stop them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Executor
from pathlib import Path

import anyio.to_thread
import uvicorn
from fastapi import FastAPI

from airlock.service.app import create_app
from airlock.service.auth import HubConfig, HubIdentityProvider
from airlock.service.checkpool import check_pool
from airlock.service.core import AirlockService
from airlock.service.db import make_engine, upgrade
from airlock.storage import remove_stale_check_dirs
from tre.provision import LiveRegistry
from tre.registry import load_registry
from tre.settings import Settings

log = logging.getLogger("airlock")


def session_secret(settings: Settings) -> str:
    """From $AIRLOCK_SESSION_SECRET, else a 0600 file under state_dir (stable across restarts)."""
    if os.environ.get("AIRLOCK_SESSION_SECRET"):
        return os.environ["AIRLOCK_SESSION_SECRET"]
    path = settings.state_dir / "secrets" / "airlock-session.key"
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
    return path.read_text().strip()


def prepare(settings: Settings) -> None:
    """Once per start, before any worker: migrate, validate the declarations, and finish the
    releases a crash interrupted (release is idempotent, but once is enough)."""
    engine = make_engine(settings.airlock_db_url or "", pool_size=1)
    try:
        upgrade(engine)
        load_registry(settings.policies_dir)  # invalid declarations stop the start, clearly
        service = AirlockService(settings, engine, LiveRegistry(settings.policies_dir))
        # the copies of the researchers' files that checks killed with the last run left
        remove_stale_check_dirs(service.checking_dir)
        service.complete_pending_releases()
    finally:
        engine.dispose()  # no connection may be shared with forked workers


def make_app(
    settings: Settings,
    hub: HubConfig,
    *,
    pool_size: int | None = None,
    secret: str | None = None,
    checks: Executor | None = None,
    threads: int = 8,
) -> FastAPI:
    """The ASGI app of one worker (the database must already be migrated: ``prepare``).

    The connection pool holds one connection for every thread that may use one at once (the
    endpoint threads and the snapshot threads, plus a few): connections beyond the pool are
    closed when returned, and a new PostgreSQL backend costs milliseconds of CPU to start, so
    a pool smaller than the threads opens and closes connections in every burst of requests.
    """
    pool_size = pool_size or 2 * threads + 4
    engine = make_engine(settings.airlock_db_url or "", pool_size=pool_size)
    registry = LiveRegistry(settings.policies_dir)  # re-read when a declaration changes
    service = AirlockService(settings, engine, registry, check_pool=checks)
    return create_app(
        service,
        HubIdentityProvider(hub),
        prefix=hub.prefix,
        session_secret=secret or session_secret(settings),
        https_only=os.environ.get("JUPYTERHUB_PUBLIC_URL", "").startswith("https"),
        snapshot_threads=threads,
    )


def build_app(settings: Settings, hub: HubConfig, *, pool_size: int = 10) -> FastAPI:
    """Migrate the database, finish interrupted releases, and return the ASGI app (in-process
    checks: for a single process, e.g. tests)."""
    prepare(settings)
    return make_app(settings, hub, pool_size=pool_size)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # signals are handled once for both servers by ``_run_servers``
        yield


# The proxy (configurable-http-proxy) keeps its connections to the airlock open and reuses them
# without an idle limit; uvicorn closes idle ones after 5 s by default, and a request the proxy
# sends on a connection just as it closes fails (a 503 for the user; the load benchmark saw such
# resets). Closing idle connections far less often makes that race rare.
KEEP_ALIVE_SECONDS = 75


def _configs(
    app: FastAPI | str, host: str, port: int, uds: Path | None, log_level: str
) -> list[uvicorn.Config]:
    common: dict = {"log_level": log_level, "timeout_keep_alive": KEEP_ALIVE_SECONDS}
    configs = [uvicorn.Config(app, host=host, port=port, proxy_headers=False, **common)]
    if uds is not None:
        configs.append(uvicorn.Config(app, uds=str(uds), lifespan="off", **common))
    return configs


def _run_servers(
    configs: list[uvicorn.Config], sockets: list[socket.socket] | None, threads: int | None = None
) -> None:
    servers = [_Server(c) for c in configs]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        if threads is not None:  # the sync endpoints' thread pool (anyio's default: 40)
            anyio.to_thread.current_default_thread_limiter().total_tokens = threads
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: [setattr(s, "should_exit", True) for s in servers])
        if sockets is None:
            await asyncio.gather(*(s.serve() for s in servers))
        else:
            pairs = zip(servers, sockets, strict=True)
            await asyncio.gather(*(s.serve(sockets=[k]) for s, k in pairs))

    asyncio.run(main())


def serve(app: FastAPI, host: str, port: int, uds: Path | None, log_level: str = "info") -> None:
    """One process serving ``app`` (the servers bind their own sockets)."""
    if uds is not None:
        uds.parent.mkdir(parents=True, exist_ok=True)
        uds.unlink(missing_ok=True)
    _run_servers(_configs(app, host, port, uds, log_level), None)


def _worker(
    settings: Settings,
    hub: HubConfig,
    secret: str,
    host: str,
    port: int,
    uds: Path | None,
    log_level: str,
    sockets: list[socket.socket],
    check_processes: int,
    threads: int,
) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):  # the parent's handlers are not ours
        signal.signal(sig, signal.SIG_DFL)
    sys.setswitchinterval(settings.airlock_switch_interval_ms / 1000)
    checks = check_pool(check_processes)
    try:
        app = make_app(settings, hub, secret=secret, checks=checks, threads=threads)
        _run_servers(_configs(app, host, port, uds, log_level), sockets, threads)
    finally:
        if checks is not None:
            # no waiting: a check process may still be importing; it leaves when we do
            checks.shutdown(wait=False, cancel_futures=True)


def _worker_process(*args: object) -> None:
    """A forked worker: serve, then exit at once (the interpreter's exit would join the check
    pool, which can take seconds while a check process still imports at nice 10)."""
    code = 0
    try:
        _worker(*args)  # type: ignore[arg-type]
    except BaseException:  # noqa: BLE001  (logged, and the exit code tells the parent)
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _tcp_socket(host: str, port: int) -> socket.socket:
    """The listening TCP socket, shared by the workers.

    Not ``uvicorn.Config.bind_socket``: it creates the socket without ``proto=IPPROTO_TCP``, and
    asyncio sets TCP_NODELAY only on connections of sockets that say they are TCP; without it
    Nagle's algorithm and the client's delayed ACK added 40 ms to every response of a sync
    endpoint (measured: /api/health 44 ms instead of 1.4 ms).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def serve_workers(
    settings: Settings,
    hub: HubConfig,
    host: str,
    port: int,
    uds: Path | None,
    log_level: str = "info",
    workers: int = 1,
    check_processes: int = 0,
    threads: int = 8,
) -> None:
    """Prepare once, then serve from ``workers`` processes sharing the listening sockets."""
    prepare(settings)
    secret = session_secret(settings)
    if uds is not None:
        uds.parent.mkdir(parents=True, exist_ok=True)
        uds.unlink(missing_ok=True)
    sockets = [_tcp_socket(host, port)]
    if uds is not None:
        sockets.append(_configs("airlock", host, port, uds, log_level)[1].bind_socket())
    args = (settings, hub, secret, host, port, uds, log_level, sockets, check_processes, threads)
    if workers <= 1:
        _worker(*args)
        return
    # fork: the parent has no threads and no database connection at this point
    ctx = multiprocessing.get_context("fork")
    stopping = False

    def start() -> multiprocessing.process.BaseProcess:
        proc = ctx.Process(target=_worker_process, args=args, name="airlock-worker")
        proc.start()
        return proc

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    procs = [start() for _ in range(workers)]
    try:
        while not stopping:
            time.sleep(0.2)
            for i, proc in enumerate(procs):
                if not proc.is_alive() and not stopping:
                    log.error("airlock worker %s exited (%s): restarting", proc.pid, proc.exitcode)
                    procs[i] = start()
    finally:
        for proc in procs:
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
        for sock in sockets:
            sock.close()
        if uds is not None:
            uds.unlink(missing_ok=True)

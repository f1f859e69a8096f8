"""Build the service from settings and run it: one process, one or two uvicorn servers (TCP for
the proxy and browsers; optionally a unix socket for sandboxes, which have no network)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
from collections.abc import Iterator
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from airlock.service.app import create_app
from airlock.service.auth import HubConfig, HubIdentityProvider
from airlock.service.core import AirlockService
from airlock.service.db import make_engine, upgrade
from tre.provision import LiveRegistry
from tre.registry import load_registry
from tre.settings import Settings


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


def build_app(settings: Settings, hub: HubConfig, *, pool_size: int = 10) -> FastAPI:
    """Migrate the database, finish interrupted releases, and return the ASGI app."""
    engine = make_engine(settings.airlock_db_url or "", pool_size=pool_size)
    upgrade(engine)
    load_registry(settings.policies_dir)  # invalid declarations stop the start, clearly
    registry = LiveRegistry(settings.policies_dir)  # re-read when a declaration changes
    service = AirlockService(settings, engine, registry)
    service.complete_pending_releases()
    return create_app(
        service,
        HubIdentityProvider(hub),
        prefix=hub.prefix,
        session_secret=session_secret(settings),
        https_only=os.environ.get("JUPYTERHUB_PUBLIC_URL", "").startswith("https"),
    )


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # signals are handled once for both servers by ``serve``
        yield


def serve(app: FastAPI, host: str, port: int, uds: Path | None, log_level: str = "info") -> None:
    configs = [uvicorn.Config(app, host=host, port=port, log_level=log_level, proxy_headers=False)]
    if uds is not None:
        uds.parent.mkdir(parents=True, exist_ok=True)
        uds.unlink(missing_ok=True)
        configs.append(uvicorn.Config(app, uds=str(uds), log_level=log_level, lifespan="off"))
    servers = [_Server(c) for c in configs]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: [setattr(s, "should_exit", True) for s in servers])
        await asyncio.gather(*(s.serve() for s in servers))

    asyncio.run(main())

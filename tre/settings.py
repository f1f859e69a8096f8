"""Settings of a TRE installation.

One YAML file (``tre.yaml``, path in ``TRE_CONFIG``) validated by pydantic, overridable by
environment variables prefixed ``TRE_`` (nested with ``__``). Every path defaults to a place
under ``state_dir`` so that the embedded default needs no configuration at all.
"""

from __future__ import annotations

import ipaddress
import os
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


def traversable_by_others(path: Path) -> bool:
    """Whether every directory from ``path`` up to ``/`` lets other users through (o+x)."""
    return all(p.stat().st_mode & 0o001 for p in [path, *path.parents] if p.exists())


def default_state_dir() -> Path:
    """``var/`` in the checkout, unless the sandbox user could not reach it there.

    Sandboxes run as an unprivileged user, who must traverse the state directory to reach the
    sandbox environment, extracts and workspaces. A checkout under a private directory (e.g.
    /root, mode 0700) would make every sandbox fail, so root then keeps state in /var/lib/tre.
    """
    if traversable_by_others(REPO_ROOT) or os.geteuid() != 0:
        return REPO_ROOT / "var"
    return Path("/var/lib/tre")


class HubSettings(BaseModel):
    """JupyterHub and sandbox settings (``hub:`` in tre.yaml, ``TRE_HUB__<NAME>`` in the env)."""

    model_config = ConfigDict(extra="forbid")

    spawner: str = Field(
        default="bubblewrap",
        description="'bubblewrap' (embedded default, no Docker) or 'docker' (TREDockerSpawner).",
    )
    authenticator: str = Field(
        default="local", description="'local' (demo accounts) or 'oidc' (institutional SSO)."
    )
    runtime_dir: Path | None = Field(
        default=None,
        description="Unix sockets of the hub, the airlock and the sandboxes (keep the path "
        "short: a socket path is limited to 107 bytes). Default: <state_dir>/run.",
    )
    sandbox_env_dir: Path | None = Field(
        default=None,
        description="Python environment the sandboxes run (built by `tre hub build-sandbox-env` "
        "on /usr/bin/python3, readable by the sandbox user). Default: <state_dir>/sandbox-env.",
    )
    sandbox_python: Path = Field(
        default=Path("/usr/bin/python3"),
        description="System Python the sandbox environment is built on (not one under /root).",
    )
    sandbox_user: str = Field(
        default="tre-sandbox", description="Unprivileged system user every sandbox runs as."
    )
    memory_limit_mb: int = Field(
        default=4096, ge=64, description="Address-space limit per sandbox process (MiB)."
    )
    max_processes: int = Field(
        default=2048,
        ge=16,
        description="Process limit (RLIMIT_NPROC) of the sandbox user, over all its sandboxes.",
    )
    max_file_size_mb: int = Field(
        default=2048, ge=1, description="Largest file a sandbox may write (MiB)."
    )
    max_open_files: int = Field(default=1024, ge=64, description="Open files per process.")
    sandbox_memory_mb: int = Field(
        default=8192,
        ge=128,
        description="Memory of a whole sandbox (cgroup memory limit), when cgroups are writable.",
    )
    sandbox_max_pids: int = Field(
        default=512, ge=16, description="Processes of one sandbox (cgroup pids.max), ditto."
    )
    idle_timeout_seconds: int = Field(
        default=3600, ge=5, description="The idle culler stops sandboxes idle for this long."
    )
    cull_interval_seconds: int = Field(
        default=300, ge=2, description="How often the idle culler looks for idle sandboxes."
    )
    airlock_service: str = Field(
        default="managed",
        description="'managed': the hub starts `airlock serve` (TCP + unix socket); 'external': "
        "the airlock runs elsewhere at airlock_port; 'none': registered for OAuth scopes only, "
        "no URL (hubs without an airlock, tests).",
    )
    start_timeout_seconds: int = Field(default=60, ge=5, description="Spawn timeout.")
    proxy_api_port: int = Field(default=8001, description="Loopback port of the proxy's API.")
    public_url: str | None = Field(
        default=None,
        description="Public origin of the hub, scheme://host[:port] (e.g. "
        "https://tre.example.org). "
        "Each researcher's servers are served on a host of their own below it "
        "(<user>.<host>) and the airlock on airlock--service.<host> (JupyterHub's "
        "subdomain_host), so that code in a sandbox can never run in the origin of the hub or "
        "of the airlock. Needs wildcard DNS (and a wildcard certificate) for *.<host>. "
        "Default: http://tre.localhost:<hub_port> (browsers resolve *.localhost to this "
        "machine).",
    )

    @model_validator(mode="after")
    def _known_choices(self) -> HubSettings:
        if self.spawner not in {"bubblewrap", "docker"}:
            raise ValueError("hub.spawner must be 'bubblewrap' or 'docker'")
        if self.authenticator not in {"local", "oidc"}:
            raise ValueError("hub.authenticator must be 'local' or 'oidc'")
        if self.airlock_service not in {"managed", "external", "none"}:
            raise ValueError("hub.airlock_service must be 'managed', 'external' or 'none'")
        if self.public_url is not None:
            self.public_url = check_public_url(self.public_url)
        return self


def check_public_url(url: str) -> str:
    """``scheme://host[:port]`` with a host name that can have subdomains; ValueError if not."""
    parts = urlsplit(url.strip())
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValueError(f"hub.public_url must be http(s)://host[:port], not {url!r}")
    if parts.path not in {"", "/"} or parts.query or parts.fragment or parts.username:
        raise ValueError(
            f"hub.public_url must be an origin only (scheme, host, port), not {url!r}: the hub "
            "is served at the root of its host"
        )
    try:
        ipaddress.ip_address(parts.hostname)
    except ValueError:
        pass
    else:
        raise ValueError(
            f"hub.public_url needs a host NAME, not an IP address ({parts.hostname}): researchers' "
            "servers and the airlock get host names below it (e.g. tre.localhost, with "
            "alice.tre.localhost and airlock--service.tre.localhost)"
        )
    if "." not in parts.hostname:
        raise ValueError(
            f"hub.public_url's host {parts.hostname!r} has no dot: browsers do not share cookies "
            "safely below a single-label name; use e.g. tre.localhost or tre.example.org"
        )
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"hub.public_url: {exc}") from None
    return f"{parts.scheme}://{parts.hostname}" + (f":{port}" if port else "")


def public_origin(public_url: str, name: str, kind: str = "user") -> str:
    """The origin JupyterHub (``subdomain_host`` = ``public_url``) gives a user's servers
    (kind 'user': ``<name>.<host>``) or a service ('service': ``<name>--service.<host>``)."""
    from jupyterhub.utils import subdomain_hook_idna  # JupyterHub's own naming, not a copy

    parts = urlsplit(public_url)
    domain = subdomain_hook_idna(name, parts.hostname, kind)
    return f"{parts.scheme}://{domain}" + (f":{parts.port}" if parts.port else "")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TRE_", env_nested_delimiter="__", extra="forbid")

    state_dir: Path = Field(
        default_factory=default_state_dir,
        description="Root of all mutable state of this installation (default: var/ in the "
        "checkout, or /var/lib/tre when the checkout is not reachable by the sandbox user).",
    )
    policies_dir: Path = Field(
        default=REPO_ROOT / "policies",
        description="Sites, projects, data dictionary and disclosure policy (data, not code).",
    )
    pooled_dir: Path | None = Field(default=None, description="Pooled store (DuckDB + Parquet).")
    extracts_dir: Path | None = Field(default=None, description="Per-project read-only extracts.")
    workspaces_dir: Path | None = Field(default=None, description="Per-project workspaces.")
    reports_dir: Path | None = Field(default=None, description="Data-quality reports per batch.")
    hmac_key_file: Path | None = Field(
        default=None,
        description="File holding the pseudonymisation key. Never stored with the pooled data.",
    )
    airlock_db_url: str | None = Field(
        default=None, description="SQLAlchemy URL of the airlock database (SQLite by default)."
    )
    airlock_store_dir: Path | None = Field(
        default=None, description="Content-addressed snapshots and the released store."
    )
    hub_db_url: str | None = Field(default=None, description="JupyterHub database URL.")
    hub_ip: str = "127.0.0.1"
    hub_port: int = 8000
    airlock_port: int = 8100
    airlock_workers: int = Field(
        default=2,
        ge=1,
        le=64,
        description="Processes of `airlock serve` (each with its own uvicorn, sharing the "
        "listening sockets). One process runs Python on one core at a time (the GIL), so use "
        "about one per core; 2 suits the 2-core reference machine.",
    )
    airlock_threads: int = Field(
        default=8,
        ge=1,
        le=256,
        description="Per airlock worker: threads running the endpoints (database, templates); "
        "more requests wait in the event loop. Few on purpose: in one process only one thread "
        "runs Python at a time, and with many busy threads each database round trip of a "
        "vote waits for its turn. Endpoints that snapshot files (they wait for the checks) "
        "have as many threads again of their own.",
    )
    airlock_switch_interval_ms: float = Field(
        default=5.0,
        gt=0,
        le=100,
        description="Per airlock worker: how long one thread may hold the interpreter lock "
        "while another waits for it (Python's switch interval). An endpoint thread coming back "
        "from a database round trip waits up to this long for a thread that is rendering a "
        "page, once per round trip.",
    )
    airlock_check_processes: int = Field(
        default=1,
        ge=0,
        le=64,
        description="Per airlock worker: processes that run the disclosure checks of new "
        "snapshots at lower CPU priority (nice 10), so a burst of submissions cannot starve page "
        "views and votes; 0 runs the checks inside the request's thread.",
    )
    hub: HubSettings = Field(default_factory=HubSettings, description="JupyterHub and sandboxes.")
    # provisioning and expiry enforcement (tre/provision.py, tre/enforce.py)
    hub_api_url: str | None = Field(
        default=None,
        description="JupyterHub REST API used to mirror project groups and stop sandboxes "
        "(default http://<hub_ip>:<hub_port>/hub/api).",
    )
    hub_admin_token_file: Path | None = Field(
        default=None,
        description="File holding the API token of the hub service 'tre-provision' "
        "(scopes: admin:users, admin:groups, admin:servers).",
    )
    enforce_interval_seconds: int = Field(
        default=300, ge=1, description="How often `tre project enforce --loop` runs."
    )
    enforce_poll_seconds: float = Field(
        default=5,
        gt=0,
        le=300,
        description="Between its passes, `tre project enforce --loop` checks the declarations "
        "this often and runs a pass at once when one changed (a removed member, a suspended "
        "project, a removed admin lose access within about this long).",
    )
    extract_identifier_compression: Literal["zstd", "auto"] = Field(
        default="zstd",
        description="How extracts store pseudonym columns: 'zstd' (builds a full copy about a "
        "fifth faster; those columns take about a third more space than with 'auto') or 'auto' "
        "(DuckDB's own choice per column). Other columns always use DuckDB's choice.",
    )
    ingest_invalid_rows: str = Field(
        default="reject",
        description="Invalid rows in an ingest: 'reject' the batch or 'quarantine' the rows.",
    )

    @model_validator(mode="after")
    def _fill_defaults(self) -> Settings:
        s = self.state_dir
        self.pooled_dir = self.pooled_dir or s / "pooled"
        self.extracts_dir = self.extracts_dir or s / "extracts"
        self.workspaces_dir = self.workspaces_dir or s / "workspaces"
        self.reports_dir = self.reports_dir or s / "reports"
        self.hmac_key_file = self.hmac_key_file or s / "secrets" / "hmac.key"
        self.airlock_store_dir = self.airlock_store_dir or s / "airlock"
        self.airlock_db_url = self.airlock_db_url or f"sqlite:///{s / 'airlock.sqlite'}"
        self.hub_db_url = self.hub_db_url or f"sqlite:///{s / 'jupyterhub.sqlite'}"
        self.hub.runtime_dir = self.hub.runtime_dir or s / "run"
        self.hub.sandbox_env_dir = self.hub.sandbox_env_dir or s / "sandbox-env"
        self.hub.public_url = self.hub.public_url or f"http://tre.localhost:{self.hub_port}"
        self.hub_api_url = self.hub_api_url or f"http://{self.hub_ip}:{self.hub_port}/hub/api"
        self.hub_admin_token_file = (
            self.hub_admin_token_file or s / "secrets" / "hub-provision.token"
        )
        if self.ingest_invalid_rows not in {"reject", "quarantine"}:
            raise ValueError("ingest_invalid_rows must be 'reject' or 'quarantine'")
        _check_separate_data_dirs(self)
        return self


def _check_separate_data_dirs(settings: Settings) -> None:
    """The data directories must be separate trees. Extracts are found and cleaned up by file
    name (``<extracts_dir>/<project>.duckdb``; ``tre extract build --all`` removes every
    ``*.duckdb`` no project declares): an extracts dir that is the pooled dir would delete
    ``pooled.duckdb``, and a project named ``pooled`` would be served the whole pool."""
    dirs = {
        "pooled_dir": settings.pooled_dir,
        "extracts_dir": settings.extracts_dir,
        "workspaces_dir": settings.workspaces_dir,
        "reports_dir": settings.reports_dir,
        "airlock_store_dir": settings.airlock_store_dir,
    }
    # resolved: a symlink or '..' must not hide that two settings name the same place
    real = {name: Path(os.path.realpath(path)) for name, path in dirs.items() if path is not None}
    names = sorted(real)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if real[a] == real[b] or real[a] in real[b].parents or real[b] in real[a].parents:
                raise ValueError(
                    f"{a} ({dirs[a]}) and {b} ({dirs[b]}) overlap: each must be a directory "
                    "of its own, neither inside the other"
                )


def load_settings(config_file: Path | None = None, **overrides: object) -> Settings:
    """Settings from ``config_file`` (or ``$TRE_CONFIG``), then environment, then overrides."""
    path = config_file or (Path(os.environ["TRE_CONFIG"]) if os.environ.get("TRE_CONFIG") else None)
    data: dict = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: the settings file must be a mapping")
        data.update(loaded)
    data.update(overrides)
    # environment variables win over the file: pydantic-settings gives init kwargs priority,
    # so only pass file keys that the environment does not set.
    env_keys = {k[4:].lower() for k in os.environ if k.startswith("TRE_")}
    data = {k: v for k, v in data.items() if k not in env_keys or k in overrides}
    return Settings(**data)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()

"""Settings of a TRE installation.

One YAML file (``tre.yaml``, path in ``TRE_CONFIG``) validated by pydantic, overridable by
environment variables prefixed ``TRE_`` (nested with ``__``). Every path defaults to a place
under ``state_dir`` so that the embedded default needs no configuration at all.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import yaml
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TRE_", env_nested_delimiter="__", extra="forbid")

    state_dir: Path = Field(
        default=REPO_ROOT / "var", description="Root of all mutable state of this installation."
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
        self.hub_api_url = self.hub_api_url or f"http://{self.hub_ip}:{self.hub_port}/hub/api"
        self.hub_admin_token_file = (
            self.hub_admin_token_file or s / "secrets" / "hub-provision.token"
        )
        if self.ingest_invalid_rows not in {"reject", "quarantine"}:
            raise ValueError("ingest_invalid_rows must be 'reject' or 'quarantine'")
        return self


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

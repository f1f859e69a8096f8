"""Fixtures of the airlock-service tests: a database per test on SQLite AND PostgreSQL, a TRE
with its own policies (staff, projects) and workspaces, and the service on top."""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from sqlalchemy import Engine, text

from airlock.service.core import AirlockService
from airlock.service.db import make_engine, upgrade
from tre.registry import load_registry
from tre.settings import Settings

STAFF = {"output_checkers": ["checker1", "checker2", "checker3"], "admins": ["admin"]}
REPO_ROOT = Path(__file__).resolve().parents[2]
USERS = ["alice", "bob", "carol", "checker1", "checker2", "checker3", "admin", "dave"]


def make_policies(root: Path) -> Path:
    """The repository's policies plus a third checker, who is also a member of
    leukaemia-incidence (so the 'members cannot check their own project' rule is exercised)."""
    policies = root / "policies"
    shutil.copytree(REPO_ROOT / "policies", policies)
    (policies / "staff.yaml").write_text(yaml.safe_dump(STAFF))
    leuk = policies / "projects" / "leukaemia-incidence.yaml"
    data = yaml.safe_load(leuk.read_text())
    data["members"].append({"username": "checker3", "role": "researcher"})
    leuk.write_text(yaml.safe_dump(data))
    return policies


def write_workspace_files(workspaces: Path) -> None:
    for project in ("wilms-outcomes", "leukaemia-incidence"):
        ws = workspaces / project
        (ws / "outputs").mkdir(parents=True, exist_ok=True)
        (ws / "outputs" / "table.csv").write_text("group,count\na,25\nb,30\n")
        (ws / "outputs" / "small.csv").write_text("group,count\na,3\nb,30\n")
        (ws / "notes.txt").write_text(f"notes of {project}\n")


@dataclass
class DB:
    url: str
    schema: str | None
    engine: Engine


def _make_db(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> DB:
    if kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'airlock.sqlite'}"
        engine = make_engine(url)
        return DB(url, None, engine)
    pg_url = request.getfixturevalue("require_postgres")
    schema = f"airlock_t_{uuid.uuid4().hex[:12]}"
    admin = make_engine(pg_url)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    admin.dispose()
    engine = make_engine(pg_url, schema=schema)
    db = DB(pg_url, schema, engine)

    def _drop() -> None:
        engine.dispose()
        cleanup = make_engine(pg_url)
        with cleanup.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        cleanup.dispose()

    request.addfinalizer(_drop)
    return db


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> DB:
    """A fresh, migrated airlock database: every storage test runs on both backends."""
    d = _make_db(request.param, tmp_path, request)
    upgrade(d.engine)
    return d


@pytest.fixture
def tre_settings(tmp_path: Path, db: DB) -> Settings:
    policies = make_policies(tmp_path)
    settings = Settings(state_dir=tmp_path / "state", policies_dir=policies, airlock_db_url=db.url)
    write_workspace_files(settings.workspaces_dir)
    return settings


@pytest.fixture
def service(tre_settings: Settings, db: DB) -> AirlockService:
    registry = load_registry(tre_settings.policies_dir)
    return AirlockService(tre_settings, db.engine, registry)

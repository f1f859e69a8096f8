"""Helpers shared by the provisioning and enforcement tests."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from tre.registry import Registry
from tre.settings import Settings, load_settings

REPO_ROOT = Path(__file__).resolve().parent.parent


def make_settings(tmp_path: Path, **extra: Any) -> Settings:
    policies = tmp_path / "policies"
    shutil.copytree(REPO_ROOT / "policies", policies)
    return load_settings(state_dir=tmp_path / "state", policies_dir=policies, **extra)


class FileExtracts:
    """Stands in for ``tre.extract`` where only the orchestration is under test.

    It writes, per project, a file describing exactly what the extract would contain (grants,
    filters, allowed sites), so a test can see that a rebuild really happened and used the new
    declaration. ``fail_for`` makes a build fail, to test that an apply stops cleanly.
    """

    def __init__(self) -> None:
        self.builds: list[str] = []
        self.fail_for: set[str] = set()
        self.pooled_version = "1"

    def source_version(self, settings: Settings) -> str:
        return self.pooled_version

    def path(self, settings: Settings, project_id: str) -> Path:
        return settings.extracts_dir / f"{project_id}.duckdb"

    def build(self, settings: Settings, registry: Registry, project_id: str, on) -> Path | None:
        if project_id in self.fail_for:
            raise RuntimeError(f"simulated failure building {project_id}")
        project = registry.projects[project_id]
        target = self.path(settings, project_id)
        target.parent.mkdir(parents=True, exist_ok=True)
        body = {
            "grants": project.grants,
            "sites": sorted(s.id for s in registry.sites_for(project, on)),
            "row_filters": project.row_filters.model_dump(mode="json"),
        }
        target.write_text(json.dumps(body, sort_keys=True))
        self.builds.append(project_id)
        return target

    def exceeds(self, settings: Settings, registry: Registry, project_id: str, on) -> str | None:
        """The real rule (``tre.extract.scope_exceeds``) applied to what this fake recorded."""
        from tre.extract import scope_exceeds

        path = self.path(settings, project_id)
        project = registry.projects.get(project_id)
        if not path.exists() or project is None:
            return None
        body = json.loads(path.read_text())
        scope = {
            "sites": body["sites"],
            "tables": body["grants"],
            "row_filters": body["row_filters"],
        }
        return scope_exceeds(scope, registry, project, on)

    def content(self, settings: Settings, project_id: str) -> dict:
        return json.loads(self.path(settings, project_id).read_text())


class ListAudit:
    """Collects audit events in memory (the hash-chained log is tested with tre.audit)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, str, dict]] = []

    def record(self, actor: str, action: str, target: str, details: dict) -> None:
        self.events.append((actor, action, target, details))

    def actions(self) -> list[str]:
        return [e[1] for e in self.events]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()

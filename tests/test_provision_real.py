"""Provisioning on the real components: `tre project apply` with the real extract builder
(`tre.extract` on a pooled store filled by `tre.ingest`) and the real hash-chained audit log.

`tests/test_provision.py` drives the orchestration with stand-ins to read plans and inject
failures; here a build fails for a real reason (the extract's target path is occupied) and the
test checks what the real builder, the state file and the audit chain are left with.
"""

from __future__ import annotations

import datetime as dt
import shutil

import duckdb
import pytest
import site_files

from tests.provision_support import make_settings
from tre.ingest import ingest_files
from tre.provision import AirlockAudit, AppliedState, TreExtracts, reconcile, state_path
from tre.pseudonymise import init_key
from tre.registry import load_registry

TODAY = dt.date(2026, 11, 29)


def _ingest(settings, site_id: str, seed: int, tmp_path) -> None:
    files = site_files.write(site_files.generate(60, seed=seed), tmp_path / f"{site_id}-{seed}")
    assert ingest_files(settings, site_id, files, quality_report=False).status == "loaded"


def _apply(settings):
    return reconcile(
        settings,
        load_registry(settings.policies_dir),
        actor="admin",
        use_hub=False,
        audit=AirlockAudit(settings),
        extracts=TreExtracts(),
        today=TODAY,
    )


def _audit(settings) -> tuple[list, list]:
    from airlock.service.db import make_engine, session_factory
    from tre.audit import iter_events, verify_chain

    with session_factory(make_engine(settings.airlock_db_url))() as session:
        return [(e.action, e.target) for e in iter_events(session)], verify_chain(session)


def _columns(path, table: str) -> list[str]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        sql = "SELECT column_name FROM duckdb_columns() WHERE table_name = ? ORDER BY column_index"
        return [c for (c,) in con.execute(sql, [table]).fetchall()]
    finally:
        con.close()


@pytest.fixture
def settings(tmp_path):
    s = make_settings(tmp_path)
    init_key(s.hmac_key_file)
    _ingest(s, "uk-ccr", 1, tmp_path)
    _ingest(s, "fr-rnce", 2, tmp_path)
    return s


def test_apply_builds_real_extracts_and_a_real_failure_is_audited_and_retried(settings, tmp_path):
    registry = load_registry(settings.policies_dir)
    active = sorted(p.id for p in registry.projects.values() if p.is_active(TODAY))
    assert len(active) >= 2
    blocked, *others = active
    # A real failure: a directory sits where the blocked project's extract must be swapped in.
    obstacle = TreExtracts().path(settings, blocked)
    (obstacle / "in-the-way").mkdir(parents=True)

    rec = _apply(settings)
    assert rec.result is not None and not rec.result.ok
    assert rec.result.failed.project == blocked
    assert not any(settings.extracts_dir.glob(f".{blocked}.*.tmp")), "a failed build left debris"
    events, broken = _audit(settings)
    assert broken == []
    # whatever sits at an extract's path must be shown to hold only what the project may see:
    # a directory cannot, so it is withdrawn before the rebuild, and removing it is what fails
    assert ("project.withdraw_extract.failed", f"project:{blocked}") in events
    state = AppliedState.load(state_path(settings))
    assert state.projects[blocked].get("extract_fingerprint") is None

    shutil.rmtree(obstacle)
    rec = _apply(settings)
    assert rec.result is not None and rec.result.ok, rec.result
    for project_id in active:
        path = TreExtracts().path(settings, project_id)
        project = registry.projects[project_id]
        for table, cols in project.grants.items():
            if cols != ["*"]:
                assert _columns(path, table) == cols, (project_id, table)
    assert _apply(settings).changes == []  # idempotent

    # A new delivery makes a new pooled version: every active extract is rebuilt from it.
    _ingest(settings, "us-nwts", 3, tmp_path)
    rec = _apply(settings)
    rebuilt = {c.project for c in rec.changes if c.action.value == "build_extract"}
    assert rebuilt == set(active) and rec.result.ok
    from tre.extract import extract_info

    for project_id in active:
        assert extract_info(settings, project_id)["pooled_version"] == 3
    events, broken = _audit(settings)
    assert broken == []
    assert events.count(("project.build_extract", f"project:{others[0]}")) == 2

"""Red team of project scoping and per-project extracts: inputs a careless or malicious project
or site author, or an admin mistake, could produce. Each test here failed on the code before
its fix (see the commit that added it)."""

from __future__ import annotations

import datetime as dt
import shutil

import duckdb
import pytest
from pooled_synth import build_pooled
from pydantic import ValidationError

from tre.dictionary import load_dictionary
from tre.extract import build_extract
from tre.pooled import PooledStore
from tre.project_edit import grant
from tre.registry import RegistryError, load_registry
from tre.settings import Settings, load_settings


@pytest.mark.parametrize("other", ["pooled_dir", "workspaces_dir", "reports_dir"])
def test_extracts_dir_sharing_a_data_directory_is_refused(tmp_path, other):
    """``tre extract build --all`` removes every ``*.duckdb`` no project declares: with the
    extracts dir set to the pooled dir (an admin's slip) it deleted ``pooled.duckdb``."""
    state = tmp_path / "state"
    with pytest.raises(ValidationError, match=f"{other}.*overlap|overlap.*{other}"):
        Settings(state_dir=state, extracts_dir=state / other.removesuffix("_dir"))
    # inside another data directory, or the same one reached through a symlink or '..'
    with pytest.raises(ValidationError, match="overlap"):
        Settings(state_dir=state, extracts_dir=state / "pooled" / "extracts")
    (tmp_path / "link").symlink_to(state, target_is_directory=True)
    state.mkdir()
    with pytest.raises(ValidationError, match="overlap"):
        Settings(state_dir=state, extracts_dir=tmp_path / "link" / "pooled")
    with pytest.raises(ValidationError, match="overlap"):
        Settings(state_dir=state, extracts_dir=state / "x" / ".." / "pooled")


def test_build_all_never_touches_the_pooled_store_whatever_the_configuration(tmp_path, monkeypatch):
    """The same slip through the environment, as an admin would make it: refused before any
    extract is built, and the pooled store is still there."""
    state = tmp_path / "state"
    store = PooledStore(state / "pooled")
    build_pooled(store, {"uk-ccr": "GB"}, 5, seed=3)
    monkeypatch.setenv("TRE_EXTRACTS_DIR", str(state / "pooled"))
    with pytest.raises(ValidationError, match="overlap"):
        load_settings(state_dir=state)
    monkeypatch.delenv("TRE_EXTRACTS_DIR")
    # separate directories are fine
    assert load_settings(state_dir=state).extracts_dir == state / "extracts"
    assert store.db_path.exists()


def _copy_policies(policies_dir, tmp_path):
    copy = tmp_path / "policies"
    shutil.copytree(policies_dir, copy)
    return copy


def test_a_year_window_that_selects_nothing_is_refused(policies_dir, tmp_path):
    """min after max was accepted and silently gave the project an empty extract."""
    policies = _copy_policies(policies_dir, tmp_path)
    path = policies / "projects" / "wilms-outcomes.yaml"
    text = path.read_text().replace(
        "  iccc3_groups: [VI]", "  diagnosis_year_min: 2010\n  diagnosis_year_max: 2000"
    )
    path.write_text(text)
    with pytest.raises(RegistryError) as exc:
        load_registry(policies)
    [problem] = exc.value.problems
    assert (problem.file, problem.field) == (path, "row_filters")
    assert "diagnosis_year_min (2010) is after diagnosis_year_max (2000)" in problem.message
    path.write_text(text.replace("2000", "2010"))  # one year is a window
    assert load_registry(policies).projects["wilms-outcomes"].row_filters.diagnosis_year_max


def test_revoking_a_column_from_a_wildcard_grant_takes_it_away(policies_dir, tmp_path):
    """`tre project grant --revoke P tumour icdo3_morphology` on a `tumour: ['*']` grant kept
    the '*': nothing changed, yet the command said it was saved and audited a revocation."""
    policies = _copy_policies(policies_dir, tmp_path)
    reg = grant(policies, "wilms-outcomes", "tumour", ["icdo3_morphology"], revoke=True)
    kept = reg.projects["wilms-outcomes"].grants["tumour"]
    assert "*" not in kept and "icdo3_morphology" not in kept
    assert {"tumour_id", "iccc3_group", "site_id"} <= set(kept)
    # and the extract built from that declaration no longer holds the column
    settings = Settings(state_dir=tmp_path / "state", policies_dir=policies)
    store = PooledStore(settings.pooled_dir)
    build_pooled(store, {"uk-ccr": "GB"}, 20, seed=5)
    with store.writer() as con:  # every dictionary column, as `tre data ingest` keeps the pool
        have = {r[0] for r in con.execute("SELECT column_name FROM (DESCRIBE tumour)").fetchall()}
        for c in load_dictionary(policies / "dictionary.yaml").pooled_columns("tumour"):
            if c not in have:
                con.execute(f'ALTER TABLE tumour ADD COLUMN "{c}" VARCHAR')
    path = build_extract(settings, load_registry(policies), "wilms-outcomes", dt.date(2026, 6, 1))
    con = duckdb.connect(str(path), read_only=True)
    try:
        cols = [r[0] for r in con.execute("DESCRIBE tumour").fetchall()]
    finally:
        con.close()
    assert "icdo3_morphology" not in cols and "tumour_id" in cols


@pytest.mark.parametrize(
    ("columns", "revoke", "words"),
    [
        (["age_at_diagnosis_days", "date_of_birth"], True, "not granted, cannot be revoked"),
        (["date_of_birth"], False, "unknown column 'date_of_birth'"),
        (["Patient_ID"], False, "unknown column 'Patient_ID'"),
        ([" tumour_id"], False, "unknown column ' tumour_id'"),
    ],
)
def test_grant_edits_of_columns_that_are_not_there_are_refused(
    policies_dir, tmp_path, columns, revoke, words
):
    """A revocation of a column that was never granted was a silent no-op; a grant of a column
    the dictionary lacks was saved and failed only at the next extract build."""
    policies = _copy_policies(policies_dir, tmp_path)
    path = policies / "projects" / "leukaemia-incidence.yaml"
    before = path.read_bytes()
    with pytest.raises(RegistryError) as exc:
        grant(policies, "leukaemia-incidence", "tumour", columns, revoke=revoke)
    [problem] = exc.value.problems
    assert (problem.file, problem.field) == (path, "grants.tumour")
    assert words in problem.message
    assert path.read_bytes() == before

"""Red team of project scoping and per-project extracts: inputs a careless or malicious project
or site author, or an admin mistake, could produce. Each test here failed on the code before
its fix (see the commit that added it)."""

from __future__ import annotations

import shutil

import pytest
from pooled_synth import build_pooled
from pydantic import ValidationError

from tre.pooled import PooledStore
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

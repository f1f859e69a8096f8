"""Red team of project scoping and per-project extracts: inputs a careless or malicious project
or site author, or an admin mistake, could produce. Each test here failed on the code before
its fix (see the commit that added it)."""

from __future__ import annotations

import datetime as dt
import shutil
from types import SimpleNamespace

import duckdb
import pytest
from pooled_synth import build_pooled
from pydantic import ValidationError

from tre.dictionary import load_dictionary
from tre.extract import ExtractError, build_extract
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


# --- an extract must not outlive the rules it was built under -----------------------------

SITES = {"uk-ccr": "GB", "fr-rnce": "FR", "us-nwts": "US", "de-gpoh": "DE"}
TODAY = dt.date(2026, 11, 29)


def _extract_sites(path) -> set[str]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return {r[0] for r in con.execute("SELECT DISTINCT site_id FROM patient").fetchall()}
    finally:
        con.close()


def _withdraw_gb(policies) -> None:
    """uk-ccr stops sharing with researchers in GB."""
    site = policies / "sites" / "uk-ccr.yaml"
    site.write_text(site.read_text().replace("[GB, FR, DE, NL, SE, US]", "[FR, DE, NL, SE, US]"))


def test_a_failed_rebuild_after_a_site_withdrew_does_not_leave_its_rows_served(
    policies_dir, tmp_path
):
    """The old extract was kept whenever a rebuild failed (here: a dictionary column the pool
    does not hold yet, granted in the same edit), even when it held rows of a site that had
    withdrawn."""
    policies = _copy_policies(policies_dir, tmp_path)
    settings = Settings(state_dir=tmp_path / "state", policies_dir=policies)
    build_pooled(PooledStore(settings.pooled_dir), SITES, 120, seed=11)
    path = build_extract(settings, load_registry(policies), "leukaemia-incidence", TODAY)
    assert "uk-ccr" in _extract_sites(path)
    site = policies / "sites" / "uk-ccr.yaml"  # uk-ccr withdraws public-health use
    site.write_text(site.read_text().replace("[academic, public_health]", "[academic]"))
    grant(policies, "leukaemia-incidence", "tumour", ["histology_group"])
    with pytest.raises(ExtractError, match="histology_group"):
        build_extract(settings, load_registry(policies), "leukaemia-incidence", TODAY)
    assert not path.exists()
    assert not list(settings.extracts_dir.iterdir())  # no temporary either


@pytest.fixture(scope="module")
def running_hub(tmp_path_factory):
    from tests.provision_hub import proxy_or_skip, start_hub

    hub = start_hub(tmp_path_factory.mktemp("hub"), proxy_or_skip())
    yield hub
    hub.stop()


def _narrow_column(policies) -> None:
    grant(policies, "wilms-outcomes", "patient", ["birth_year"], revoke=True)


def _narrow_filter(policies) -> None:
    path = policies / "projects" / "wilms-outcomes.yaml"
    path.write_text(path.read_text().replace("[VI]", "[VI]\n  diagnosis_year_min: 2010"))


def _query(path, sql):
    con = duckdb.connect(str(path), read_only=True)
    try:
        return con.execute(sql).fetchone()[0]
    finally:
        con.close()


NARROWINGS = {
    "site withdraws": (_withdraw_gb, "SELECT count(*) FROM patient WHERE site_id = 'uk-ccr'"),
    "column revoked": (
        _narrow_column,
        "SELECT count(*) FROM duckdb_columns() WHERE column_name = 'birth_year'",
    ),
    "filter narrowed": (_narrow_filter, "SELECT count(*) FROM tumour WHERE diagnosis_year < 2010"),
}


@pytest.fixture
def provisioned(tmp_path, running_hub):
    """The shipped declarations applied with the real extract builder and a real hub."""
    from tests.provision_support import ListAudit, make_settings
    from tre.enforce import enforce
    from tre.provision import HubClient, TreExtracts, reconcile

    token = tmp_path / "hub.token"
    token.write_text(running_hub.token)
    settings = make_settings(tmp_path, hub_api_url=running_hub.api_url, hub_admin_token_file=token)
    build_pooled(PooledStore(settings.pooled_dir), SITES, 120, seed=13)
    client = HubClient(running_hub.api_url, running_hub.token)
    extracts, audit = TreExtracts(), ListAudit()

    def apply():
        rec = reconcile(
            settings, load_registry(settings.policies_dir), actor="admin", audit=audit,
            extracts=extracts, today=TODAY,
        )  # fmt: skip
        assert rec.result is None or rec.result.ok, rec.result.error
        return [c.action.value for c in rec.changes if c.project == "wilms-outcomes"]

    def enforce_pass():
        report = enforce(
            settings, load_registry(settings.policies_dir), hub=client, extracts=extracts,
            audit=audit, today=TODAY, gc=False,
        )  # fmt: skip
        assert report.ok, report.errors
        return [c.action.value for c in report.changes if c.project == "wilms-outcomes"]

    apply()
    yield SimpleNamespace(
        settings=settings,
        client=client,
        path=extracts.path(settings, "wilms-outcomes"),
        apply=apply,
        enforce=enforce_pass,
    )
    client.stop_server("alice", "wilms-outcomes")
    client.close()


@pytest.mark.parametrize("narrowing", sorted(NARROWINGS))
def test_a_narrowing_takes_the_old_extract_and_its_running_sandboxes_away(
    provisioned, running_hub, narrowing
):
    """A rebuild swaps in a new file, but a running sandbox's read-only bind mount holds the
    old one: after a site withdrew, a column was revoked or a row filter narrowed, a researcher
    whose sandbox kept running kept reading the withdrawn data (until idle for an hour). And
    nothing but an admin's `apply` rebuilt it: `tre project enforce` left the extract as it
    was. Now enforcement withdraws such an extract and stops the project's sandboxes; `apply`
    rebuilds it within the new rules."""
    from tre.hub.access import ProjectAccessDenied, check_can_start_project

    t = provisioned
    narrow, withdrawn = NARROWINGS[narrowing]
    assert _query(t.path, withdrawn) > 0
    running_hub.start_server("alice", "wilms-outcomes")
    assert t.enforce() == []  # nothing to take away yet
    narrow(t.settings.policies_dir)
    assert t.enforce() == ["withdraw_extract", "stop_servers"]
    assert not t.path.exists()
    assert t.client.running_servers("wilms-outcomes") == []
    registry = load_registry(t.settings.policies_dir)
    with pytest.raises(ProjectAccessDenied, match="no data extract"):
        check_can_start_project(registry, "alice", "wilms-outcomes", t.settings.extracts_dir)
    # the other project is untouched; apply rebuilds within the new rules
    assert (t.settings.extracts_dir / "leukaemia-incidence.duckdb").exists()
    assert t.apply() == ["build_extract"]
    assert _query(t.path, withdrawn) == 0
    assert t.enforce() == [] and t.apply() == []


def test_apply_of_a_narrowing_stops_the_sandboxes_still_reading_the_old_extract(
    provisioned, running_hub
):
    """The usual way: the admin edits and applies. The extract was rebuilt, and the sandbox
    that was running went on reading the old file."""
    t = provisioned
    running_hub.start_server("alice", "wilms-outcomes")
    _withdraw_gb(t.settings.policies_dir)
    assert t.apply() == ["withdraw_extract", "stop_servers", "build_extract"]
    assert t.client.running_servers("wilms-outcomes") == []
    assert "uk-ccr" not in _extract_sites(t.path)


def test_a_stale_build_finishing_after_apply_is_caught(provisioned):
    """`tre extract build --all` (or the build after an ingest) loaded the declarations before
    the site withdrew and finished after `apply` had rebuilt: its file, with the withdrawn
    site's rows, replaced the right one, and since the recorded fingerprint matched the
    declarations, neither `apply` nor `enforce` ever looked at it again."""
    t = provisioned
    before = load_registry(t.settings.policies_dir)
    _withdraw_gb(t.settings.policies_dir)
    t.apply()
    assert "uk-ccr" not in _extract_sites(t.path)
    build_extract(t.settings, before, "wilms-outcomes", TODAY)  # the slow, stale build lands
    assert "uk-ccr" in _extract_sites(t.path)
    assert t.enforce() == ["withdraw_extract"]
    assert not t.path.exists()
    assert t.apply() == ["build_extract"]
    assert "uk-ccr" not in _extract_sites(t.path)


@pytest.fixture
def utc_plus_14(monkeypatch):
    """The server's clock 14 hours east of UTC: from 10:00 UTC on, its date is UTC's + 1."""
    import time

    monkeypatch.setenv("TZ", "Etc/GMT-14")  # POSIX sign: 14 hours east of UTC
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_enforcement_ends_a_project_on_the_same_date_as_the_hub_gate(tmp_path, utc_plus_14):
    """Enforcement took the UTC date, everything else the local one: east of UTC, the hub
    refused to start a project past its end date while `enforce` still found it active and
    left its sandboxes running and its extract in place for up to 14 hours."""
    from tests.provision_support import FileExtracts, ListAudit, make_settings
    from tre.enforce import enforce
    from tre.hub.access import ProjectAccessDenied, check_can_start_project
    from tre.project_edit import set_end_date
    from tre.provision import reconcile

    settings = make_settings(tmp_path)
    extracts, audit = FileExtracts(), ListAudit()
    end = dt.date(2026, 12, 31)
    set_end_date(settings.policies_dir, "wilms-outcomes", end)
    reconcile(
        settings, load_registry(settings.policies_dir), actor="admin", use_hub=False,
        audit=audit, extracts=extracts, today=end,
    )  # fmt: skip
    now = dt.datetime(2026, 12, 31, 20, 0, tzinfo=dt.UTC)  # 2027-01-01 10:00 on the server
    local = now.astimezone().date()
    assert local == end + dt.timedelta(days=1)
    registry = load_registry(settings.policies_dir)
    with pytest.raises(ProjectAccessDenied, match="expired"):
        check_can_start_project(registry, "alice", "wilms-outcomes", settings.extracts_dir, local)
    report = enforce(
        settings, registry, hub=None, extracts=extracts, audit=audit, now=now, gc=False
    )
    assert ("wilms-outcomes", "remove_extract") in {
        (c.project, c.action.value) for c in report.changes
    }
    assert not extracts.path(settings, "wilms-outcomes").exists()

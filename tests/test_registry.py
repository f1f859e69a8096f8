import datetime as dt
import shutil

import pytest

from tre.registry import RegistryError, load_registry


def test_shipped_policies_load(policies_dir):
    reg = load_registry(policies_dir)
    assert {"uk-ccr", "us-nwts"} <= set(reg.sites)
    assert "wilms-outcomes" in reg.projects


def test_site_conditions_filter_by_purpose_jurisdiction_and_embargo(policies_dir):
    reg = load_registry(policies_dir)
    site = reg.sites["us-nwts"]
    assert site.allows("academic", "GB", dt.date(2026, 6, 1))
    assert not site.allows("commercial", "GB", dt.date(2026, 6, 1))
    uk = reg.sites["uk-ccr"]
    assert not uk.allows("academic", "JP", dt.date(2026, 6, 1))
    embargoed = uk.model_copy(update={"embargo_until": dt.date(2027, 1, 1)})
    assert not embargoed.allows("academic", "GB", dt.date(2026, 12, 31))
    assert embargoed.allows("academic", "GB", dt.date(2027, 1, 1))


def test_invalid_project_names_file_field_and_problem(policies_dir, tmp_path):
    shutil.copytree(policies_dir, tmp_path / "p")
    bad = tmp_path / "p" / "projects" / "wilms-outcomes.yaml"
    bad.write_text(bad.read_text().replace("purpose: academic", "purpose: marketing"))
    with pytest.raises(RegistryError) as exc:
        load_registry(tmp_path / "p")
    [problem] = exc.value.problems
    assert problem.file == bad
    assert problem.field == "purpose"
    assert "academic" in problem.message


def test_unknown_table_in_grants_is_rejected(policies_dir, tmp_path):
    shutil.copytree(policies_dir, tmp_path / "p")
    bad = tmp_path / "p" / "projects" / "leukaemia-incidence.yaml"
    bad.write_text(bad.read_text().replace("grants:\n", "grants:\n  hospital: ['*']\n"))
    with pytest.raises(RegistryError) as exc:
        load_registry(tmp_path / "p")
    assert any("hospital" in p.message and p.field == "grants" for p in exc.value.problems)

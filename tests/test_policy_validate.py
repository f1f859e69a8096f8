"""`tre policy validate`: every declaration checked; errors name file, field and problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jsonschema
import pytest
import yaml
from typer.testing import CliRunner

from tre.cli import app
from tre.policy_validate import render_schemas, stale_schemas, validate_policies

REPO_ROOT = Path(__file__).resolve().parent.parent
SCHEMA_DIR = REPO_ROOT / "docs" / "schemas"


@pytest.fixture
def policies(tmp_path) -> Path:
    copy = tmp_path / "policies"
    shutil.copytree(REPO_ROOT / "policies", copy)
    return copy


def test_the_shipped_declarations_are_valid():
    registry, problems = validate_policies(REPO_ROOT / "policies")
    assert problems == []
    assert registry is not None and registry.projects


def _edit(path: Path, change) -> None:  # noqa: ANN001
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.mark.parametrize(
    ("relpath", "change", "field", "words"),
    [
        ("disclosure.yaml", lambda d: d.update(min_cell_count=0), "min_cell_count", "greater"),
        (
            "disclosure.yaml",
            lambda d: d.update(threshold_typo=3),
            "threshold_typo",
            "not permitted",
        ),
        ("disclosure.yaml", lambda d: d.pop("k_anonymity"), "k_anonymity", "required"),
        (
            "projects/wilms-outcomes.yaml",
            lambda d: d.update(disclosure={"min_cell_count": "ten"}),
            "disclosure.min_cell_count",
            "integer",
        ),
        (
            "projects/wilms-outcomes.yaml",
            lambda d: d["grants"].update(patient=["patient_id", "favourite_colour"]),
            "grants.patient",
            "unknown column 'favourite_colour'",
        ),
        ("sites/uk-ccr.yaml", lambda d: d.update(country="United Kingdom"), "country", "pattern"),
        ("staff.yaml", lambda d: d.update(admins="admin"), "admins", "list"),
        (
            "dictionary.yaml",
            lambda d: d["tables"]["patient"]["columns"]["sex"].update(type="colour"),
            "tables.patient.columns.sex.type",
            "Input should be",
        ),
    ],
)
def test_problems_name_file_field_and_problem(policies, relpath, change, field, words):
    path = policies / relpath
    _edit(path, change)
    registry, problems = validate_policies(policies)
    assert registry is None
    assert any(p.file == path and p.field == field and words in p.message for p in problems), (
        problems
    )


def test_broken_yaml_is_reported_not_raised(policies):
    (policies / "disclosure.yaml").write_text("min_cell_count: [unclosed\n")
    _, problems = validate_policies(policies)
    assert any(p.file.name == "disclosure.yaml" and "not valid YAML" in p.message for p in problems)


def test_cli_exit_status_and_message(policies):
    runner = CliRunner()
    ok = runner.invoke(app, ["policy", "validate", "--policies-dir", str(policies)])
    assert ok.exit_code == 0, ok.output
    _edit(policies / "sites" / "fr-rnce.yaml", lambda d: d.update(allowed_purposes=[]))
    bad = runner.invoke(app, ["policy", "validate", "--policies-dir", str(policies)])
    assert bad.exit_code == 1
    assert "fr-rnce.yaml" in bad.output and "allowed_purposes" in bad.output


def test_published_schemas_are_current():
    """docs/schemas/ is generated from the validating models; regenerate when they change:
    `uv run tre policy validate --schemas docs/schemas`."""
    assert stale_schemas(SCHEMA_DIR) == []


def test_shipped_files_validate_against_the_published_schemas():
    rendered = {n: json.loads(t) for n, t in render_schemas().items()}
    pairs = [("disclosure", REPO_ROOT / "policies" / "disclosure.yaml")]
    pairs += [("staff", REPO_ROOT / "policies" / "staff.yaml")]
    pairs += [("site", p) for p in sorted((REPO_ROOT / "policies" / "sites").glob("*.yaml"))]
    pairs += [("project", p) for p in sorted((REPO_ROOT / "policies" / "projects").glob("*.yaml"))]
    for name, path in pairs:
        data = json.loads(json.dumps(yaml.safe_load(path.read_text()), default=str))
        jsonschema.validate(data, rendered[f"{name}.schema.json"])
    # and the schema rejects what the validator rejects
    bad = dict(yaml.safe_load((REPO_ROOT / "policies" / "sites" / "uk-ccr.yaml").read_text()))
    bad["source_type"] = "rumour"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, rendered["site.schema.json"])

"""`airlock check`: rich report, --json, --project (policy overrides + extract), exit codes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
import yaml

from airlock.cli import CheckSetupError, run_checks

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent / "corpus" / "files"))
import corpus  # noqa: E402


class Result:
    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def airlock(*args: str, env: dict | None = None) -> Result:
    """Run the CLI in-process (the settings cache is cleared so TRE_* variables apply)."""
    from typer.testing import CliRunner

    from airlock.cli import app
    from tre.settings import get_settings

    get_settings.cache_clear()
    try:
        res = CliRunner().invoke(app, list(args), env=env or {}, catch_exceptions=False)
    finally:
        get_settings.cache_clear()
    return Result(res.exit_code, res.stdout, res.stderr)


def test_the_console_script_runs(tmp_path):
    (tmp_path / "t.csv").write_text(corpus.SAFE_CSV)
    proc = subprocess.run(
        [sys.executable, "-m", "airlock.cli", "check", "--json", str(tmp_path / "t.csv")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)[0]["status"] == "pass"


@pytest.fixture
def files(tmp_path):
    (tmp_path / "safe.csv").write_text(corpus.SAFE_CSV)
    (tmp_path / "small.csv").write_text("site,count\nnorth,143\nsouth,3\n")
    (tmp_path / "zip.csv").write_bytes(b"PK\x03\x04" + b"\x00" * 30)
    return tmp_path


@pytest.fixture
def installation(tmp_path):
    """A policies dir whose project lowers the threshold, and an extract for that project."""
    policies = tmp_path / "policies"
    shutil.copytree(REPO / "policies", policies)
    path = policies / "projects" / "wilms-outcomes.yaml"
    project = yaml.safe_load(path.read_text())
    project["disclosure"] = {"min_cell_count": 3}
    path.write_text(yaml.safe_dump(project))
    extracts = tmp_path / "extracts"
    extracts.mkdir()
    con = duckdb.connect(str(extracts / "wilms-outcomes.duckdb"))
    con.execute("CREATE TABLE patient AS SELECT 'patient-' || range AS patient_id FROM range(100)")
    con.close()
    return {"TRE_POLICIES_DIR": str(policies), "TRE_EXTRACTS_DIR": str(extracts)}


def test_json_output_one_object_per_file(files):
    proc = airlock(
        "check", "--json", str(files / "safe.csv"), str(files / "small.csv"), str(files / "zip.csv")
    )
    assert proc.returncode == 0, proc.stderr
    reports = json.loads(proc.stdout)
    assert [r["status"] for r in reports] == ["pass", "fail", "fail"]
    assert reports[1]["findings"][0]["rule"] == "frequency.min_cell_count"
    assert set(reports[2]["findings"][0]) == {"rule", "status", "message", "cells"}
    assert all(set(r) == {"path", "status", "findings"} for r in reports)


def test_human_report(files):
    proc = airlock("check", str(files / "small.csv"), str(files / "zip.csv"))
    assert proc.returncode == 0
    assert "FAIL" in proc.stdout and "frequency.min_cell_count" in proc.stdout
    assert "file.type_not_allowed" in proc.stdout


def test_cannot_run_exits_non_zero(files):
    missing = airlock("check", str(files / "nope.csv"))
    assert missing.returncode != 0 and "no such file" in missing.stderr
    bad_project = airlock("check", "--project", "no-such-project", str(files / "safe.csv"))
    assert bad_project.returncode != 0 and "unknown project" in bad_project.stderr
    bad_evidence = airlock("check", "--evidence", str(files / "x.json"), str(files / "safe.csv"))
    assert bad_evidence.returncode != 0


def test_project_overrides_and_extract(files, installation):
    leak = files / "ids.csv"
    leak.write_text("code,count\npatient-7,143\nother,121\n")
    proc = airlock(
        "check",
        "--json",
        "--project",
        "wilms-outcomes",
        str(files / "small.csv"),
        str(leak),
        env=installation,
    )
    assert proc.returncode == 0, proc.stderr
    small, ids = json.loads(proc.stdout)
    assert small["status"] == "pass"  # the project allows counts >= 3
    assert "leak.identifier" in {f["rule"] for f in ids["findings"]}
    without = airlock("check", "--json", str(files / "small.csv"), env=installation)
    assert json.loads(without.stdout)[0]["status"] == "fail"


def test_python_api(files, installation):
    reports = run_checks(
        [files / "small.csv"],
        project="wilms-outcomes",
        policies_dir=Path(installation["TRE_POLICIES_DIR"]),
        extracts_dir=Path(installation["TRE_EXTRACTS_DIR"]),
    )
    assert reports[0].status.value == "pass"
    with pytest.raises(CheckSetupError):
        run_checks([files / "missing.csv"])

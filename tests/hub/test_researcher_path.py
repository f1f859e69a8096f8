"""The researcher path, for real: a hub-started sandbox, a query of the project's extract with
DuckDB and polars, a table saved with ``tre.outputs`` in the workspace, and its release
requested from inside the sandbox through the airlock's unix socket (the airlock runs as a
hub-managed service). Then what the sandbox's token must NOT be able to do at the airlock."""

from __future__ import annotations

# ruff: noqa: E501 - the kernel code in strings reads better unwrapped
import json

import pytest
from conftest import AIRLOCK_CLIENT

pytestmark = [pytest.mark.hub, pytest.mark.sandbox]


def run_json(kernel, code: str) -> dict:
    out = kernel.run(code, timeout=120)
    assert out["error"] is None, out
    return json.loads(out["stdout"].strip().splitlines()[-1])


@pytest.fixture(scope="module")
def submitted(alice_kernel, hub):
    result = run_json(
        alice_kernel,
        """
import json, os
import duckdb, polars as pl
from tre import outputs
con = duckdb.connect(os.environ["TRE_EXTRACT"], read_only=True)
df = con.sql("SELECT sex, birth_year FROM patient").pl()
assert isinstance(df, pl.DataFrame)
by_sex = df.group_by("sex").len().sort("sex")
t = outputs.frequency_table(df, rows="sex", columns="birth_year")
os.makedirs("outputs", exist_ok=True)
t.save("outputs/sex_by_birth_year.csv")
print(json.dumps({"rows": df.height, "by_sex": by_sex.rows(), "status": str(t.status)}))
""",
    )
    assert result["rows"] == 200
    assert result["by_sex"] == [["F", 100], ["M", 100]]
    saved = hub.settings.workspaces_dir / "wilms-outcomes" / "outputs" / "sex_by_birth_year.csv"
    assert saved.exists() and saved.stat().st_uid != 0
    answer = run_json(
        alice_kernel,
        AIRLOCK_CLIENT
        + """
r = airlock.post("/requests", json={
    "project": os.environ["TRE_PROJECT"],
    "title": "Patients by sex and birth year",
    "context": "Counts of patients in the project extract.",
    "controls": "None needed: every cell is at least 10.",
    "files": [{"path": "outputs/sex_by_birth_year.csv", "group": "tables"}],
    "submit": True,
})
print(json.dumps({"status": r.status_code, "body": r.json()}))
""",
    )
    assert answer["status"] == 201, answer
    return answer["body"]


def test_request_release_from_inside_the_sandbox(submitted):
    assert submitted["state"] == "submitted"
    assert submitted["project"] == "wilms-outcomes"
    assert [f["path"] for f in submitted["files"]] == ["outputs/sex_by_birth_year.csv"]


def test_sandbox_token_cannot_review_or_reach_other_projects(alice_kernel, submitted):
    rid = submitted["id"]
    fid = submitted["files"][0]["id"]
    result = run_json(
        alice_kernel,
        AIRLOCK_CLIENT
        + f"""
res = {{}}
res["vote"] = airlock.post("/requests/{rid}/files/{fid}/votes", json={{"decision": "approve", "comment": "self"}}).status_code
res["release"] = airlock.post("/requests/{rid}/release").status_code
res["other_project"] = airlock.post("/requests", json={{"project": "leukaemia-incidence", "title": "x", "context": "x", "controls": "x", "files": [], "submit": False}}).status_code
res["queue"] = airlock.get("/queue").status_code
res["audit"] = airlock.get("/audit").status_code
res["own"] = airlock.get("/requests/{rid}").status_code
print(json.dumps(res))
""",
    )
    assert result["own"] == 200  # the sandbox may follow its own request...
    for action in ("vote", "release", "other_project", "queue", "audit"):
        assert result[action] in (400, 403, 404), (action, result[action])

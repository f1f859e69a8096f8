"""Retention, second red team: what released content survived, where, and for how long.

* a download or preview of a released request past ``released_content_retention_days`` answers
  410 by itself, before ``airlock gc`` ran (wall clock, null, policy changes);
* a download racing the purge of its request answers 200 with the exact bytes or a clean 410;
* trash that cannot be deleted is reported (exit 1, an audit event naming the path) and a rerun
  finishes it;
* two concurrent runs never both count one stale staging directory or upload;
* the working copies of killed disclosure checks are removed at the next start or run;
* an empty value in retention.yaml is refused, never read as null (keep forever).
"""

from __future__ import annotations

import datetime as dt

import pytest

from airlock.retention import collect, load_retention_policy
from tests.airlock_service.test_retention import (
    NOW,
    cli,
    gc_events,
    purge_events,
    released_with,
)

# --- an empty value is not null ----------------------------------------------------------------


def set_field(service, field: str, raw: str) -> None:
    """Write ``field: raw`` in the TRE's retention.yaml (replacing the field's line)."""
    path = service.settings.policies_dir / "retention.yaml"
    lines = [x for x in path.read_text().splitlines() if not x.startswith(f"{field}:")]
    path.write_text("\n".join([*lines, f"{field}:{raw}"]) + "\n")


@pytest.mark.parametrize(
    "field, raw",
    [
        ("released_content_retention_days", ""),
        ("released_content_retention_days", "   "),
        ("released_content_retention_days", "   # keep them?"),
        ("snapshot_retention_days", ""),
        ("gc_interval_hours", ""),
    ],
)
def test_an_empty_value_is_refused_naming_file_and_field(service, monkeypatch, field, raw):
    from tre.policy_validate import validate_policies

    rid, _fid, sha = released_with(service, "blank.csv", "group,count\nblank,61\n")
    set_field(service, field, raw)
    _registry, problems = validate_policies(service.settings.policies_dir)
    [problem] = [p for p in problems if p.file.name == "retention.yaml"]
    assert problem.field == field and "has no value" in problem.message
    if field == "released_content_retention_days":
        assert "`null` to keep released contents forever" in problem.message
    result = cli(service, monkeypatch, "--dry-run")
    assert result.exit_code == 2 and f"retention.yaml: {field}: has no value" in result.output
    assert service.store.verify(sha) and gc_events(service) == []


@pytest.mark.parametrize("raw", [" null", " ~", " NULL"])
def test_an_explicit_null_keeps_released_content_forever(service, raw):
    rid, _fid, sha = released_with(service, "null.csv", "group,count\nnull,62\n")
    set_field(service, "released_content_retention_days", raw)
    policy = load_retention_policy(service.settings.policies_dir)
    assert policy.released_content_retention_days is None
    collect(service, policy, now=NOW + dt.timedelta(days=36500))
    assert purge_events(service) == {} and service.store.verify(sha)

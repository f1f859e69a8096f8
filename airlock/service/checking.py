"""The one place the service calls the automated checks (``airlock.checks.engine``)."""

from __future__ import annotations

from pathlib import Path

from airlock.checks.engine import check_file
from airlock.checks.findings import FileReport
from airlock.policy import Policy


def run_checks(path: Path, policy: Policy, extract_path: Path | None = None) -> FileReport:
    """Findings for the snapshot at ``path`` (its name carries the original file name)."""
    return check_file(path, policy, extract_path=extract_path)

"""The one place the service calls the automated checks (swap the engine here, one line).

Until ``airlock.checks.engine`` lands, files get a single ``review`` finding saying that no
automated check ran: a human must look, and nothing is silently passed.
"""

from __future__ import annotations

from pathlib import Path

from airlock.checks.findings import FileReport, Finding, Status
from airlock.policy import Policy

try:  # the engine is built in another area (branches checks-files / checks-tables)
    from airlock.checks.engine import check_file as _engine_check_file
except ImportError:  # pragma: no cover - depends on merge order
    _engine_check_file = None


def run_checks(path: Path, policy: Policy, extract_path: Path | None = None) -> FileReport:
    """Findings for the snapshot at ``path`` (its name carries the original file name)."""
    if _engine_check_file is not None:
        return _engine_check_file(path, policy, extract_path=extract_path)
    suffix = path.suffix.lower().lstrip(".")
    findings = [
        Finding(
            rule="engine.unavailable",
            status=Status.REVIEW,
            message="No automated disclosure check ran on this file: review it by hand.",
            policy_version=policy.label,
        )
    ]
    if suffix not in policy.allowed_file_types:
        findings.append(
            Finding(
                rule="file.type_not_allowed",
                status=Status.FAIL,
                message=f"File type {suffix or '(none)'!r} is not allowed by the policy.",
                evidence={"allowed": policy.allowed_file_types},
                policy_version=policy.label,
            )
        )
    status = max((f.status for f in findings), key=lambda s: s.severity)
    return FileReport(path=path.name, output_class="unknown", status=status, findings=findings)

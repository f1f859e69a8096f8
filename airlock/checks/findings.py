"""What every check returns: findings with a status, the rule, the cells and the evidence.

In the spirit of ACRO (status, summary, cells), but typed: a check is a function returning a
list of ``Finding``; a file's status is the worst status of its findings.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field


class Status(StrEnum):
    PASS = "pass"  # noqa: S105 (a verdict, not a password)
    REVIEW = "review"
    FAIL = "fail"

    @property
    def severity(self) -> int:
        return {"pass": 0, "review": 1, "fail": 2}[self.value]


def worst(statuses: list[Status] | list[str]) -> Status:
    """Any fail -> fail, else any review -> review, else pass (an empty list passes)."""
    found = [Status(s) for s in statuses]
    return max(found, key=lambda s: s.severity) if found else Status.PASS


class Finding(BaseModel):
    rule: str = Field(description="Identifier of the rule, e.g. 'frequency.min_cell_count'.")
    status: Status
    message: str = Field(description="What was found, in words a checker can act on.")
    cells: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Where: e.g. {'row': 3, 'column': 'count', 'value': 7}; notebooks add "
        "{'cell': n, 'output': m}; sheets add {'sheet': name}.",
    )
    evidence: dict[str, Any] = Field(
        default_factory=dict, description="Numbers behind the verdict."
    )
    policy_version: str = ""


class FileReport(BaseModel):
    path: str
    output_class: str = Field(description="e.g. frequency_table, figure, notebook, text, unknown")
    status: Status
    findings: list[Finding]
    sha256: str | None = None

    def public_dict(self) -> dict[str, Any]:
        """The shape of `airlock check --json`."""
        return {
            "path": self.path,
            "status": self.status.value,
            "findings": [
                {"rule": f.rule, "status": f.status.value, "message": f.message, "cells": f.cells}
                for f in self.findings
            ],
        }


def describe_places(cells: list[dict[str, Any]], limit: int = 3) -> str:
    """Where a finding applies, for people: 'row=2, column=F / 0, value=4; ... (7 places)'."""
    shown = [
        ", ".join(f"{k}={v}" for k, v in cell.items() if k != "context")
        for cell in cells[:limit]
        if isinstance(cell, dict)
    ]
    text = "; ".join(s for s in shown if s)
    if len(cells) > limit:
        text += f"; … ({len(cells)} places)"
    return text

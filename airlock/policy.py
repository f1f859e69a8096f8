"""The disclosure policy: thresholds from ``policies/disclosure.yaml``, overridable per project.

Every finding records ``Policy.version``: the declared version plus a digest of the effective
thresholds, so a project override or an edit to the file yields a different, traceable version.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

DEFAULT_POLICY_FILE = Path(__file__).resolve().parent.parent / "policies" / "disclosure.yaml"


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: str = Field(description="Declared policy version, e.g. '2026.1'.")
    min_cell_count: int = Field(ge=1)
    zeros_disclosive: bool
    nk_n: int = Field(ge=1)
    nk_k: float = Field(gt=0, le=1)
    p_ratio: float = Field(ge=0, le=1)
    min_residual_dof: int = Field(ge=0)
    survival_min_step: int = Field(ge=1)
    rounding_base: int = Field(ge=1)
    missing_values_review: bool = False
    # Added for the table checks (defaults here so that older policy files still load).
    model_max_params_fraction: float = Field(
        default=0.33,
        gt=0,
        le=1,
        description="A model with more parameters than this fraction of its observations fails.",
    )
    correlation_min_n: int = Field(
        default=10, ge=1, description="A correlation matrix based on fewer observations fails."
    )
    rounded_min_cells: int = Field(
        default=4,
        ge=1,
        description="Counts are taken as rounded when at least this many non-zero counts are "
        "all multiples of rounding_base.",
    )
    suppression_markers: list[str] = Field(
        default_factory=lambda: ["*", "[c]", "c", "x", "~", "-", "..", "suppressed", "redacted"],
        description="Cell texts (case-insensitive) that mean 'suppressed'; blank and NA too.",
    )
    suppression_patterns: list[str] = Field(
        default_factory=lambda: [r"^[<≤]\s*=?\s*\d+$"],
        description="Regular expressions (case-insensitive) for suppression markers like '<10'.",
    )
    total_labels: list[str] = Field(
        default_factory=lambda: ["total", "totals", "grand total"],
        description="Row or column labels (case-insensitive) that mark a margin.",
    )
    ambiguous_total_labels: list[str] = Field(
        default_factory=lambda: ["all", "overall", "sum", "all ages", "both sexes"],
        description="Labels that mark a margin only when the numbers confirm it (ALL is also "
        "a diagnosis: acute lymphoblastic leukaemia).",
    )
    allowed_file_types: list[str]
    max_file_bytes: int = Field(ge=1)
    max_rows: int = Field(ge=1)
    quasi_identifiers: list[str]
    k_anonymity: int = Field(ge=1)

    @property
    def digest(self) -> str:
        body = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(body).hexdigest()[:12]

    @property
    def label(self) -> str:
        """What a finding records: declared version and digest of the effective thresholds."""
        return f"{self.version}+{self.digest}"


class PolicyError(ValueError):
    """An invalid policy or project override; the message names the key and the problem."""


def load_policy(
    path: Path = DEFAULT_POLICY_FILE, overrides: dict[str, object] | None = None
) -> Policy:
    """The policy in ``path`` with a project's ``overrides`` applied; unknown keys are errors."""
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the disclosure policy must be a mapping")
    data.update(overrides or {})
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(policy)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise PolicyError(f"invalid disclosure policy ({path}): {problems}") from exc


def policy_for_project(project: object | None = None, path: Path = DEFAULT_POLICY_FILE) -> Policy:
    """The effective policy of a project: ``policies/disclosure.yaml`` + ``Project.disclosure``.

    ``project`` is a ``tre.registry.Project``, a plain mapping of overrides, or None (defaults).
    An override with an unknown key or an out-of-range value raises ``PolicyError``.
    """
    if project is None:
        overrides: dict[str, object] = {}
    elif isinstance(project, dict):
        overrides = dict(project)
    else:
        overrides = dict(getattr(project, "disclosure", {}) or {})
    if "version" in overrides:
        raise PolicyError("a project may not override the policy 'version'")
    return load_policy(path, overrides)

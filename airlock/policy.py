"""The disclosure policy: thresholds from ``policies/disclosure.yaml``, overridable per project.

Every finding records ``Policy.version``: the declared version plus a digest of the effective
thresholds, so a project override or an edit to the file yields a different, traceable version.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

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


def load_policy(
    path: Path = DEFAULT_POLICY_FILE, overrides: dict[str, object] | None = None
) -> Policy:
    """The policy in ``path`` with a project's ``overrides`` applied; unknown keys are errors."""
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the disclosure policy must be a mapping")
    data.update(overrides or {})
    return Policy.model_validate(data)

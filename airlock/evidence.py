"""Evidence files: what only the producer of a table knows, handed to the airlock with the table.

A magnitude cell's safety depends on numbers the table does not show (how many people are in
the cell, the largest contributions, whether they all share one value). ``tre.outputs`` writes
them next to each table as ``<name>.evidence.json`` (schema ``TableEvidence`` below); the airlock
also accepts an ACRO ``results.json`` bundle (converted by ``load_evidence``).

Evidence is a claim by the researcher's code, not a proof: the table checks match every evidence
cell against the visible table (value and position) and treat a mismatch as ``review``.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

SCHEMA = "tre.evidence/1"
MAX_EVIDENCE_BYTES = 32 * 1024 * 1024
OutputClass = Literal[
    "frequency_table",
    "magnitude_table",
    "model_summary",
    "correlation_matrix",
    "survival_table",
    "histogram",
    "unknown_table",
]


class EvidenceError(ValueError):
    """An evidence file that cannot be read or does not follow the schema."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CellEvidence(_Model):
    """What the producer knows about one cell of the table."""

    column: str = Field(description="Column name of the cell in the saved table.")
    row: int | None = Field(default=None, ge=0, description="0-based data row in the table.")
    labels: dict[str, str] | None = Field(
        default=None, description="Values of the label columns of the row, e.g. {'sex': 'F'}."
    )
    statistic: str | None = Field(
        default=None, description="count, sum, mean, median, min, max, std, pNN, mode, ..."
    )
    value: float | None = Field(default=None, description="The value shown in the table.")
    n: int | None = Field(default=None, ge=0, description="Number of contributors (people).")
    largest: list[float] = Field(
        default_factory=list, description="Largest contributions, descending (at least nk_n)."
    )
    total: float | None = Field(default=None, description="Sum of all contributions.")
    n_distinct: int | None = Field(default=None, ge=0, description="Distinct contributed values.")
    n_at_value: int | None = Field(
        default=None, ge=0, description="Contributors whose value equals the shown value."
    )
    negative: bool | None = Field(default=None, description="Any negative contribution.")
    missing: int = Field(default=0, ge=0, description="Missing values among the contributors.")
    suppressed: bool = False
    acro_checks: list[str] | None = Field(
        default=None, description="ACRO checks that flagged this cell (ACRO bundles only)."
    )


class ModelEvidence(_Model):
    nobs: int | None = Field(default=None, ge=0)
    df_resid: float | None = None
    n_params: int | None = Field(default=None, ge=0)
    categorical_cells: dict[str, dict[str, int]] = Field(
        default_factory=dict,
        description="For each categorical predictor (and a binary outcome): count per level.",
    )


class AcroSource(_Model):
    """Where ACRO-derived evidence came from, and ACRO's own risk appetite."""

    uid: str
    status: str
    output_type: str
    method: str | None = None
    statbarn: str | None = None
    summary: str = ""
    config: dict[str, Any] = Field(default_factory=dict)
    exception: str = ""


class TableEvidence(_Model):
    schema_: str = Field(default=SCHEMA, alias="schema")
    name: str = Field(description="File name of the table this evidence describes.")
    output_class: OutputClass | None = None
    producer: str = "tre.outputs"
    created: dt.datetime | None = None
    policy_version: str | None = None
    suppression_applied: bool = False
    rounding_base: int | None = Field(default=None, ge=1)
    margins: Literal["true_totals", "visible_only"] | None = Field(
        default=None,
        description="How the producer computed totals: from all the data (true_totals), or "
        "from the visible cells after suppression (visible_only, as ACRO does).",
    )
    notes: list[str] = Field(default_factory=list)
    cells: list[CellEvidence] = Field(default_factory=list)
    model: ModelEvidence | None = None
    correlation_n: int | None = Field(default=None, ge=0)
    acro: AcroSource | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, indent=2, exclude_none=True)


def _read_json(path: Path) -> Any:
    try:
        if path.stat().st_size > MAX_EVIDENCE_BYTES:
            raise EvidenceError(f"{path}: evidence file larger than {MAX_EVIDENCE_BYTES} bytes")
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EvidenceError(f"{path}: cannot read evidence: {exc}") from exc


def is_acro_bundle(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("results"), dict) and "version" in data


def parse_evidence(data: Any, origin: str = "evidence") -> TableEvidence:
    """Validate a parsed ``tre.evidence/1`` document; raise EvidenceError naming the problem."""
    if not isinstance(data, dict):
        raise EvidenceError(f"{origin}: evidence must be a JSON object")
    if data.get("schema") != SCHEMA:
        raise EvidenceError(f"{origin}: unknown evidence schema {data.get('schema')!r}")
    try:
        return TableEvidence.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5]
        )
        raise EvidenceError(f"{origin}: invalid evidence: {problems}") from exc


def _acro_output_class(record: dict[str, Any]) -> OutputClass:
    out_type = str(record.get("type", ""))
    summary = str(record.get("summary", ""))
    statbarn = str((record.get("fair") or {}).get("statbarn", ""))
    if out_type == "regression":
        return "model_summary"
    if out_type == "survival" or "survival" in summary.lower():
        return "survival_table"
    if out_type == "histogram":
        return "histogram"
    if statbarn == "Frequencies" or summary.startswith("FrequencyTable"):
        return "frequency_table"
    if out_type == "table":
        return "magnitude_table"
    return "unknown_table"


def _acro_statistic(record: dict[str, Any]) -> str | None:
    head = str(record.get("summary", "")).split(":", 1)[0].strip().lower()
    names = {
        "mean": "mean",
        "sum": "sum",
        "median": "median",
        "std": "std",
        "min": "min",
        "max": "max",
        "mode": "mode",
        "frequencytable": "count",
        "count": "count",
    }
    return names.get(head)


def acro_bundle_evidence(
    data: dict[str, Any], config: dict[str, Any] | None = None, origin: str = "results.json"
) -> dict[str, TableEvidence]:
    """Convert an ACRO ``results.json`` into evidence per output file name.

    ACRO flags cells by position in the table's value matrix ([row, column], label columns
    excluded); those become ``acro_checks`` on cell evidence. ACRO records no contributor counts
    or contributions, so the table checks decide what ACRO's flags can and cannot establish.
    """
    out: dict[str, TableEvidence] = {}
    for uid, record in (data.get("results") or {}).items():
        if not isinstance(record, dict):
            raise EvidenceError(f"{origin}: output {uid!r} is not an object")
        outcome = record.get("outcome") or {}
        columns = list(outcome) if isinstance(outcome, dict) else []
        statistic = _acro_statistic(record)
        properties = record.get("properties") or {}
        source = AcroSource(
            uid=str(record.get("uid", uid)),
            status=str(record.get("status", "")),
            output_type=str(record.get("type", "")),
            method=properties.get("method"),
            statbarn=(record.get("fair") or {}).get("statbarn"),
            summary=str(record.get("summary", "")),
            config=config or {},
            exception=str(record.get("exception", "") or ""),
        )
        model = None
        if record.get("type") == "regression":
            dof = properties.get("dof")
            model = ModelEvidence(df_resid=float(dof) if dof is not None else None)
        for file in record.get("files") or []:
            if not isinstance(file, dict) or "name" not in file:
                raise EvidenceError(f"{origin}: output {uid!r} has a file without a name")
            sdc = file.get("sdc") or {}
            flagged: dict[tuple[int, int], list[str]] = {}
            for check, positions in (sdc.get("cells") or {}).items():
                for pos in positions or []:
                    if isinstance(pos, list) and len(pos) == 2:
                        flagged.setdefault((int(pos[0]), int(pos[1])), []).append(str(check))
            cells: list[CellEvidence] = []
            row_labels: list[str] = list(outcome[columns[0]]) if columns else []
            for c, column in enumerate(columns):
                for r, _label in enumerate(row_labels):
                    cells.append(
                        CellEvidence(
                            column=str(column),
                            row=r,
                            statistic=statistic,
                            acro_checks=flagged.get((r, c), []),
                        )
                    )
            name = Path(str(file["name"])).name
            out[name] = TableEvidence(
                name=name,
                output_class=_acro_output_class(record),
                producer=f"acro {data.get('version', '?')}",
                suppression_applied=properties.get("mitigation", "none") not in (None, "none")
                or bool((config or {}).get("suppress")),
                # ACRO recomputes margins from the table after suppression
                margins="visible_only",
                cells=cells,
                model=model,
                acro=source,
            )
    return out


def load_evidence(path: Path | str, table_name: str | None = None) -> TableEvidence:
    """Read ``<name>.evidence.json`` or an ACRO ``results.json`` (then ``table_name`` picks the
    output file; ACRO's ``config.json`` next to it supplies ACRO's thresholds)."""
    path = Path(path)
    data = _read_json(path)
    if not is_acro_bundle(data):
        return parse_evidence(data, str(path))
    config_path = path.parent / "config.json"
    config = _read_json(config_path) if config_path.exists() else {}
    bundle = acro_bundle_evidence(data, config if isinstance(config, dict) else {}, str(path))
    if table_name is not None:
        key = Path(table_name).name
        if key not in bundle:
            raise EvidenceError(
                f"{path}: ACRO bundle has no output {key!r}; it has {', '.join(sorted(bundle))}"
            )
        return bundle[key]
    if len(bundle) != 1:
        raise EvidenceError(
            f"{path}: ACRO bundle has {len(bundle)} outputs; name the table "
            f"({', '.join(sorted(bundle))})"
        )
    return next(iter(bundle.values()))

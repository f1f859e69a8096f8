"""Contributing sites, projects and staff roles, declared as YAML files under ``policies/``.

Every file is validated with pydantic; a validation error names the file, the field and the
problem, so that an admin can fix a declaration without reading code.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SLUG = r"^[a-z][a-z0-9-]{1,38}[a-z0-9]$"
USERNAME = r"^[a-z0-9][a-z0-9._-]{0,63}$"
M = TypeVar("M", bound=BaseModel)
# the core dataset's tables; the data dictionary (policies/dictionary.yaml) may add more
CORE_TABLES = ("patient", "tumour", "treatment", "event", "followup")
TABLE_NAME = r"^[a-z][a-z0-9_]{0,62}$"


class Purpose(StrEnum):
    academic = "academic"
    public_health = "public_health"
    commercial = "commercial"


class ProjectStatus(StrEnum):
    active = "active"
    suspended = "suspended"
    closed = "closed"


class MemberRole(StrEnum):
    lead = "lead"
    researcher = "researcher"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Site(_Strict):
    """A contributing registry, trial group or study, and the conditions it shares under."""

    id: Annotated[str, Field(pattern=SLUG)]
    name: str
    country: Annotated[str, Field(pattern=r"^[A-Z]{2}$", description="ISO 3166-1 alpha-2")]
    source_type: Literal["registry", "trial", "study"]
    source_dataset: str
    allowed_purposes: list[Purpose] = Field(min_length=1)
    allowed_jurisdictions: list[str] = Field(
        min_length=1,
        description="ISO 3166-1 alpha-2 codes of researcher jurisdictions, or '*' for any.",
    )
    embargo_until: dt.date | None = Field(
        default=None, description="No project may see this site's rows before this date."
    )
    file_format: Literal["csv", "parquet"] = "csv"
    encoding: Literal["utf-8", "windows-1252", "iso-8859-1", "iso-8859-15"] = Field(
        default="utf-8",
        description=(
            "Text encoding of the site's CSV files when they are not UTF-8 (e.g. windows-1252 "
            "for 'CSV' saved by a European Excel). A file that is valid UTF-8 or starts with a "
            "UTF-8 byte-order mark is still read as UTF-8; any other file is decoded with this "
            "encoding. Parquet text is always UTF-8."
        ),
    )

    columns: dict[str, dict[str, str]] = Field(
        default_factory=dict,
        description=(
            "The site's own column names, per table, and the dictionary column each one is "
            "(e.g. {patient: {PatID: patient_id}}): a delivery is read with these names "
            "instead of the dictionary's. Names are compared as headers are (case, spaces "
            "and hyphens ignored)."
        ),
    )
    codes: dict[str, dict[str, str]] = Field(
        default_factory=dict,
        description=(
            "The site's local codes of a code column ('table.column'), and the dictionary "
            "code each one is (e.g. {patient.sex: {'1': Female, '2': Male}}): they take "
            "precedence over the dictionary's synonyms for this site only; values are "
            "compared ignoring case and surrounding blanks."
        ),
    )

    @field_validator("columns", "codes", mode="before")
    @classmethod
    def _mapping(cls, v: object) -> object:
        # YAML reads 1, 01, yes unquoted as numbers and booleans: a local code '01' would
        # silently become 1 and never match, so only quoted text is taken
        if not isinstance(v, dict):
            return v
        for where, mapping in v.items():
            if not isinstance(mapping, dict) or not mapping:
                raise ValueError(f"{where}: must be a non-empty mapping")
            for source, target in mapping.items():
                if not isinstance(source, str) or not isinstance(target, str):
                    raise ValueError(
                        f"{where}: {source!r}: {target!r}: write names and codes as quoted "
                        "text (YAML reads 1, 01 or yes unquoted as numbers and booleans)"
                    )
                if not source.strip() or not target.strip():
                    raise ValueError(f"{where}: {source!r}: {target!r}: a blank name or code")
        return v

    @field_validator("allowed_jurisdictions")
    @classmethod
    def _jurisdictions(cls, v: list[str]) -> list[str]:
        for code in v:
            if code != "*" and not re.fullmatch(r"[A-Z]{2}", code):
                raise ValueError(f"{code!r} is not an ISO 3166-1 alpha-2 code or '*'")
        return v

    def allows(self, purpose: Purpose | str, jurisdiction: str, on: dt.date) -> bool:
        """Whether this site's rows may go to a project with this purpose and jurisdiction."""
        if self.embargo_until is not None and on < self.embargo_until:
            return False
        if Purpose(purpose) not in self.allowed_purposes:
            return False
        return "*" in self.allowed_jurisdictions or jurisdiction in self.allowed_jurisdictions


class Member(_Strict):
    username: Annotated[str, Field(pattern=USERNAME)]
    role: MemberRole = MemberRole.researcher
    institution: str | None = None


class RowFilters(_Strict):
    iccc3_groups: list[str] | None = Field(
        default=None, description="Only tumours in these ICCC-3 main groups (I..XII)."
    )
    sites: list[str] | None = Field(default=None, description="Only these contributing sites.")
    diagnosis_year_min: int | None = None
    diagnosis_year_max: int | None = None

    @field_validator("iccc3_groups")
    @classmethod
    def _groups(cls, v: list[str] | None) -> list[str] | None:
        valid = {"I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX", "X", "XI", "XII"}
        for g in v or []:
            if g not in valid:
                raise ValueError(f"{g!r} is not an ICCC-3 main group (I..XII)")
        return v

    @model_validator(mode="after")
    def _years(self) -> RowFilters:
        lo, hi = self.diagnosis_year_min, self.diagnosis_year_max
        if lo is not None and hi is not None and lo > hi:  # would silently select nothing
            raise ValueError(f"diagnosis_year_min ({lo}) is after diagnosis_year_max ({hi})")
        return self


class Project(_Strict):
    """An approved project: who, why, which data, until when."""

    id: Annotated[str, Field(pattern=SLUG)]
    title: str = Field(min_length=3)
    lay_summary: str = Field(min_length=10)
    purpose: Purpose
    jurisdiction: Annotated[str, Field(pattern=r"^[A-Z]{2}$")]
    institutions: list[str] = Field(default_factory=list)
    members: list[Member] = Field(min_length=1)
    grants: dict[str, list[str]] = Field(
        min_length=1,
        description="Granted tables and their columns; ['*'] grants every column of a table.",
    )
    row_filters: RowFilters = Field(default_factory=RowFilters)
    start_date: dt.date
    end_date: dt.date
    status: ProjectStatus = ProjectStatus.active
    retention_days: int = Field(default=365, ge=0)
    disclosure: dict[str, object] = Field(
        default_factory=dict, description="Overrides of policies/disclosure.yaml for this project."
    )

    @field_validator("grants")
    @classmethod
    def _grants(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for table, cols in v.items():
            # which tables exist is the dictionary's to say (load_registry checks against it)
            if not re.fullmatch(TABLE_NAME, table):
                raise ValueError(f"{table!r} is not a table name")
            if not cols:
                raise ValueError(f"table {table!r} is granted with no columns")
        return v

    @model_validator(mode="after")
    def _dates(self) -> Project:
        if self.end_date <= self.start_date:
            raise ValueError("end_date must be after start_date")
        names = [m.username for m in self.members]
        if len(names) != len(set(names)):
            raise ValueError("a member is listed twice")
        return self

    def is_active(self, on: dt.date | None = None) -> bool:
        on = on or dt.date.today()
        return self.status == ProjectStatus.active and self.start_date <= on <= self.end_date

    def member_names(self) -> set[str]:
        return {m.username for m in self.members}


class Staff(_Strict):
    """Who checks outputs and who administers the TRE (``policies/staff.yaml``)."""

    output_checkers: list[Annotated[str, Field(pattern=USERNAME)]] = Field(default_factory=list)
    admins: list[Annotated[str, Field(pattern=USERNAME)]] = Field(default_factory=list)


@dataclass(frozen=True)
class Problem:
    file: Path
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.field or '(file)'}: {self.message}"


class RegistryError(ValueError):
    """One or more declaration files are invalid; ``problems`` names file, field and problem."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def _load_yaml(path: Path) -> tuple[dict | None, list[Problem]]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        return None, [Problem(path, "", f"not valid YAML: {exc}")]
    if not isinstance(data, dict):
        return None, [Problem(path, "", "must be a mapping of fields")]
    return data, []


def validate_file(model: type[M], path: Path) -> tuple[M | None, list[Problem]]:
    """One YAML declaration read and validated as ``model``: the model, or every problem named
    by file, field and message."""
    data, problems = _load_yaml(path)
    if data is None:
        return None, problems
    try:
        return model.model_validate(data), []
    except ValidationError as exc:
        return None, [
            Problem(path, ".".join(str(p) for p in err["loc"]), err["msg"]) for err in exc.errors()
        ]


@dataclass(frozen=True)
class Registry:
    sites: dict[str, Site]
    projects: dict[str, Project]
    staff: Staff

    def sites_for(self, project: Project, on: dt.date | None = None) -> list[Site]:
        """Sites whose sharing conditions allow this project (and its row filters)."""
        on = on or dt.date.today()
        chosen = project.row_filters.sites
        return [
            s
            for s in self.sites.values()
            if s.allows(project.purpose, project.jurisdiction, on)
            and (chosen is None or s.id in chosen)
        ]

    def projects_of(self, username: str, on: dt.date | None = None) -> list[Project]:
        """Active projects this user is a member of."""
        return [
            p for p in self.projects.values() if p.is_active(on) and username in p.member_names()
        ]


def dictionary_tables(policies_dir: Path) -> tuple[str, ...]:
    """The tables the data dictionary declares (read as plain YAML: the registry is loaded by
    the hub and the airlock, which need no dataframe library). A missing or unreadable
    dictionary gives the core tables: `tre policy validate` is where it is reported."""
    try:
        loaded = yaml.safe_load((policies_dir / "dictionary.yaml").read_text(encoding="utf-8"))
        declared = tuple(str(t) for t in loaded["tables"])
    except (OSError, yaml.YAMLError, TypeError, KeyError, UnicodeDecodeError):
        return CORE_TABLES
    return declared or CORE_TABLES


def load_registry(policies_dir: Path) -> Registry:
    """Load and cross-check every declaration; raise RegistryError naming each problem."""
    problems: list[Problem] = []
    sites: dict[str, Site] = {}
    projects: dict[str, Project] = {}
    tables = dictionary_tables(policies_dir)
    for path in sorted((policies_dir / "sites").glob("*.yaml")):
        site, errs = validate_file(Site, path)
        problems += errs
        if site is not None:
            if site.id in sites:
                problems.append(Problem(path, "id", f"site {site.id!r} is declared twice"))
            if path.stem != site.id:
                problems.append(Problem(path, "id", f"must match the file name ({path.stem!r})"))
            sites[site.id] = site
    for path in sorted((policies_dir / "projects").glob("*.yaml")):
        project, errs = validate_file(Project, path)
        problems += errs
        if project is not None:
            if project.id in projects:
                problems.append(Problem(path, "id", f"project {project.id!r} is declared twice"))
            if path.stem != project.id:
                problems.append(Problem(path, "id", f"must match the file name ({path.stem!r})"))
            for table in project.grants:
                if table not in tables:
                    problems.append(
                        Problem(
                            path,
                            "grants",
                            f"unknown table {table!r}; the data dictionary's tables are "
                            f"{', '.join(tables)}",
                        )
                    )
            for s in project.row_filters.sites or []:
                if s not in sites:
                    problems.append(Problem(path, "row_filters.sites", f"unknown site {s!r}"))
            projects[project.id] = project
    staff_path = policies_dir / "staff.yaml"
    staff = Staff()
    if staff_path.exists():
        loaded, errs = validate_file(Staff, staff_path)
        problems += errs
        staff = loaded or staff
    if problems:
        raise RegistryError(problems)
    return Registry(sites=sites, projects=projects, staff=staff)

"""Validate every declaration under ``policies/`` and publish their JSON Schemas.

One pass over: sites, projects and staff (``tre.registry``), the disclosure policy and each
project's overrides of it (``airlock.policy.Policy``), the airlock's retention policy
(``airlock.retention.RetentionPolicy``), the core data dictionary
(``tre.dictionary``), and the cross-checks between them (a project may only be granted columns
the dictionary defines). Every problem names the file, the field and what is wrong.

The JSON Schemas are generated from the same pydantic models that validate, so the published
schema (``docs/schemas/``) and the validator cannot disagree.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tre.registry import Problem, Project, Registry, RegistryError, Site, Staff, load_registry

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def _loc(err: dict[str, Any]) -> str:
    return ".".join(str(p) for p in err["loc"])


def _dictionary_models() -> tuple[type[BaseModel] | None, Any]:
    try:
        from tre import dictionary
    except ImportError:  # the dictionary module lands with the data-model branch
        return None, None
    return dictionary.DataDictionary, dictionary


def validate_policies(policies_dir: Path) -> tuple[Registry | None, list[Problem]]:
    """Every problem in ``policies_dir`` (empty list: all valid)."""
    problems: list[Problem] = []
    registry: Registry | None = None
    try:
        registry = load_registry(policies_dir)
    except RegistryError as exc:
        problems += exc.problems

    # the disclosure policy and every project's overrides of it
    from airlock.policy import Policy

    disclosure = policies_dir / "disclosure.yaml"
    base: dict[str, Any] | None = None
    if not disclosure.exists():
        problems.append(Problem(disclosure, "", "missing: the disclosure policy is required"))
    else:
        try:
            loaded = yaml.safe_load(disclosure.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            loaded = None
            problems.append(Problem(disclosure, "", f"not valid YAML: {exc}"))
        if loaded is not None and not isinstance(loaded, dict):
            problems.append(Problem(disclosure, "", "must be a mapping of fields"))
        elif isinstance(loaded, dict):
            try:
                Policy.model_validate(loaded)
                base = loaded
            except ValidationError as exc:
                problems += [Problem(disclosure, _loc(e), e["msg"]) for e in exc.errors()]
    if base is not None and registry is not None:
        for project in registry.projects.values():
            if not project.disclosure:
                continue
            path = policies_dir / "projects" / f"{project.id}.yaml"
            try:
                Policy.model_validate({**base, **project.disclosure})
            except ValidationError as exc:
                problems += [Problem(path, f"disclosure.{_loc(e)}", e["msg"]) for e in exc.errors()]

    # the airlock's retention policy
    from airlock.retention import retention_problems

    problems += retention_problems(policies_dir)[1]

    # the data dictionary, and project grants against it
    model, dictionary = _dictionary_models()
    dict_path = policies_dir / "dictionary.yaml"
    if dictionary is not None and dict_path.exists():
        try:
            dd = dictionary.load_dictionary(dict_path)
        except dictionary.DictionaryError as exc:
            lines = str(exc).split("\n")
            for line in lines[1:] or lines:
                field, _, message = line.partition(": ")
                problems.append(Problem(dict_path, field if message else "", message or line))
            dd = None
        if dd is not None and registry is not None:
            problems += _check_grants(policies_dir, registry, dd)
            problems += _check_site_mappings(policies_dir, registry, dd)
    elif dictionary is not None:
        problems.append(Problem(dict_path, "", "missing: the core data dictionary is required"))
    return (registry if not problems else None), problems


def _check_site_mappings(policies_dir: Path, registry: Registry, dd: Any) -> list[Problem]:
    """Each site's own column names and local codes against the dictionary."""
    from tre.ingest import site_mapping_problems

    return [
        Problem(policies_dir / "sites" / f"{site.id}.yaml", field, message)
        for site in registry.sites.values()
        for field, message in site_mapping_problems(site, dd)
    ]


def _check_grants(policies_dir: Path, registry: Registry, dd: Any) -> list[Problem]:
    problems = []
    for project in registry.projects.values():
        path = policies_dir / "projects" / f"{project.id}.yaml"
        for table, cols in project.grants.items():
            if table not in dd.tables:
                problems.append(Problem(path, f"grants.{table}", "not in the data dictionary"))
                continue
            known = set(dd.pooled_columns(table))
            for col in cols:
                if col != "*" and col not in known:
                    problems.append(
                        Problem(
                            path,
                            f"grants.{table}",
                            f"unknown column {col!r}; {table} has {', '.join(sorted(known))}",
                        )
                    )
    return problems


def schemas() -> dict[str, dict[str, Any]]:
    """JSON Schemas of every declaration file, generated from the validating models."""
    from airlock.policy import Policy
    from airlock.retention import RetentionPolicy

    models: dict[str, tuple[type[BaseModel], str]] = {
        "site": (Site, "policies/sites/<id>.yaml: a contributing site and its conditions"),
        "project": (Project, "policies/projects/<id>.yaml: an approved project"),
        "staff": (Staff, "policies/staff.yaml: output checkers and admins"),
        "disclosure": (Policy, "policies/disclosure.yaml: the disclosure policy"),
        "retention": (
            RetentionPolicy,
            "policies/retention.yaml: what the airlock deletes, and when",
        ),
    }
    dd_model, _ = _dictionary_models()
    if dd_model is not None:
        models["dictionary"] = (dd_model, "policies/dictionary.yaml: the core data dictionary")
    out = {}
    for name, (model, title) in models.items():
        schema = model.model_json_schema(mode="validation")
        out[name] = {"$schema": SCHEMA_DIALECT, "$id": f"{name}.schema.json", **schema}
        out[name]["description"] = title + (
            "\n\n" + schema["description"] if schema.get("description") else ""
        )
    return out


def render_schemas() -> dict[str, str]:
    """File name -> text, exactly as written under docs/schemas/."""
    return {
        f"{name}.schema.json": json.dumps(schema, indent=2, sort_keys=True) + "\n"
        for name, schema in schemas().items()
    }


def write_schemas(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render_schemas().items():
        path = out_dir / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def stale_schemas(out_dir: Path) -> list[str]:
    """Names of published schemas that differ from the models (or are missing)."""
    return [
        name
        for name, text in render_schemas().items()
        if not (out_dir / name).exists() or (out_dir / name).read_text(encoding="utf-8") != text
    ]

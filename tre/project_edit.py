"""Edit project declarations (``policies/projects/<id>.yaml``) the way an admin would by hand.

ruamel.yaml's round-trip mode keeps comments, key order and quoting, so a file edited by a
command reads like one edited in an editor. Every edit is validated against the WHOLE registry
(a copy of ``policies/`` with the edited file in place) before the real file is replaced
atomically: an invalid edit raises ``RegistryError`` naming file, field and problem, and changes
nothing.
"""

from __future__ import annotations

import datetime as dt
import io
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from tre.dictionary import DataDictionary, DictionaryError, load_dictionary
from tre.policy_validate import _check_grants
from tre.provision import atomic_write_text
from tre.registry import (
    SLUG,
    Problem,
    Registry,
    RegistryError,
    load_registry,
)


def _yaml() -> YAML:
    y = YAML(typ="rt")
    y.preserve_quotes = True
    y.width = 100
    y.indent(mapping=2, sequence=4, offset=2)
    return y


def project_file(policies_dir: Path, project_id: str) -> Path:
    import re

    if not re.fullmatch(SLUG, project_id):
        raise RegistryError(
            [Problem(policies_dir / "projects", "id", f"{project_id!r} is not a valid project id")]
        )
    return policies_dir / "projects" / f"{project_id}.yaml"


def _validate_with(policies_dir: Path, path: Path, text: str) -> Registry:
    """Load the registry as it would be with ``text`` in ``path``; raise on any problem."""
    with tempfile.TemporaryDirectory(prefix="tre-policies-") as tmp:
        copy = Path(tmp) / "policies"
        shutil.copytree(policies_dir, copy, symlinks=False)
        target = copy / path.relative_to(policies_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        try:
            registry = load_registry(copy)
            # grants are checked against the dictionary here too, not first at the next
            # extract build (which fails and, until then, keeps the old extract)
            dictionary = _dictionary(copy)
            problems = _check_grants(copy, registry, dictionary) if dictionary else []
            if problems:
                raise RegistryError(problems)
            return registry
        except RegistryError as exc:
            # name the real file, not the temporary copy
            raise RegistryError(
                [
                    Problem(policies_dir / p.file.relative_to(copy), p.field, p.message)
                    for p in exc.problems
                ]
            ) from None


def _dictionary(policies_dir: Path) -> DataDictionary | None:
    """The data dictionary, or None when it cannot be read (``tre policy validate`` says why)."""
    try:
        return load_dictionary(policies_dir / "dictionary.yaml")
    except DictionaryError:
        return None


def _dump(data: Any) -> str:
    buf = io.StringIO()
    _yaml().dump(data, buf)
    return buf.getvalue()


def edit_project(
    policies_dir: Path, project_id: str, mutate: Callable[[CommentedMap], None]
) -> Registry:
    """Apply ``mutate`` to the project's declaration, validate, and save; return the registry."""
    path = project_file(policies_dir, project_id)
    if not path.exists():
        raise RegistryError([Problem(path, "", f"no project {project_id!r} is declared")])
    data = _yaml().load(path.read_text(encoding="utf-8"))
    if not isinstance(data, CommentedMap):
        raise RegistryError([Problem(path, "", "must be a mapping of fields")])
    mutate(data)
    text = _dump(data)
    registry = _validate_with(policies_dir, path, text)
    atomic_write_text(path, text)
    return registry


def create_project(policies_dir: Path, fields: dict[str, Any]) -> Registry:
    """Write a new declaration (refusing to overwrite one)."""
    pid = str(fields.get("id", ""))
    path = project_file(policies_dir, pid)
    if path.exists():
        raise RegistryError([Problem(path, "id", f"project {pid!r} is already declared")])
    data = CommentedMap()
    for key, value in fields.items():
        if key == "members" and isinstance(value, list):
            # one line per member, like the hand-written declarations
            data[key] = CommentedSeq(
                _member_map(m["username"], m.get("role", "researcher"), m.get("institution"))
                if isinstance(m, dict) and "username" in m
                else _to_yaml(m)
                for m in value
            )
        else:
            data[key] = _to_yaml(value)
    text = _dump(data)
    registry = _validate_with(policies_dir, path, text)
    atomic_write_text(path, text)
    return registry


def _to_yaml(value: Any) -> Any:
    if isinstance(value, dict):
        out = CommentedMap()
        for k, v in value.items():
            out[k] = _to_yaml(v)
        return out
    if isinstance(value, list | tuple):
        seq = CommentedSeq(_to_yaml(v) for v in value)
        if all(not isinstance(v, dict | list) for v in value):
            seq.fa.set_flow_style()  # short lists of scalars read best inline: [a, b]
        return seq
    return value


def _member_map(
    username: str, role: str, institution: str | None
) -> CommentedMap:  # one flow-style mapping per member, like the hand-written files
    m = CommentedMap()
    m["username"] = username
    m["role"] = role
    if institution:
        m["institution"] = institution
    m.fa.set_flow_style()
    return m


def add_member(
    policies_dir: Path,
    project_id: str,
    username: str,
    role: str = "researcher",
    institution: str | None = None,
) -> Registry:
    def mutate(data: CommentedMap) -> None:
        members = data.setdefault("members", CommentedSeq())
        for m in members:
            if isinstance(m, dict) and m.get("username") == username:
                raise RegistryError(
                    [
                        Problem(
                            project_file(policies_dir, project_id),
                            "members",
                            f"{username!r} is already a member",
                        )
                    ]
                )
        members.append(_member_map(username, role, institution))

    return edit_project(policies_dir, project_id, mutate)


def remove_member(policies_dir: Path, project_id: str, username: str) -> Registry:
    def mutate(data: CommentedMap) -> None:
        members = data.get("members") or []
        keep = [m for m in members if not (isinstance(m, dict) and m.get("username") == username)]
        if len(keep) == len(members):
            raise RegistryError(
                [
                    Problem(
                        project_file(policies_dir, project_id),
                        "members",
                        f"{username!r} is not a member",
                    )
                ]
            )
        # delete in place so the comments attached to the other entries survive
        for i in reversed(range(len(members))):
            m = members[i]
            if isinstance(m, dict) and m.get("username") == username:
                del members[i]

    return edit_project(policies_dir, project_id, mutate)


def grant(
    policies_dir: Path, project_id: str, table: str, columns: list[str], revoke: bool = False
) -> Registry:
    """Grant (or with ``revoke`` take away) columns of a table; ``['*']`` means every column."""

    path = project_file(policies_dir, project_id)

    def mutate(data: CommentedMap) -> None:
        grants = data.setdefault("grants", CommentedMap())
        current = list(grants.get(table) or [])
        if revoke and "*" in current and columns and set(columns) != {"*"}:
            # '*' holds every column: taking some away leaves the others, named one by one
            # (before, the '*' stayed and the revocation was a silent no-op, audited as done)
            dictionary = _dictionary(policies_dir)
            if dictionary is None or table not in dictionary.tables:
                raise RegistryError(
                    [Problem(path, f"grants.{table}", "is granted '*' and the data dictionary "
                             "cannot be read to list its columns; edit the file instead")]
                )  # fmt: skip
            current = dictionary.pooled_columns(table)
        if revoke:
            absent = [c for c in columns if c != "*" and c not in current]
            if absent:
                raise RegistryError(
                    [Problem(path, f"grants.{table}", f"not granted, cannot be revoked: "
                             f"{', '.join(map(repr, absent))}")]
                )  # fmt: skip
            remaining = [c for c in current if c not in columns]
            if not columns or set(columns) == {"*"} or not remaining:
                grants.pop(table, None)
            else:
                grants[table] = _to_yaml(remaining)
        else:
            merged = ["*"] if "*" in columns else current + [c for c in columns if c not in current]
            grants[table] = _to_yaml(merged)

    return edit_project(policies_dir, project_id, mutate)


def set_status(policies_dir: Path, project_id: str, status: str) -> Registry:
    def mutate(data: CommentedMap) -> None:
        data["status"] = status

    return edit_project(policies_dir, project_id, mutate)


def set_end_date(policies_dir: Path, project_id: str, end_date: dt.date) -> Registry:
    def mutate(data: CommentedMap) -> None:
        data["end_date"] = end_date

    return edit_project(policies_dir, project_id, mutate)

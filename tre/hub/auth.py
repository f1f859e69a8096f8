"""Login for the TRE hub: who may log in, and which hub groups they get.

Two authenticators share one rule, checked against the TRE registry (``policies/``):
a person may log in only while they are a member of an *active* project, an output checker
or an admin. Their hub groups follow from the registry:

- ``project-<id>`` for every active project they are a member of,
- ``output-checkers`` if they are listed in ``policies/staff.yaml`` as an output checker,
- ``tre-admins`` if they are listed there as an admin: that group holds the ``tre-admin`` role
  (``tre.hub.roles``: the admin page, stopping servers; no access to anyone's server, no tokens
  for others). Nobody is ever a JupyterHub admin: every login and refresh sets ``admin`` False.

``TREOIDCAuthenticator`` (production) additionally requires the identity provider to agree:
a project group is granted only when the IdP also puts the user in ``tre-project-<id>`` (or a
group mapped to it), and likewise for the checker and admin roles. ``TRELocalAuthenticator``
(the embedded default) checks a password against a scrypt hash in a file under the state dir.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
import time
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jupyterhub.auth import Authenticator
from oauthenticator.generic import GenericOAuthenticator
from tornado import web
from traitlets import Bool, Dict, Float, Instance, Int, TraitError, Unicode, default, validate

from tre.hub.roles import ADMINS_GROUP, CHECKERS_GROUP  # tre-admins holds the tre-admin role
from tre.provision import GROUP_PREFIX as PROJECT_GROUP_PREFIX  # the one naming rule
from tre.registry import USERNAME, Registry, load_registry

# --------------------------------------------------------------------------------------------
# The registry rule shared by both authenticators
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Access:
    """What the registry (optionally narrowed by the identity provider) grants one person."""

    username: str
    projects: frozenset[str] = field(default_factory=frozenset)
    checker: bool = False
    admin: bool = False

    @property
    def registered(self) -> bool:
        return bool(self.projects) or self.checker or self.admin

    def hub_groups(self) -> list[str]:
        groups = {PROJECT_GROUP_PREFIX + p for p in self.projects}
        if self.checker:
            groups.add(CHECKERS_GROUP)
        if self.admin:
            groups.add(ADMINS_GROUP)
        return sorted(groups)

    def narrowed_to(self, projects: Iterable[str], checker: bool, admin: bool) -> Access:
        """Only what both the registry and the identity provider grant."""
        return Access(
            username=self.username,
            projects=self.projects & frozenset(projects),
            checker=self.checker and checker,
            admin=self.admin and admin,
        )


def registry_access(registry: Registry, username: str, on: dt.date | None = None) -> Access:
    """What the registry grants ``username`` today (or ``on``)."""
    return Access(
        username=username,
        projects=frozenset(p.id for p in registry.projects_of(username, on)),
        checker=username in registry.staff.output_checkers,
        admin=username in registry.staff.admins,
    )


def refusal_message(username: str) -> str:
    return (
        f"{username!r} is not registered in this trusted research environment: only members of "
        "an active project, output checkers and administrators may log in. If you were recently "
        "approved, ask the TRE administrators to add you to the project declaration."
    )


def _default_policies_dir() -> str:
    from tre.settings import get_settings

    return str(get_settings().policies_dir)


def _default_secrets_dir() -> Path:
    """Where the generated hub config and the `tre hub` commands keep these files."""
    from tre.hub.config import password_file
    from tre.settings import get_settings

    return password_file(get_settings()).parent


# --------------------------------------------------------------------------------------------
# Password file (local demo accounts)
# --------------------------------------------------------------------------------------------

# scrypt parameters: N=2**15, r=8 costs 32 MiB and ~0.1 s per check on the demo machine, enough to
# make offline guessing expensive without making login slow. Stored per hash, so they can grow.
SCRYPT_N = 2**15
SCRYPT_R = 8
SCRYPT_P = 1
_SCRYPT_MAXMEM = 128 * 1024 * 1024
MAX_PASSWORD_LENGTH = 1024


class PasswordError(ValueError):
    """A password or user name that may not be stored; nothing was changed."""


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=_SCRYPT_MAXMEM, dklen=32
    )
    b64 = base64.b64encode
    return f"scrypt${n}${r}${p}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        actual = hashlib.scrypt(
            password.encode("utf-8"),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            maxmem=_SCRYPT_MAXMEM,
            dklen=len(expected),
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


# Password checks run in two worker threads: scrypt costs ~0.1 s and 32 MiB, so checking in the
# hub's event loop would stall every user's request during each login attempt, and unbounded
# concurrency would let a burst of attempts exhaust memory.
_SCRYPT_WORKERS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tre-scrypt")

# A hash of a random password, checked when the user is unknown so that a wrong name costs the
# same time as a wrong password (no user enumeration by timing).
_DUMMY_HASH = hash_password(secrets.token_urlsafe(16))


def _write_json_0600(path: Path, data: dict) -> None:
    """Replace ``path`` atomically with ``data`` (mode 0600): a crash leaves old or new."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _exclusive_lock(path: Path) -> Any:
    """An exclusive lock beside ``path`` (released when the returned file is closed)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_WRONLY | os.O_CREAT, 0o600)
    lock = os.fdopen(fd, "a")
    fcntl.flock(lock, fcntl.LOCK_EX)
    return lock


def _read_name_map(path: Path, key: str, what: str) -> dict[str, str]:
    """``{key: {name: value}}`` from a 0600 JSON file (the password and subject files)."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PasswordError(f"{path}: not a valid {what}: {exc}") from exc
    mapping = data.get(key) if isinstance(data, dict) else None
    if not isinstance(mapping, dict):
        raise PasswordError(f"{path}: not a valid {what} (no '{key}' mapping)")
    return {str(k): str(v) for k, v in mapping.items()}


def _write_name_map(path: Path, key: str, mapping: dict[str, str]) -> None:
    _write_json_0600(path, {key: dict(sorted(mapping.items()))})


class PasswordFile:
    """Local accounts: ``{"users": {name: scrypt-hash}}`` in a 0600 JSON file.

    Writes take an exclusive lock and replace the file atomically, so a crash leaves either the
    old or the new file, never a torn one.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def _read(self) -> dict[str, str]:
        return _read_name_map(self.path, "users", "password file")

    def usernames(self) -> list[str]:
        return sorted(self._read())

    def verify(self, username: str, password: str) -> bool:
        """True only for a known user with the right, non-empty password."""
        if len(password) > MAX_PASSWORD_LENGTH:
            return False  # never hash megabytes on behalf of an anonymous client
        try:
            stored = self._read().get(username)
        except PasswordError:
            stored = None
        if not password or stored is None:
            verify_password(password or "x", _DUMMY_HASH)  # same cost either way
            return False
        return verify_password(password, stored)

    def _write(self, users: dict[str, str]) -> None:
        _write_name_map(self.path, "users", users)

    def _locked(self) -> Any:
        return _exclusive_lock(self.path)

    def set_password(self, username: str, password: str, *, min_length: int = 12) -> None:
        if not re.fullmatch(USERNAME, username):
            raise PasswordError(
                f"{username!r} is not a valid user name (lower-case letters, digits, '.', '_', '-')"
            )
        if len(password) < min_length:
            raise PasswordError(f"the password must have at least {min_length} characters")
        if len(password) > MAX_PASSWORD_LENGTH:
            raise PasswordError(f"the password must have at most {MAX_PASSWORD_LENGTH} characters")
        new_hash = hash_password(password)
        with self._locked():
            users = self._read()
            users[username] = new_hash
            self._write(users)

    def remove(self, username: str) -> bool:
        with self._locked():
            users = self._read()
            if users.pop(username, None) is None:
                return False
            self._write(users)
            return True


def generate_password() -> str:
    """A random password for a demo account (about 96 bits)."""
    return secrets.token_urlsafe(12)


def ensure_accounts(path: Path | str, usernames: Iterable[str]) -> dict[str, str]:
    """Create a local account with a generated password for each user that has none.

    Returns ``{name: password}`` for the accounts created now (for the demo to print once);
    existing accounts keep their passwords and are not returned.
    """
    password_file = PasswordFile(path)
    existing = set(password_file.usernames())
    created: dict[str, str] = {}
    for name in sorted(set(usernames) - existing):
        password = generate_password()
        password_file.set_password(name, password)
        created[name] = password
    return created


class SubjectBindings:
    """Which identity-provider subject (``sub``) owns each TRE user name: ``{"subjects": {name:
    sub}}`` in a 0600 JSON file, written like the password file.

    The user name comes from a claim (``preferred_username`` by default) that some identity
    providers let users edit; ``sub`` is the IdP's stable, never reassigned identifier. The first
    login of a name records its ``sub``; a later login of that name with another ``sub`` (someone
    who renamed themselves to an existing user) is refused.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def _read(self) -> dict[str, str]:
        return _read_name_map(self.path, "subjects", "subject file")

    def subjects(self) -> dict[str, str]:
        return self._read()

    def bind(self, username: str, subject: str) -> bool:
        """True if ``username`` is (now) bound to ``subject``; False if bound to another."""
        current = self._read().get(username)
        if current is not None:
            return hmac.compare_digest(current.encode(), subject.encode())
        with _exclusive_lock(self.path):
            subjects = self._read()
            current = subjects.setdefault(username, subject)
            if current == subject:
                _write_name_map(self.path, "subjects", subjects)
        return current == subject

    def unbind(self, username: str) -> bool:
        with _exclusive_lock(self.path):
            subjects = self._read()
            if subjects.pop(username, None) is None:
                return False
            _write_name_map(self.path, "subjects", subjects)
            return True


class LoginThrottle:
    """Exponential backoff per user name after repeated wrong passwords.

    After ``free_failures`` consecutive failures for a name, attempts for that name are refused
    unchecked for 1, 2, 4, ... seconds (at most ``max_delay``) after the last failure; a right
    password (outside the delay) resets it. Keyed by the name only, known or not (so it says
    nothing about which accounts exist), not by client address: behind the proxy the address
    comes from X-Forwarded-For/X-Real-Ip headers that a client can set. The price is that
    someone hammering a name also delays its owner, by at most ``max_delay`` after they stop.
    """

    def __init__(
        self,
        free_failures: int = 5,
        max_delay: float = 300.0,
        max_names: int = 10_000,
        clock: Any = time.monotonic,
    ) -> None:
        self.free_failures = free_failures
        self.max_delay = max_delay
        self.max_names = max_names  # bounds memory under a spray of made-up names
        self.clock = clock
        self._failures: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def wait_seconds(self, username: str) -> float:
        """Seconds before ``username`` may be checked again (0: now)."""
        count, last = self._failures.get(username, (0, 0.0))
        if count < self.free_failures:
            return 0.0
        delay = min(self.max_delay, 2.0 ** (count - self.free_failures))
        return max(0.0, last + delay - self.clock())

    def failed(self, username: str) -> None:
        count, _ = self._failures.pop(username, (0, 0.0))
        self._failures[username] = (count + 1, self.clock())
        while len(self._failures) > self.max_names:
            self._failures.popitem(last=False)

    def succeeded(self, username: str) -> None:
        self._failures.pop(username, None)


# --------------------------------------------------------------------------------------------
# Authenticators
# --------------------------------------------------------------------------------------------


def _refuse_admin_users(proposal: Any) -> set:
    """``Authenticator.admin_users`` would make those users JupyterHub admins at every start (all
    scopes: any researcher's server, tokens as anyone); TRE admins have the tre-admin role."""
    if proposal["value"]:
        raise TraitError(
            "admin_users cannot be set in the TRE: nobody is a JupyterHub admin; TRE admins "
            "(policies/staff.yaml) get the tre-admin role through the tre-admins group"
        )
    return set()


class _RegistryMixin:
    """Registry loading and the refusal rule; used by both authenticators."""

    log: Any
    policies_dir: str

    def load_registry(self) -> Registry:
        # Loaded per login: the declarations are small, and a closed project takes effect at once.
        return load_registry(Path(self.policies_dir))

    def refuse_unregistered(self, access: Access) -> None:
        if not access.registered:
            self.log.warning("Login refused: %r is not registered in the TRE", access.username)
            raise web.HTTPError(403, refusal_message(access.username))


class TRELocalAuthenticator(_RegistryMixin, Authenticator):
    """Local accounts with scrypt-hashed passwords (the embedded default, for demos).

    Accounts are created with ``tre hub add-user NAME`` (or by the demo, which prints the
    generated passwords). A correct password is necessary but not sufficient: the user must also
    be registered in ``policies/``.
    """

    password_file = Unicode(
        config=True,
        help="JSON file of scrypt password hashes (default: beside the HMAC key, hub-users.json).",
    )
    policies_dir = Unicode(
        config=True, help="Directory of the TRE registry (sites, projects, staff.yaml)."
    )
    manage_groups = Bool(
        True, config=True, help="Hub groups follow the registry (always on in the TRE)."
    )
    allow_all = Bool(False, config=True, help="Must stay False: the registry is the allow list.")
    login_free_failures = Int(
        5,
        config=True,
        help="Wrong passwords for one user name before its login attempts are delayed.",
    )
    login_max_delay_seconds = Float(
        300.0,
        config=True,
        help="Longest delay between login attempts for one user name (doubling from 1 s).",
    )
    throttle = Instance(LoginThrottle)

    @default("throttle")
    def _default_throttle(self) -> LoginThrottle:
        return LoginThrottle(self.login_free_failures, self.login_max_delay_seconds)

    @default("refresh_pre_spawn")
    def _default_refresh_pre_spawn(self) -> bool:
        return True  # re-check the registry before every spawn

    @default("password_file")
    def _default_password_file(self) -> str:
        return str(_default_secrets_dir() / "hub-users.json")

    @default("policies_dir")
    def _default_policies_dir(self) -> str:
        return _default_policies_dir()

    @validate("allow_all")
    def _no_allow_all(self, proposal: Any) -> bool:
        if proposal["value"]:
            raise TraitError("allow_all cannot be enabled in the TRE: the registry decides")
        return False

    @validate("admin_users")
    def _no_admin_users(self, proposal: Any) -> set:
        return _refuse_admin_users(proposal)

    @validate("manage_groups")
    def _always_manage_groups(self, proposal: Any) -> bool:
        if not proposal["value"]:
            raise TraitError("manage_groups must be True in the TRE: groups follow the registry")
        return True

    async def authenticate(self, handler: Any, data: dict) -> dict | None:
        username = self.normalize_username((data or {}).get("username") or "")
        password = (data or {}).get("password") or ""
        if not username or not password:
            return None
        wait = self.throttle.wait_seconds(username)
        if wait > 0:
            self.log.warning("Login of %r delayed %.0f s after repeated failures", username, wait)
            raise web.HTTPError(
                429,
                "Too many failed logins for this user name: try again in "
                f"{max(1, round(wait))} seconds.",
            )
        # Counted as a failure before the check, so that concurrent attempts (queued for the
        # scrypt workers) cannot all slip in before the first of them has failed.
        self.throttle.failed(username)
        verify = PasswordFile(self.password_file).verify
        loop = asyncio.get_running_loop()
        if not await loop.run_in_executor(_SCRYPT_WORKERS, verify, username, password):
            return None
        self.throttle.succeeded(username)
        access = registry_access(self.load_registry(), username)
        self.refuse_unregistered(access)
        # never a JupyterHub admin (lowers anyone a former version made one): TRE admins get
        # their rights from the tre-admins group (tre.hub.roles)
        return {"name": username, "groups": access.hub_groups(), "admin": False}

    async def check_allowed(self, username: str, authentication: dict | None = None) -> bool:
        access = registry_access(self.load_registry(), username)
        self.refuse_unregistered(access)
        return True

    async def refresh_user(self, user: Any, handler: Any = None) -> bool | dict:
        """Re-read the registry: a removed member is logged out, groups follow changes."""
        access = registry_access(self.load_registry(), user.name)
        if not access.registered:
            return False
        return {"name": user.name, "groups": access.hub_groups(), "admin": False}


class TREOIDCAuthenticator(_RegistryMixin, GenericOAuthenticator):
    """OpenID Connect login, with the identity provider's groups checked against the registry.

    The IdP must put the user in ``<project_group_prefix><project-id>`` (or a group mapped to a
    project with ``group_mapping``) *and* the registry must list them as a member of that active
    project; the same two-key rule applies to the checker and admin roles. Anyone left with no
    role is refused with a message saying so.
    """

    policies_dir = Unicode(
        config=True, help="Directory of the TRE registry (sites, projects, staff.yaml)."
    )
    project_group_prefix = Unicode(
        "tre-project-",
        config=True,
        help="IdP groups named <prefix><project-id> grant membership of that project.",
    )
    checkers_idp_group = Unicode(
        "tre-output-checkers", config=True, help="IdP group of the output checkers."
    )
    admins_idp_group = Unicode("tre-admins", config=True, help="IdP group of the TRE admins.")
    group_mapping = Dict(
        key_trait=Unicode(),
        value_trait=Unicode(),
        config=True,
        help=(
            "Extra IdP group names and what they grant: 'project:<id>', 'checker' or 'admin'. "
            "For identity providers whose group names cannot follow the prefix convention."
        ),
    )
    require_idp_groups = Bool(
        True,
        config=True,
        help=(
            "Grant a role only if the IdP groups also grant it. Turn off only for an IdP that "
            "sends no group claim; the registry then decides alone."
        ),
    )
    idp_groups_key = Unicode(
        "oauth_user.groups",
        config=True,
        help="Dotted path of the IdP's group list in the auth state (userinfo by default).",
    )
    manage_groups = Bool(
        True, config=True, help="Hub groups follow the registry (always on in the TRE)."
    )
    allow_all = Bool(False, config=True, help="Must stay False: the registry is the allow list.")
    subjects_file = Unicode(
        config=True,
        help=(
            "JSON file binding each user name to the IdP subject (sub) of its first login "
            "(default: beside the HMAC key, hub-oidc-subjects.json)."
        ),
    )

    @default("policies_dir")
    def _default_policies_dir(self) -> str:
        return _default_policies_dir()

    @default("subjects_file")
    def _default_subjects_file(self) -> str:
        return str(_default_secrets_dir() / "hub-oidc-subjects.json")

    @default("refresh_pre_spawn")
    def _default_refresh_pre_spawn(self) -> bool:
        return True  # re-check the registry (and the IdP, with auth state) before every spawn

    @default("login_service")
    def _default_login_service(self) -> str:
        return "institutional login"

    @default("scope")
    def _default_scope(self) -> list[str]:
        return ["openid", "profile", "groups"]

    @default("username_claim")
    def _default_username_claim(self) -> str:
        return "preferred_username"

    @validate("allow_all")
    def _no_allow_all(self, proposal: Any) -> bool:
        if proposal["value"]:
            raise TraitError("allow_all cannot be enabled in the TRE: the registry decides")
        return False

    @validate("admin_users")
    def _no_admin_users(self, proposal: Any) -> set:
        return _refuse_admin_users(proposal)

    @validate("manage_groups")
    def _always_manage_groups(self, proposal: Any) -> bool:
        if not proposal["value"]:
            raise TraitError("manage_groups must be True in the TRE: groups follow the registry")
        return True

    @validate("group_mapping")
    def _check_mapping(self, proposal: Any) -> dict[str, str]:
        for idp_group, grant in proposal["value"].items():
            if grant not in {"checker", "admin"} and not re.fullmatch(
                r"project:[a-z][a-z0-9-]{1,38}[a-z0-9]", grant
            ):
                raise TraitError(
                    f"group_mapping[{idp_group!r}] = {grant!r}: "
                    "expected 'project:<id>', 'checker' or 'admin'"
                )
        return proposal["value"]

    def idp_grants(self, idp_groups: Iterable[str]) -> tuple[set[str], bool, bool]:
        """(projects, checker, admin) that the IdP's groups grant."""
        projects: set[str] = set()
        checker = admin = False
        for group in idp_groups:
            grant = self.group_mapping.get(group)
            if grant is None and group.startswith(self.project_group_prefix):
                grant = "project:" + group[len(self.project_group_prefix) :]
            if grant is None and group == self.checkers_idp_group:
                grant = "checker"
            if grant is None and group == self.admins_idp_group:
                grant = "admin"
            if grant == "checker":
                checker = True
            elif grant == "admin":
                admin = True
            elif grant is not None:
                projects.add(grant.split(":", 1)[1])
        return projects, checker, admin

    def raw_idp_groups(self, auth_state: dict) -> list[str]:
        node: Any = auth_state
        for key in self.idp_groups_key.split("."):
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, str):
            return [node]
        if not isinstance(node, list):
            return []
        return [str(g) for g in node]

    def user_info_to_username(self, user_info: dict) -> str:
        """The claim's value, only if it is already a TRE user name as declared.

        JupyterHub lower-cases names, and ``str.lower`` maps some non-ASCII letters to ASCII
        (the Kelvin sign to ``k``): without this check ``Alice`` or ``\u212aate`` at the IdP,
        possibly another person, would become the TRE users ``alice`` and ``kate``."""
        username = super().user_info_to_username(user_info)
        if not isinstance(username, str) or not re.fullmatch(USERNAME, username):
            self.log.warning("Login refused: IdP user name %r is not a TRE user name", username)
            raise web.HTTPError(
                403,
                f"The user name your identity provider sent, {username!r}, is not a TRE user "
                "name (lower-case letters, digits, '.', '_', '-'): ask the TRE administrators.",
            )
        return username

    def check_subject(self, username: str, user_info: dict) -> None:
        """Refuse ``username`` if it belongs to another IdP subject (see SubjectBindings)."""
        subject = user_info.get("sub")
        if not isinstance(subject, str) or not subject:
            raise web.HTTPError(
                403, "Your identity provider sent no subject ('sub') claim: login refused."
            )
        if not SubjectBindings(self.subjects_file).bind(username, subject):
            self.log.warning(
                "Login refused: %r is bound to another IdP subject than %r", username, subject
            )
            raise web.HTTPError(
                403,
                f"The TRE account {username!r} belongs to another identity at your identity "
                "provider. If your account there was replaced, ask the TRE administrators to "
                "release the name (tre hub oidc-unbind).",
            )

    async def update_auth_model(self, auth_model: dict) -> dict:
        auth_model = await super().update_auth_model(auth_model)
        registered = registry_access(self.load_registry(), auth_model["name"])
        access = registered
        if self.require_idp_groups:
            idp_groups = self.raw_idp_groups(auth_model.get("auth_state") or {})
            access = registered.narrowed_to(*self.idp_grants(idp_groups))
        if access.registered:
            # bound only by a login that is granted something: refused logins claim no name
            user_info = auth_model["auth_state"].get(self.user_auth_state_key) or {}
            self.check_subject(auth_model["name"], user_info)
        auth_model["auth_state"]["tre_groups"] = access.hub_groups()
        auth_model["auth_state"]["tre_registered"] = registered.registered
        # never a JupyterHub admin; TRE admins are in tre-admins (tre.hub.roles)
        auth_model["admin"] = False
        return auth_model

    async def get_user_groups(self, auth_state: dict) -> set[str]:
        # Hub groups are the registry-checked TRE groups, never the raw IdP groups.
        return set(auth_state.get("tre_groups", []))

    async def check_allowed(self, username: str, auth_model: dict | None) -> bool:
        if auth_model is None:  # JupyterHub < 5 calls this without a model for existing users
            return True
        state = auth_model.get("auth_state", {})
        if state.get("tre_groups"):
            return True
        if state.get("tre_registered"):
            # the registry knows them, but the IdP confirms none of their roles
            self.log.warning("Login refused: the IdP confirms no TRE role of %r", username)
            raise web.HTTPError(
                403,
                f"Your identity provider does not confirm any of your TRE roles, {username!r}: "
                f"ask your institution to add you to the group of your project (named "
                f"{self.project_group_prefix}<project-id>).",
            )
        self.refuse_unregistered(Access(username=username))
        return True

    async def refresh_user(self, user: Any, handler: Any = None, **kwargs: Any) -> bool | dict:
        refreshed = await super().refresh_user(user, handler, **kwargs)
        if isinstance(refreshed, dict):
            return refreshed if refreshed["auth_state"].get("tre_groups") else False
        if refreshed is True:
            # no auth state to re-ask the IdP: at least re-check the registry
            access = registry_access(self.load_registry(), user.name)
            if not access.registered:
                return False
            current = {g.name for g in user.groups}
            return {
                "name": user.name,
                # only ever lowered here (tre-admins included): raising needs the IdP's word
                "groups": sorted(current & set(access.hub_groups())),
                "admin": False,
            }
        return refreshed

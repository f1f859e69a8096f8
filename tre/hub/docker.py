"""Project sandboxes as Docker containers (the production spawner, used by docker-compose).

``TREDockerSpawner`` applies the same policy as the bubblewrap sandbox:

- one *named* server per project: the server name is the project id, and only a member of that
  active project may start it;
- networking: an ``internal: true`` network (no route out) that only the hub, the airlock and the
  proxy share. By default each sandbox gets its *own* such network, created at start and removed
  at stop (``isolate_sandboxes``), so sandboxes cannot reach each other either; otherwise all
  sandboxes share ``network_name``. DNS points at nothing outside the container;
- the project's extract alone, read-only, at ``/data/<project>.duckdb``; the project's workspace
  (one per project, shared by its members) read-write at ``/home/jovyan/work``;
- ``cap_drop=ALL``, ``no-new-privileges``, a read-only root filesystem with tmpfs for ``/tmp``
  and the home directory (caches, Jupyter runtime files), pids/memory/CPU limits, an init
  process, a non-root user;
- the image from configuration only, pinned by digest; users cannot choose one;
- containers are removed when they stop.

The policy values win over anything in ``extra_host_config`` / ``extra_create_kwargs``, and
options that would weaken it there (privileged, added capabilities, devices, host namespaces...)
are refused when the server starts.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from dockerspawner import DockerSpawner
from tornado import web
from traitlets import Bool, Dict, Integer, List, TraitError, Unicode, default, validate

from tre.hub.access import ProjectAccessDenied, check_can_start_project, extract_path
from tre.registry import Project, Registry, load_registry

PINNED_IMAGE = re.compile(r"^[a-z0-9][a-z0-9._/:-]*@sha256:[0-9a-f]{64}$")

# host-config keys that would weaken the sandbox; refused if an admin puts them in extra config
FORBIDDEN_HOST_CONFIG = frozenset(
    {
        "privileged",
        "cap_add",
        "devices",
        "device_requests",
        "device_cgroup_rules",
        "pid_mode",
        "ipc_mode",
        "uts_mode",
        "userns_mode",
        "cgroupns",
        "network_mode",
        "binds",
        "volumes_from",
        "links",
        "extra_hosts",
        "port_bindings",
        "publish_all_ports",
        "sysctls",
        "security_opt",
        "cap_drop",
        "read_only",
        "dns",
        "dns_search",
        "dns_opt",
        "runtime",
    }
)
FORBIDDEN_CREATE_KWARGS = frozenset({"user", "volumes", "host_config", "image", "ports"})


class TREDockerSpawner(DockerSpawner):
    """DockerSpawner with the TRE sandbox policy; see the module docstring."""

    _tre_project = ""  # set by start() after the registry check

    policies_dir = Unicode(
        config=True, help="Directory of the TRE registry (sites, projects, staff.yaml)."
    )
    extracts_volume = Unicode(
        "tre-extracts",
        config=True,
        help="Docker volume holding the per-project extracts, one <project>.duckdb file each.",
    )
    data_dir = Unicode("/data", config=True, help="Where the extract appears in the sandbox.")
    workspaces_volume = Unicode(
        "tre-workspaces",
        config=True,
        help="Docker volume of the project workspaces; each project uses the sub-path <project>.",
    )
    workspace_dir = Unicode(
        "/home/jovyan/work", config=True, help="Where the project workspace appears."
    )
    workspaces_local_dir = Unicode(
        "",
        config=True,
        help=(
            "Where the hub sees the workspaces volume (if mounted in the hub container): the "
            "hub creates <project>/ there before the first start, since a volume sub-path must "
            "exist. Empty: provisioning creates it."
        ),
    )
    extracts_local_dir = Unicode(
        config=True,
        help=(
            "Where the hub sees the extracts (the extracts volume, mounted read-only in the hub "
            "container): a project without <project>.duckdb there is refused before the engine "
            "is called. Default: settings.extracts_dir."
        ),
    )
    sandbox_user = Unicode(
        "1000:100", config=True, help="uid:gid of the notebook user (never root)."
    )
    pids_limit = Integer(512, config=True, help="Maximum number of processes in a sandbox.")
    tmpfs_size = Unicode("512m", config=True, help="Size of each tmpfs (/tmp, the home directory).")
    dns_servers = List(
        Unicode(),
        default_value=["127.0.0.1"],
        config=True,
        help=(
            "DNS servers of the sandbox. 127.0.0.1 has no resolver inside the container, so "
            "names outside the internal network never resolve (Docker's embedded DNS still "
            "answers for the hub and airlock containers on the internal network)."
        ),
    )
    airlock_url = Unicode(
        "http://airlock:8100", config=True, help="The airlock as the sandbox reaches it."
    )
    sandbox_environment = Dict(
        config=True, help="Extra environment for every sandbox (no secrets: users can read it)."
    )
    isolate_sandboxes = Bool(
        True,
        config=True,
        help=(
            "Give each sandbox its own internal network (created at start, removed at stop) "
            "joined only by the containers in sandbox_network_peers, so that sandboxes cannot "
            "reach one another. If False, every sandbox joins the shared network_name."
        ),
    )
    sandbox_network_peers = Dict(
        key_trait=Unicode(),
        value_trait=List(Unicode()),
        default_value={"tre-hub": ["hub"], "tre-airlock": ["airlock"], "tre-proxy": []},
        config=True,
        help=(
            "Containers connected to each sandbox's own network, with the DNS aliases the "
            "sandbox knows them by (the hub and the airlock; the proxy routes to the sandbox)."
        ),
    )
    refuse_user_options = Bool(
        True, config=True, help="Refuse any user options (image, etc.); always on in the TRE."
    )

    @default("policies_dir")
    def _default_policies_dir(self) -> str:
        from tre.settings import get_settings

        return str(get_settings().policies_dir)

    @default("extracts_local_dir")
    def _default_extracts_local_dir(self) -> str:
        from tre.settings import get_settings

        return str(get_settings().extracts_dir)

    # ---- DockerSpawner defaults that the policy fixes --------------------------------------

    @default("network_name")
    def _default_network_name(self) -> str:
        return "tre-sandboxes"

    @default("use_internal_ip")
    def _default_use_internal_ip(self) -> bool:
        return True

    @default("remove")
    def _default_remove(self) -> bool:
        return True

    @default("name_template")
    def _default_name_template(self) -> str:
        return "tre-{username}--{servername}"

    @default("mem_limit")
    def _default_mem_limit(self) -> str:
        return "4G"

    @default("cpu_limit")
    def _default_cpu_limit(self) -> float:
        return 2.0

    @default("notebook_dir")
    def _default_notebook_dir(self) -> str:
        return self.workspace_dir

    @default("options_form")
    def _default_options_form(self) -> str:
        return ""  # no choices: the project decides everything

    @validate("image")
    def _image_pinned(self, proposal: Any) -> str:
        image = proposal["value"]
        if not PINNED_IMAGE.match(image):
            raise TraitError(
                f"the sandbox image must be pinned by digest (name@sha256:<64 hex>), got {image!r}"
            )
        return image

    @validate("allowed_images")
    def _validate_allowed_images(self, proposal: Any) -> dict:  # replaces the parent's
        if proposal["value"]:
            raise TraitError("allowed_images must stay empty: users cannot choose an image")
        return {}

    @validate("remove")
    def _always_remove(self, proposal: Any) -> bool:
        if not proposal["value"]:
            raise TraitError("remove must stay True: sandboxes are removed when they stop")
        return True

    @validate("volumes", "read_only_volumes", "links")
    def _no_extra_volumes(self, proposal: Any) -> dict:
        if proposal["value"]:
            name = proposal["trait"].name
            raise TraitError(f"{name} must stay empty: the spawner mounts the project's data")
        return {}

    @validate("use_internal_ip")
    def _no_published_ports(self, proposal: Any) -> bool:
        if not proposal["value"]:
            raise TraitError("use_internal_ip must stay True: sandboxes publish no host ports")
        return True

    # ---- the policy ------------------------------------------------------------------------

    def load_registry(self) -> Registry:
        return load_registry(Path(self.policies_dir))

    def check_can_start(self) -> Project:
        """The project of this server; raises HTTPError if it may not be started."""
        if self.refuse_user_options and self.user_options:
            raise web.HTTPError(400, "Sandbox options cannot be chosen: the project decides")
        # the one rule shared with the bubblewrap spawner and the home page (tre.hub.access)
        try:
            return check_can_start_project(
                self.load_registry(), self.user.name, self.name, Path(self.extracts_local_dir)
            )
        except ProjectAccessDenied as exc:
            raise web.HTTPError(exc.status, exc.message) from None

    def can_start(self) -> bool:
        try:
            self.check_can_start()
        except web.HTTPError:
            return False
        return True

    def data_path(self, project_id: str) -> str:
        return f"{self.data_dir.rstrip('/')}/{project_id}.duckdb"

    def policy_mounts(self, project_id: str) -> list[dict]:
        return [
            {
                "type": "volume",
                "source": self.extracts_volume,
                "subpath": extract_path(Path(), project_id).name,  # the layout of tre.hub.access
                "target": self.data_path(project_id),
                "read_only": True,
                "no_copy": True,
            },
            {
                "type": "volume",
                "source": self.workspaces_volume,
                "subpath": project_id,
                "target": self.workspace_dir,
                "read_only": False,
                "no_copy": True,
            },
        ]

    def sandbox_network(self) -> str:
        """The network this sandbox joins: its own (isolated) or the shared one."""
        if not self.isolate_sandboxes:
            return self.network_name
        ns = self.template_namespace()
        return f"{self.network_name}-{ns['username']}--{ns['servername']}"

    def get_network_ip(self, network_settings: dict) -> str:
        networks = network_settings["Networks"]
        name = self.sandbox_network()
        if name not in networks:
            raise RuntimeError(f"sandbox container is not on its network {name!r}")
        return networks[name]["IPAddress"]

    async def _create_sandbox_network(self, project_id: str) -> None:
        import docker.errors

        name = self.sandbox_network()
        try:
            await self.docker("inspect_network", name)
        except docker.errors.NotFound:
            await self.docker(
                "create_network",
                name,
                driver="bridge",
                internal=True,  # no route out of the host
                labels={
                    "org.tre.project": project_id,
                    "org.tre.user": self.user.name,
                    "org.tre.component": "sandbox-network",
                },
            )
        for container, aliases in self.sandbox_network_peers.items():
            try:
                await self.docker(
                    "connect_container_to_network", container, name, aliases=aliases or None
                )
            except docker.errors.APIError as exc:
                # already connected (a restart after a crash) is fine; anything else is not
                if "already exists" not in str(exc):
                    raise

    async def _remove_sandbox_network(self) -> None:
        import docker.errors

        name = self.sandbox_network()
        for container in self.sandbox_network_peers:
            try:
                await self.docker("disconnect_container_from_network", container, name, force=True)
            except docker.errors.APIError as exc:
                self.log.debug("disconnect %s from %s: %s", container, name, exc)
        try:
            await self.docker("remove_network", name)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            self.log.warning("Could not remove sandbox network %s: %s", name, exc)

    def policy_host_config(self) -> dict:
        tmpfs_opts = f"rw,nosuid,nodev,noexec,size={self.tmpfs_size}"
        uid, _, gid = self.sandbox_user.partition(":")
        home_opts = f"rw,nosuid,nodev,size={self.tmpfs_size},uid={uid},gid={gid or uid}"
        config = {
            "network_mode": self.sandbox_network(),
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges:true"],
            "read_only": True,
            # paths inside the container, a private tmpfs each: the home directory (caches,
            # Jupyter runtime and settings) is ephemeral; only the workspace mounted inside it
            # persists
            "tmpfs": {"/tmp": tmpfs_opts, "/home/jovyan": home_opts},  # noqa: S108
            "pids_limit": self.pids_limit,
            "dns": list(self.dns_servers),
            "dns_search": ["."],  # "." = no search domain
            "privileged": False,
            "init": True,
            "ipc_mode": "private",
            "auto_remove": True,
        }
        if self.mem_limit:
            # no swap beyond the memory limit (DockerSpawner sets mem_limit itself)
            config["memswap_limit"] = self.mem_limit
        return config

    def sandbox_env(self, project_id: str) -> dict[str, str]:
        return {
            **{str(k): str(v) for k, v in self.sandbox_environment.items()},
            "TRE_PROJECT": project_id,
            "TRE_DATA_PATH": self.data_path(project_id),
            "TRE_WORKSPACE": self.workspace_dir,
            "TRE_AIRLOCK_URL": self.airlock_url,
            "HOME": "/home/jovyan",
            "XDG_CACHE_HOME": "/home/jovyan/.cache",
            "JUPYTER_RUNTIME_DIR": "/home/jovyan/.cache/jupyter-runtime",
            "IPYTHONDIR": "/home/jovyan/.cache/ipython",
            "MPLCONFIGDIR": "/home/jovyan/.cache/matplotlib",
        }

    def _check_extra_config(self) -> None:
        extra_host = self.extra_host_config if isinstance(self.extra_host_config, dict) else {}
        bad = FORBIDDEN_HOST_CONFIG & set(extra_host)
        extra_create = (
            self.extra_create_kwargs if isinstance(self.extra_create_kwargs, dict) else {}
        )
        bad |= FORBIDDEN_CREATE_KWARGS & set(extra_create)
        if callable(self.extra_host_config) or callable(self.extra_create_kwargs):
            bad.add("callable extra config")
        if bad:
            raise web.HTTPError(
                500, f"Sandbox configuration would weaken the policy: {', '.join(sorted(bad))}"
            )

    def get_env(self) -> dict[str, str]:
        env = super().get_env()
        project_id = self.name
        if project_id:
            env.update(self.sandbox_env(project_id))
        return env

    async def start(self) -> tuple[str, int]:
        project = self.check_can_start()
        self._check_extra_config()
        if self.workspaces_local_dir:
            workspace = Path(self.workspaces_local_dir) / project.id
            workspace.mkdir(mode=0o770, exist_ok=True)
        self._tre_project = project.id
        if self.isolate_sandboxes:
            await self._create_sandbox_network(project.id)
        try:
            return await super().start()
        except Exception:
            if self.isolate_sandboxes:
                await self._remove_sandbox_network()
            raise

    async def stop(self, now: bool = False) -> None:
        await super().stop(now=now)
        if self.isolate_sandboxes and self.name:
            await self._remove_sandbox_network()

    async def create_object(self) -> dict:
        """Create the container with the policy applied last, so that it wins.

        The configured extras are restored afterwards, so a restart re-checks the admin's
        configuration rather than this server's policy.
        """
        project_id = self._tre_project
        saved = (self.extra_host_config, self.extra_create_kwargs, self.mounts)
        try:
            self.mounts = self.policy_mounts(project_id)
            self.extra_host_config = {**self.extra_host_config, **self.policy_host_config()}
            self.extra_create_kwargs = {
                **self.extra_create_kwargs,
                "user": self.sandbox_user,
                "labels": {
                    "org.tre.project": project_id,
                    "org.tre.user": self.user.name,
                    "org.tre.component": "sandbox",
                },
            }
            return await super().create_object()
        finally:
            self.extra_host_config, self.extra_create_kwargs, self.mounts = saved

    async def pull_image(self, image: str) -> None:
        """Pull by digest: DockerSpawner splits ``name@sha256:…`` at the wrong colon."""
        name, _, digest = image.partition("@")
        if self.pull_policy == "skip":
            return
        if self.pull_policy != "always":
            import docker.errors

            try:
                await self.docker("inspect_image", image)
                return
            except docker.errors.NotFound:
                if self.pull_policy == "never":
                    raise
        self.log.info("pulling image %s", image)
        await self.docker("pull", name, tag=digest)

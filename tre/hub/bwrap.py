"""BubblewrapSpawner: each (user, project) server in its own bubblewrap sandbox, no Docker.

What a sandbox is (the embedded default of the TRE):

- its own network namespace with only loopback; the single-user server listens on a unix socket
  (``/run/tre/server/jupyter.sock`` inside) that configurable-http-proxy routes to, and it
  reaches the hub and the airlock only through their unix sockets bind-mounted in;
- its own pid, ipc, uts (and, bwrap being run unprivileged, user) namespaces, a new session,
  every capability dropped, and no way to gain privileges (bwrap sets no_new_privs);
- a root filesystem built from nothing: read-only ``/usr`` and a few files of ``/etc``, the
  read-only sandbox Python environment, the project's extract read-only at
  ``/data/<project>.duckdb``, the project workspace writable at ``/home/jovyan/work``, a private
  ``/tmp``. Nothing else of the host: no other extract or workspace, no state dir, no /root,
  no hub database, no secrets;
- an unprivileged host uid (``sandbox_user``, default ``tre-sandbox``) and resource limits
  (address space, processes, file size, open files) set before bwrap starts;
- nothing of the hub's stdin/stdout/stderr: stdin is /dev/null, the output goes to the
  sandbox's own log (``<runtime_dir>/logs/<user>.<project>.log``, root's 0600);
- ``--die-with-parent``: bwrap's parent is a small keeper process (``setsid --wait``) in a
  session of its own, not the hub. Stopping kills the keeper's process group; bwrap dies with
  its parent, the sandbox's pid 1 with bwrap, and every process in the pid namespace with its
  pid 1 (the spawner then checks that none is left). A hub restart leaves the keeper running,
  and the persisted state (pid, pid namespace, socket path) lets the restarted hub find the
  sandbox and route to it again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pwd
import resource
import shutil
import signal
import stat
from pathlib import Path
from subprocess import DEVNULL, Popen
from urllib.parse import quote

import yaml
from jupyterhub.spawner import LocalProcessSpawner, Spawner
from tornado import web
from traitlets import Bool, Integer, List, Unicode, default

from tre.hub.access import ProjectAccessDenied, check_can_start_project, extract_path
from tre.hub.sandbox_env import policy_path_in_env
from tre.hub.seccomp import SeccompError, compile_filter, filter_fd
from tre.registry import Project, RegistryError, load_registry

SANDBOX_HOME = "/home/jovyan"
SANDBOX_WORK = f"{SANDBOX_HOME}/work"
SANDBOX_RUN = "/run/tre"
SANDBOX_SERVER_SOCKET = f"{SANDBOX_RUN}/server/jupyter.sock"
SANDBOX_HUB_SOCKET = f"{SANDBOX_RUN}/hub/hub.sock"
SANDBOX_AIRLOCK_SOCKET = f"{SANDBOX_RUN}/airlock/airlock.sock"
# jupyter_server refuses --sock together with a non-default port; the port is never bound.
SERVER_PORT = 8888
MiB = 1024 * 1024


def unix_url(path: str | Path) -> str:
    """``http+unix://`` URL of a socket (path percent-encoded, as the hub and proxy expect)."""
    return "http+unix://" + quote(str(path), safe="")


class SocketSwapped(Exception):  # noqa: N818 - says what the sandbox did
    """The sandbox's server socket is not a socket of the sandbox user (a link, another file)."""


def pin_socket(sock: Path, route: Path, uid: int) -> bool:
    """Hard-link the unix socket ``sock`` (in a directory the sandbox writes) at ``route`` (in one
    only root writes); False while ``sock`` does not exist yet.

    ``connect()`` follows symlinks, and a sandbox can replace its socket by a link to any socket
    of the host at any time: the hub and the proxy (root) would then connect there. A hard
    link names one inode, checked after it is made and out of the sandbox's reach afterwards:
    through it the hub and the proxy reach the sandbox's own server, or nothing."""
    tmp = route.with_name(route.name + ".new")
    tmp.unlink(missing_ok=True)
    try:
        os.link(sock, tmp, follow_symlinks=False)  # a symlink is linked as itself, not followed
    except FileNotFoundError:
        return False
    st = os.lstat(tmp)
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != uid:
        tmp.unlink()
        raise SocketSwapped(f"{sock} is not a socket of the sandbox user")
    os.replace(tmp, route)
    return True


def cgroup_name(runtime_dir: Path, sandbox_key: str) -> str:
    """The sandbox's cgroup: per (user, project) AND per installation. Cgroups are made beside
    the hub's own, so two hubs on one machine (tests, staging beside production) would share
    one ``pids.max`` and memory limit for the same (user, project), each rewriting the other's;
    the hash of the runtime directory (one per installation, stable across restarts, so a
    restarted hub still finds and removes its sandboxes' cgroups) keeps them apart."""
    installation = hashlib.sha256(str(runtime_dir.resolve()).encode()).hexdigest()[:8]
    return f"tre-sandbox-{sandbox_key}-{installation}"


class BubblewrapSpawner(LocalProcessSpawner):
    """Run each single-user server inside a bubblewrap sandbox (see the module docstring)."""

    bwrap_path = Unicode("/usr/bin/bwrap", config=True, help="Path of the bubblewrap executable.")
    keeper_cmd = List(
        Unicode(),
        default_value=["/usr/bin/setsid", "--wait"],
        config=True,
        help="Small process that starts bwrap and waits for it. bwrap runs --die-with-parent, "
        "and its parent must outlive a hub restart, so it cannot be the hub itself.",
    )
    sandbox_user = Unicode(
        "tre-sandbox",
        config=True,
        help="Unprivileged host user every sandbox runs as (create it with useradd --system).",
    )
    sandbox_env_dir = Unicode(
        config=True,
        help="Python environment (built by `tre hub build-sandbox-env`) bind-mounted read-only "
        "at its own path; its bin/jupyterhub-singleuser is the server command.",
    )
    runtime_dir = Unicode(
        config=True,
        help="Host directory of unix sockets: hub/hub.sock, airlock/airlock.sock, "
        "sandboxes/<user>.<project>/jupyter.sock and its pinned hard link "
        "routes/<user>.<project>.sock.",
    )
    policies_dir = Unicode(config=True, help="TRE policies directory (the project registry).")
    extracts_dir = Unicode(config=True, help="Directory of per-project extracts.")
    workspaces_dir = Unicode(config=True, help="Directory of per-project workspaces.")
    system_ro_binds = List(
        Unicode(),
        default_value=[
            "/usr",
            "/etc/alternatives",
            "/etc/ld.so.cache",
            "/etc/ld.so.conf",
            "/etc/ld.so.conf.d",
            "/etc/localtime",
            "/etc/fonts",
            "/etc/mime.types",
        ],
        config=True,
        help="Host paths mounted read-only at the same place (missing ones are skipped).",
    )
    memory_limit_mb = Integer(
        4096, config=True, help="Address-space limit (RLIMIT_AS) of each sandbox process, MiB."
    )
    max_processes = Integer(
        2048,
        config=True,
        help="RLIMIT_NPROC of the sandbox user: processes of that uid over all sandboxes.",
    )
    max_file_size_mb = Integer(
        2048, config=True, help="Largest file a sandbox process may write (RLIMIT_FSIZE), MiB."
    )
    max_open_files = Integer(1024, config=True, help="RLIMIT_NOFILE of sandbox processes.")
    cgroup_memory_mb = Integer(
        8192,
        config=True,
        help="Memory limit of the whole sandbox (a cgroup of its own), when the host's memory "
        "cgroup is writable (v1 memory.limit_in_bytes or v2 memory.max); 0: none.",
    )
    cgroup_max_pids = Integer(
        512,
        config=True,
        help="Process limit of the whole sandbox (cgroup pids.max), when writable; 0: none.",
    )
    seccomp = Bool(
        True,
        config=True,
        help="Load the TRE's seccomp filter (tre/hub/seccomp.py) into every sandbox: ptrace, "
        "mount, namespaces, keyrings, bpf, perf, userfaultfd, modules... are denied.",
    )
    tmp_size_mb = Integer(1024, config=True, help="Size of the sandbox's private /tmp, MiB.")
    pidns = Integer(0, help="Inode of the sandbox's pid namespace (to find every process).")

    @default("cmd")
    def _default_cmd(self) -> list[str]:
        return [str(Path(self.sandbox_env_dir) / "bin" / "jupyterhub-singleuser")]

    @default("env_keep")
    def _default_env_keep(self) -> list[str]:
        # Nothing of the hub's environment leaks into a sandbox (no PATH into /root, no secrets).
        return ["LANG", "LC_ALL"]

    # -- paths ------------------------------------------------------------------------------

    @property
    def sandbox_key(self) -> str:
        # user names match [a-z0-9._-] and project ids [a-z0-9-]: "." cannot occur in a project
        # id, so "<user>.<project>" is unambiguous.
        return f"{self.user.name}.{self.name}"

    @property
    def host_socket_dir(self) -> Path:
        return Path(self.runtime_dir) / "sandboxes" / self.sandbox_key

    @property
    def host_socket_path(self) -> Path:
        return self.host_socket_dir / "jupyter.sock"

    @property
    def host_route_path(self) -> Path:
        """What the hub and the proxy connect to: a hard link to the server's socket, in a
        directory only root writes (``pin_socket``), never the sandbox-writable name."""
        return Path(self.runtime_dir) / "routes" / f"{self.sandbox_key}.sock"

    @property
    def server_url(self) -> str:
        return unix_url(self.host_route_path)

    @property
    def host_log_path(self) -> Path:
        """The sandbox's own stdout and stderr (its server's and kernels' output)."""
        return Path(self.runtime_dir) / "logs" / f"{self.sandbox_key}.log"

    # -- the hub forgets connect_url on restart: derive it from our own state ---------------

    @property
    def server(self):  # noqa: ANN201 - same type as Spawner.server
        server = Spawner.server.fget(self)
        if server is not None and self.pid and not server.connect_url:
            server.connect_url = self.server_url
        return server

    @server.setter
    def server(self, server) -> None:  # noqa: ANN001
        Spawner.server.fset(self, server)

    # -- state -------------------------------------------------------------------------------

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        self.pidns = int(state.get("pidns", 0))

    def get_state(self) -> dict:
        state = super().get_state()
        if self.pid:
            state["pidns"] = self.pidns
            state["socket"] = str(self.host_socket_path)
        return state

    def clear_state(self) -> None:
        super().clear_state()
        self.pidns = 0

    # -- environment and command -------------------------------------------------------------

    def user_env(self, env: dict) -> dict:
        env["USER"] = "jovyan"
        env["HOME"] = SANDBOX_HOME
        env["SHELL"] = "/bin/bash"
        return env

    def get_env(self) -> dict:
        env = super().get_env()
        # The hub is reached through its socket mounted in the sandbox, whatever its host path.
        hub_api = self.hub.api_url
        inside_api = unix_url(SANDBOX_HUB_SOCKET) + "/hub/api"
        for key, value in list(env.items()):
            if isinstance(value, str) and value.startswith(hub_api):
                env[key] = inside_api + value[len(hub_api) :]
        env_bin = str(Path(self.sandbox_env_dir) / "bin")
        env.update(
            PATH=f"{env_bin}:/usr/local/bin:/usr/bin:/bin",
            VIRTUAL_ENV=str(self.sandbox_env_dir),
            TRE_PROJECT=self.name,
            TRE_EXTRACT=f"/data/{self.name}.duckdb",
            TRE_WORKSPACE=SANDBOX_WORK,
            TRE_AIRLOCK_SOCKET=SANDBOX_AIRLOCK_SOCKET,
            TRE_AIRLOCK_URL=unix_url(SANDBOX_AIRLOCK_SOCKET),
            # No package index: the sandbox has no network, and pip/uv must not even try.
            PIP_NO_INDEX="1",
            PIP_DISABLE_PIP_VERSION_CHECK="1",
            UV_OFFLINE="1",
            MPLCONFIGDIR="/tmp/matplotlib",  # noqa: S108 - the sandbox's private /tmp
            JUPYTER_CONFIG_DIR=f"{SANDBOX_HOME}/.jupyter",
            PYTHONNOUSERSITE="1",
        )
        return env

    def get_args(self) -> list[str]:
        args = super().get_args()
        return args + [
            f"--ServerApp.sock={SANDBOX_SERVER_SOCKET}",
            "--ServerApp.sock_mode=0600",
            f"--ServerApp.root_dir={SANDBOX_WORK}",
            "--ServerApp.open_browser=False",
        ]

    @property
    def host_policy_path(self) -> Path:
        return Path(self.runtime_dir) / "policies" / f"{self.sandbox_key}.yaml"

    def _write_project_policy(self, project: Project) -> None:
        """The project's effective disclosure policy (policies/disclosure.yaml + the project's
        overrides), so that ``tre.outputs`` in the sandbox judges with the airlock's rules."""
        base = yaml.safe_load((Path(self.policies_dir) / "disclosure.yaml").read_text()) or {}
        base.update(project.disclosure or {})
        path = self.host_policy_path
        path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(path.parent, 0o755)  # noqa: S103 - read by the sandbox user; no secrets
        tmp = path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(base))
        os.chmod(tmp, 0o644)  # noqa: S103
        os.replace(tmp, path)

    def bwrap_args(self, extract: Path, workspace: Path) -> list[str]:
        """The bubblewrap command line (without the command run inside)."""
        runtime = Path(self.runtime_dir)
        args = [
            self.bwrap_path,
            "--unshare-all",  # ipc, pid, net, uts, cgroup namespaces
            "--unshare-user",
            "--disable-userns",  # no nested user namespace (kernel attack surface)
            "--die-with-parent",
            "--new-session",
            "--cap-drop",
            "ALL",
            "--hostname",
            "sandbox",
        ]
        for path in self.system_ro_binds:
            if os.path.exists(path):
                args += ["--ro-bind", path, path]
        args += [
            "--symlink", "usr/bin", "/bin",
            "--symlink", "usr/sbin", "/sbin",
            "--symlink", "usr/lib", "/lib",
            "--symlink", "usr/lib64", "/lib64",
            "--proc", "/proc",
            "--dev", "/dev",
            "--size", str(self.tmp_size_mb * MiB), "--tmpfs", "/tmp",  # noqa: S108 - private
            "--ro-bind", str(self.sandbox_env_dir), str(self.sandbox_env_dir),
            "--ro-bind", str(runtime / "etc" / "passwd"), "/etc/passwd",
            "--ro-bind", str(runtime / "etc" / "group"), "/etc/group",
            "--ro-bind", str(extract), f"/data/{self.name}.duckdb",
            "--tmpfs", SANDBOX_HOME,
            "--bind", str(workspace), SANDBOX_WORK,
            "--bind", str(self.host_socket_dir), f"{SANDBOX_RUN}/server",
            "--ro-bind", str(runtime / "hub"), f"{SANDBOX_RUN}/hub",
            "--ro-bind", str(runtime / "airlock"), f"{SANDBOX_RUN}/airlock",
            "--ro-bind", str(self.host_policy_path),
            str(policy_path_in_env(Path(self.sandbox_env_dir))),
            "--chdir", SANDBOX_WORK,
            # everything not mounted writable above is read-only, the new root included
            "--remount-ro", "/",
        ]  # fmt: skip
        return args

    # -- preparation (as root, before dropping to the sandbox user) ---------------------------

    def _sandbox_ids(self) -> tuple[int, int]:
        try:
            entry = pwd.getpwnam(self.sandbox_user)
        except KeyError:
            raise web.HTTPError(
                500,
                f"The sandbox user {self.sandbox_user!r} does not exist; as root run: "
                f"useradd --system --no-create-home --shell /usr/sbin/nologin {self.sandbox_user}",
            ) from None
        if entry.pw_uid == 0:
            raise web.HTTPError(500, "The sandbox user must not be root.")
        return entry.pw_uid, entry.pw_gid

    @staticmethod
    def _allowed(st: os.stat_result, uid: int, gid: int, bits: int) -> bool:
        """Whether ``uid``/``gid`` has every permission in ``bits`` (r=4, w=2, x=1)."""
        if st.st_uid == uid:
            return (st.st_mode >> 6) & bits == bits
        if st.st_gid == gid:
            return (st.st_mode >> 3) & bits == bits
        return st.st_mode & bits == bits

    def _check_sandbox_access(self, path: Path, uid: int, gid: int, write: bool = False) -> None:
        """bwrap resolves bind sources as the sandbox user: say clearly what it cannot reach
        (instead of a bare bwrap error after the spawn)."""
        for parent in reversed(path.parents):
            if not self._allowed(parent.stat(), uid, gid, 1):
                raise web.HTTPError(
                    500, f"The sandbox user cannot traverse {parent}: give it o+x (chmod o+x)."
                )
        if not self._allowed(path.stat(), uid, gid, 6 if write else 4):
            what = "read and write" if write else "read"
            raise web.HTTPError(500, f"The sandbox user cannot {what} {path}: fix its mode.")

    @staticmethod
    def _seal_workspace(workspace: Path, gid: int) -> None:
        """The workspace's top directory is root's, group ``gid`` (the sandbox user's), 0770,
        at every spawn (older ones were the sandbox user's). The sandbox writes in it through
        its group but, not owning it, cannot chmod it: when it owned it, a sandbox made it
        0777 and left a setuid program of the sandbox user in it, and any local account that
        ran it became the owner of every project's workspace and server socket. Whatever
        modes the sandbox sets below, nobody but root and the sandbox user gets past here."""
        fd = os.open(workspace, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            os.fchown(fd, 0, gid)
            os.fchmod(fd, 0o770)
        finally:
            os.close(fd)

    def _prepare_host_dirs(self, uid: int, gid: int, workspace: Path) -> None:
        runtime = Path(self.runtime_dir)
        for sub in ("hub", "airlock", "sandboxes", "etc"):
            (runtime / sub).mkdir(parents=True, exist_ok=True)
        # The sandbox user must traverse these to bind-mount the sockets (bwrap resolves the
        # paths with its credentials); it cannot list the per-sandbox socket directories.
        os.chmod(runtime, 0o755)  # noqa: S103
        for sub in ("hub", "airlock", "etc"):
            os.chmod(runtime / sub, 0o755)  # noqa: S103
        os.chmod(runtime / "sandboxes", 0o711)  # noqa: S103
        (runtime / "routes").mkdir(mode=0o700, exist_ok=True)
        os.chmod(runtime / "routes", 0o700)  # the hub's and the proxy's, not the sandboxes'
        self.host_route_path.unlink(missing_ok=True)
        (runtime / "etc" / "passwd").write_text(
            f"root:x:0:0::/:/usr/sbin/nologin\njovyan:x:{uid}:{gid}::{SANDBOX_HOME}:/bin/bash\n"
            "nobody:x:65534:65534::/nonexistent:/usr/sbin/nologin\n"
        )
        (runtime / "etc" / "group").write_text(f"root:x:0:\njovyan:x:{gid}:\n")
        sock_dir = self.host_socket_dir
        if sock_dir.exists():
            shutil.rmtree(sock_dir)
        sock_dir.mkdir(mode=0o700)
        os.chown(sock_dir, uid, gid)
        if len(str(self.host_socket_path).encode()) > 107:
            raise web.HTTPError(
                500,
                f"Socket path too long (>107 bytes): {self.host_socket_path}; "
                "set hub.runtime_dir to a shorter path.",
            )
        if not workspace.exists():
            workspace.mkdir(parents=True, mode=0o770)
        self._seal_workspace(workspace, gid)
        self._check_sandbox_access(workspace, uid, gid, write=True)
        self._check_sandbox_access(Path(self.sandbox_env_dir), uid, gid)

    def _open_log(self) -> int:
        """A write-only descriptor of the sandbox's own log, for its stdin-less stdout/stderr.

        Never the hub's own: a descriptor is re-opened through ``/proc/self/fd/N`` with the
        permissions of the file it names, and every sandbox ran with the hub's stdout and
        stderr, so any kernel could read the hub's log (every user's and project's server
        output, file names, the sandboxes' host paths) by opening ``/proc/self/fd/1``, and write
        lines into it; a hub started from a terminal handed that terminal to every sandbox.
        Root's file (0600) in root's directory (0700): the sandbox writes its own output
        through the inherited descriptor and cannot re-open it. The previous run's log is kept
        as ``<name>.log.1``."""
        path = self.host_log_path
        path.parent.mkdir(mode=0o700, exist_ok=True)
        os.chmod(path.parent, 0o700)
        if path.exists():
            os.replace(path, path.with_name(path.name + ".1"))
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
        return os.open(path, flags, 0o600)

    # -- cgroups: whole-sandbox memory and process limits where the host lets us ---------------

    def _cgroup_dirs(self) -> list[tuple[Path, dict[str, str]]]:
        """(cgroup directory, limit files) for this sandbox; empty where cgroups are not
        writable (then only the per-process rlimits apply)."""
        wanted: list[tuple[Path, dict[str, str]]] = []
        name = cgroup_name(Path(self.runtime_dir), self.sandbox_key)
        own = {}
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for c in controllers.split(","):
                own[c] = path
        v1 = Path("/sys/fs/cgroup")
        if self.cgroup_memory_mb and (v1 / "memory" / "memory.limit_in_bytes").exists():
            base = v1 / "memory" / own.get("memory", "/").lstrip("/")
            limit = str(self.cgroup_memory_mb * MiB)
            wanted.append((base / name, {"memory.limit_in_bytes": limit}))
        if self.cgroup_max_pids and (v1 / "pids" / "cgroup.procs").exists():
            base = v1 / "pids" / own.get("pids", "/").lstrip("/")
            wanted.append((base / name, {"pids.max": str(self.cgroup_max_pids)}))
        usable = []
        for directory, limits in wanted:
            if os.access(directory.parent, os.W_OK):
                usable.append((directory, limits))
        return usable

    def _make_cgroups(self) -> list[Path]:
        made = []
        dirs = self._cgroup_dirs()
        if not dirs and (self.cgroup_memory_mb or self.cgroup_max_pids):
            self.log.warning(
                "No writable cgroup for %s: only per-process limits apply", self.sandbox_key
            )
        for directory, limits in dirs:
            try:
                directory.mkdir(exist_ok=True)
                for fname, value in limits.items():
                    (directory / fname).write_text(value)
            except OSError as exc:
                self.log.warning("No cgroup limit %s for %s: %s", directory, self.sandbox_key, exc)
                continue
            made.append(directory)
        return made

    def _remove_cgroups(self) -> None:
        for directory, _ in self._cgroup_dirs():
            try:
                directory.rmdir()
            except OSError:
                pass

    def make_preexec_fn(self, name: str):  # noqa: ANN201 - a callable for Popen
        uid, gid = self._sandbox_ids()
        cgroups = [str(d / "cgroup.procs") for d in self._make_cgroups()]
        limits = [
            (resource.RLIMIT_AS, self.memory_limit_mb * MiB),
            (resource.RLIMIT_NPROC, self.max_processes),
            (resource.RLIMIT_FSIZE, self.max_file_size_mb * MiB),
            (resource.RLIMIT_NOFILE, self.max_open_files),
            (resource.RLIMIT_CORE, 0),
        ]

        def preexec() -> None:
            # join the sandbox's cgroups first: every later process inherits them
            for procs in cgroups:
                with open(procs, "w") as fh:
                    fh.write(str(os.getpid()))
            for which, value in limits:
                resource.setrlimit(which, (value, value))
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)

        return preexec

    # -- lifecycle ---------------------------------------------------------------------------

    def _check_project(self) -> Project:
        try:
            registry = load_registry(Path(self.policies_dir))
        except RegistryError as exc:
            raise web.HTTPError(500, f"The project registry is invalid: {exc}") from None
        try:
            return check_can_start_project(
                registry, self.user.name, self.name, Path(self.extracts_dir)
            )
        except ProjectAccessDenied as exc:
            raise web.HTTPError(exc.status, exc.message) from None

    async def start(self) -> str:
        project = self._check_project()
        extract = extract_path(Path(self.extracts_dir), self.name)
        uid, gid = self._sandbox_ids()
        workspace = Path(self.workspaces_dir) / self.name
        self._prepare_host_dirs(uid, gid, workspace)
        self._check_sandbox_access(extract, uid, gid)
        self._write_project_policy(project)
        self.port = SERVER_PORT
        env = self.get_env()
        info_read, info_write = os.pipe()
        fds = [info_write]
        cmd = [*self.keeper_cmd, *self.bwrap_args(extract, workspace)]
        if self.seccomp:
            try:
                fds.append(filter_fd(compile_filter()))
            except SeccompError as exc:
                os.close(info_read)
                os.close(info_write)
                raise web.HTTPError(
                    500, f"Cannot build the sandbox's seccomp filter: {exc}"
                ) from None
            cmd += ["--seccomp", str(fds[-1])]
        cmd += ["--info-fd", str(info_write), "--", *self.cmd, *self.get_args()]
        self.log.info(
            "Starting sandbox %s (output in %s): %s",
            self.sandbox_key,
            self.host_log_path,
            " ".join(cmd),
        )
        log_fd = self._open_log()
        try:
            self.proc = Popen(
                cmd,
                env=env,
                preexec_fn=self.make_preexec_fn(self.user.name),
                start_new_session=True,
                pass_fds=tuple(fds),
                cwd="/",
                # nothing of the hub's own stdin, stdout, stderr (see _open_log)
                stdin=DEVNULL,
                stdout=log_fd,
                stderr=log_fd,
            )
        finally:
            for fd in (*fds, log_fd):
                os.close(fd)
        self.pid = self.proc.pid
        self.pidns = await self._read_pidns(info_read)
        await self._pin_server_socket(uid)
        if self.server is not None:
            self.server.connect_url = self.server_url
        return self.server_url

    async def _pin_server_socket(self, uid: int) -> None:
        """Wait for the server's socket and pin it (``pin_socket``); a server that never makes
        one is left to the hub's own timeout, a socket swapped for a link fails the start."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout
        while loop.time() < deadline and self.proc is not None and self.proc.poll() is None:
            try:
                if pin_socket(self.host_socket_path, self.host_route_path, uid):
                    return
            except SocketSwapped as exc:
                raise web.HTTPError(500, f"Sandbox {self.sandbox_key}: {exc}") from None
            await asyncio.sleep(0.05)

    async def _read_pidns(self, info_read: int, timeout: float = 30) -> int:
        """bwrap writes {"child-pid": N} once the sandbox runs; remember its pid namespace.

        The keeper process also holds the pipe's write end, so read until the JSON document is
        complete (not until EOF), without blocking the hub's event loop."""
        loop = asyncio.get_running_loop()
        os.set_blocking(info_read, False)
        data = b""
        deadline = loop.time() + timeout
        try:
            while loop.time() < deadline:
                try:
                    chunk = os.read(info_read, 4096)
                except BlockingIOError:
                    chunk = None
                if chunk == b"":
                    break  # EOF: bwrap failed before the sandbox ran
                if chunk:
                    data += chunk
                    try:
                        child = int(json.loads(data)["child-pid"])
                    except (ValueError, KeyError):
                        continue
                    return os.stat(f"/proc/{child}/ns/pid").st_ino
                await asyncio.sleep(0.01)
        except OSError:
            pass
        finally:
            os.close(info_read)
        self.log.warning("Sandbox %s gave no usable info: %r", self.sandbox_key, data[:200])
        return 0

    def _is_our_sandbox(self) -> bool:
        """The stored pid is still this sandbox's keeper, alive (not a zombie, not recycled)."""
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
            cmdline = Path(f"/proc/{self.pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        state = stat.rsplit(")", 1)[1].split()[0]
        return (
            state not in {"Z", "X"}
            and self.bwrap_path.encode() in cmdline
            and str(self.host_socket_dir).encode() in cmdline
        )

    async def poll(self) -> int | None:
        if self.proc is None and self.pid and not self._is_our_sandbox():
            self.clear_state()
            return 0
        return await super().poll()

    def sandbox_pids(self) -> list[int]:
        """Every process in this sandbox's pid namespace (seen from the host)."""
        if not self.pidns:
            return []
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if os.stat(f"/proc/{entry}/ns/pid").st_ino == self.pidns:
                        found.append(int(entry))
                except OSError:
                    continue
        return found

    async def _signal(self, sig: int) -> bool:
        # Signal bwrap's whole process group (it leads its own session), not only bwrap.
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            return False
        except PermissionError:
            os.kill(self.pid, sig)
        return True

    async def stop(self, now: bool = False) -> None:
        pidns = self.pidns
        await super().stop(now=True)
        # bwrap's death kills the sandbox's pid 1 and so the namespace; make sure of it.
        self.pidns = pidns
        for _ in range(100):
            left = self.sandbox_pids()
            if not left:
                break
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            await asyncio.sleep(0.02)
        self.pidns = 0
        shutil.rmtree(self.host_socket_dir, ignore_errors=True)
        self.host_route_path.unlink(missing_ok=True)
        self._remove_cgroups()

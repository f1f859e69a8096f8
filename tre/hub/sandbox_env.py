"""The Python environment every bubblewrap sandbox runs (``tre hub build-sandbox-env``).

The hub's own environment usually lives under /root (uv, pyenv), which the unprivileged sandbox
user cannot execute. So the sandbox gets its own virtual environment on the system Python
(``/usr/bin/python3``), with exactly the versions of ``uv.lock`` (``uv export --frozen`` used as
constraints) and this project's package. The build is idempotent: a stamp file records what
was installed, and a second call with the same lock, package list and sources does nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tre.settings import REPO_ROOT

# What a researcher's sandbox needs: the single-user server and JupyterLab, a kernel, the data
# tools, and the runtime dependencies of ``tre`` (outputs helpers) themselves.
SANDBOX_PACKAGES: tuple[str, ...] = (
    "jupyterhub",
    "jupyterlab",
    "jupyter-server",
    "ipykernel",
    "duckdb",
    "polars",
    "pyarrow",
    "matplotlib",
    "statsmodels",
    "pydantic",
    "pydantic-settings",
    "pyyaml",
    "httpx",
)
STAMP = ".tre-sandbox-env.json"
LAB_SETTINGS = Path(__file__).parent / "jupyterlab_settings"
# Where each file of jupyterlab_settings/ goes inside the environment (sys.prefix).
LAB_SETTINGS_TARGETS = {
    "overrides.json": Path("share/jupyter/lab/settings/overrides.json"),
    "page_config.json": Path("etc/jupyter/labconfig/page_config.json"),
    "jupyter_server_config.json": Path("etc/jupyter/jupyter_server_config.json"),
}


class SandboxEnvError(RuntimeError):
    """The sandbox environment could not be built (message says why and what to do)."""


@dataclass(frozen=True)
class BuildResult:
    env_dir: Path
    deps_installed: bool
    project_installed: bool


def _uv() -> str:
    uv = shutil.which("uv") or str(Path.home() / ".local" / "bin" / "uv")
    if not Path(uv).exists():
        raise SandboxEnvError("uv is not installed (see the Makefile's setup target)")
    return uv


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SandboxEnvError(f"{' '.join(cmd[:4])} ... failed:\n{proc.stderr.strip()[-2000:]}")
    return proc.stdout


def locked_constraints(project_root: Path = REPO_ROOT) -> str:
    """Pinned versions of every locked dependency (no hashes, no dev group, no project)."""
    return _run(
        [
            _uv(),
            "export",
            "--frozen",
            "--no-dev",
            "--no-hashes",
            "--no-emit-project",
            "--no-header",
            "--no-annotate",
        ],
        cwd=project_root,
    )


def project_source_digest(project_root: Path = REPO_ROOT) -> str:
    """Hash of the installed package's sources, so a changed ``tre`` is reinstalled."""
    digest = hashlib.sha256()
    for package in ("tre", "airlock"):
        for path in sorted((project_root / package).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(project_root)).encode())
                digest.update(path.read_bytes())
    digest.update((project_root / "pyproject.toml").read_bytes())
    digest.update((project_root / "policies" / "disclosure.yaml").read_bytes())
    return digest.hexdigest()


def _readable_by_all(path: Path) -> None:
    """The sandbox user must traverse every parent of the environment."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            raise SandboxEnvError(
                f"{parent} is not traversable by other users (mode {oct(mode & 0o777)}); "
                "choose hub.sandbox_env_dir elsewhere (e.g. under /opt or /srv)"
            )


def site_packages(env_dir: Path) -> Path:
    found = sorted(env_dir.glob("lib/python3*/site-packages"))
    if not found:
        raise SandboxEnvError(f"{env_dir} has no lib/python3*/site-packages")
    return found[0]


def policy_path_in_env(env_dir: Path) -> Path:
    """Where ``airlock.policy`` looks for the disclosure policy in the installed package (the
    spawner binds each project's effective policy over this file)."""
    return site_packages(env_dir) / "policies" / "disclosure.yaml"


def install_policy(env_dir: Path, project_root: Path = REPO_ROOT) -> None:
    dest = policy_path_in_env(env_dir)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(project_root / "policies" / "disclosure.yaml", dest)
    os.chmod(dest, 0o644)


def install_lab_settings(env_dir: Path) -> None:
    """Copy the no-outbound-requests JupyterLab/jupyter_server settings into the environment."""
    for name, target in LAB_SETTINGS_TARGETS.items():
        dest = env_dir / target
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(LAB_SETTINGS / name, dest)
        os.chmod(dest, 0o644)


def build_sandbox_env(
    env_dir: Path,
    python: Path = Path("/usr/bin/python3"),
    project_root: Path = REPO_ROOT,
    packages: tuple[str, ...] = SANDBOX_PACKAGES,
) -> BuildResult:
    """Create or update the sandbox environment at ``env_dir``; a no-op when up to date."""
    if not python.exists():
        raise SandboxEnvError(f"{python} does not exist: install python3 and python3-venv")
    env_dir = env_dir.resolve()
    uv = _uv()
    constraints = locked_constraints(project_root)
    deps_key = hashlib.sha256(
        json.dumps([str(python), constraints, sorted(packages), "compiled"]).encode()
    ).hexdigest()
    project_key = project_source_digest(project_root)
    stamp_path = env_dir / STAMP
    stamp = json.loads(stamp_path.read_text()) if stamp_path.exists() else {}

    deps_installed = project_installed = False
    if stamp.get("deps") != deps_key:
        env_dir.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(env_dir.parent, env_dir.parent.stat().st_mode | 0o005)
        _run([uv, "venv", "--quiet", "--allow-existing", "--python", str(python), str(env_dir)])
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as fh:
            fh.write(constraints)
            constraints_file = fh.name
        try:
            _run(
                [
                    uv,
                    "pip",
                    "install",
                    "--quiet",
                    "--compile-bytecode",
                    "--python",
                    str(env_dir / "bin" / "python"),
                ]
                + ["--constraint", constraints_file, *packages]
            )
        finally:
            os.unlink(constraints_file)
        stamp = {"deps": deps_key}
        deps_installed = True
    if stamp.get("project") != project_key:
        _run(
            [
                uv,
                "pip",
                "install",
                "--quiet",
                "--compile-bytecode",
                "--python",
                str(env_dir / "bin" / "python"),
            ]
            + ["--no-deps", "--reinstall-package", "childhood-cancer-tre", str(project_root)]
        )
        install_lab_settings(env_dir)
        install_policy(env_dir, project_root)
        stamp["project"] = project_key
        project_installed = True
    # Write the stamp last: an interrupted build is redone, never taken as complete.
    tmp = stamp_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(stamp))
    os.replace(tmp, stamp_path)
    _readable_by_all(env_dir)
    return BuildResult(env_dir, deps_installed, project_installed)


def ensure_sandbox_user(name: str = "tre-sandbox") -> int:
    """Create the unprivileged system user sandboxes run as (needs root); return its uid."""
    import pwd

    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        pass
    if os.geteuid() != 0:
        raise SandboxEnvError(
            f"the sandbox user {name!r} does not exist; as root run: useradd --system "
            f"--no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin {name}"
        )
    _run(
        ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent"]
        + ["--shell", "/usr/sbin/nologin", name]
    )
    return pwd.getpwnam(name).pw_uid

"""`tre hub` commands: generate the hub configuration, build the sandbox environment, run."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer
from rich.console import Console

from tre.registry import RegistryError
from tre.settings import load_settings

app = typer.Typer(no_args_is_help=True)
console = Console(stderr=True)


@app.command("config")
def config(
    output: Path | None = typer.Option(None, "--output", "-o", help="Where to write the file."),
) -> None:
    """Generate jupyterhub_config.py from the TRE settings and the project registry."""
    from tre.hub.config import HubConfigError, write_config

    settings = load_settings()
    try:
        path = write_config(settings, output)
    except RegistryError as exc:
        console.print(f"[red]The project registry is invalid; nothing written:[/red]\n{exc}")
        raise typer.Exit(1) from None
    except HubConfigError as exc:
        console.print(f"[red]Nothing written:[/red] {exc}")
        raise typer.Exit(1) from None
    typer.echo(str(path))


@app.command("build-sandbox-env")
def build_sandbox_env() -> None:
    """Build (or update) the Python environment the bubblewrap sandboxes run; idempotent."""
    from tre.hub.sandbox_env import SandboxEnvError, ensure_sandbox_user
    from tre.hub.sandbox_env import build_sandbox_env as build

    settings = load_settings()
    try:
        ensure_sandbox_user(settings.hub.sandbox_user)
        result = build(settings.hub.sandbox_env_dir, settings.hub.sandbox_python)
    except SandboxEnvError as exc:
        console.print(f"[red]Could not build the sandbox environment:[/red] {exc}")
        raise typer.Exit(1) from None
    what = []
    if result.deps_installed:
        what.append("dependencies installed")
    if result.project_installed:
        what.append("tre package installed")
    typer.echo(f"{result.env_dir}: {', '.join(what) or 'up to date'}")


@app.command("run", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run(ctx: typer.Context) -> None:
    """Regenerate the configuration and start JupyterHub (extra arguments go to jupyterhub)."""
    from tre.hub.config import HubConfigError, hub_dir, write_config

    settings = load_settings()
    try:
        path = write_config(settings)
    except RegistryError as exc:
        console.print(f"[red]The project registry is invalid; the hub is not started:[/red]\n{exc}")
        raise typer.Exit(1) from None
    except HubConfigError as exc:
        console.print(f"[red]The hub is not started:[/red] {exc}")
        raise typer.Exit(1) from None
    if settings.hub.spawner == "bubblewrap":
        from tre.hub.sandbox_env import SandboxEnvError, ensure_sandbox_user
        from tre.hub.sandbox_env import build_sandbox_env as build

        try:
            ensure_sandbox_user(settings.hub.sandbox_user)
            build(settings.hub.sandbox_env_dir, settings.hub.sandbox_python)
        except SandboxEnvError as exc:
            console.print(f"[red]Could not build the sandbox environment:[/red] {exc}")
            raise typer.Exit(1) from None
    os.chdir(hub_dir(settings))
    argv = [sys.executable, "-m", "jupyterhub", "-f", str(path), *ctx.args]
    os.execv(sys.executable, argv)  # noqa: S606 - replace this process by the hub


# Local demo accounts (owned by the login work, tre/cli/hub_users.py).
from tre.cli import hub_users  # noqa: E402

hub_users.register(app)

"""`tre hub add-user / remove-user / list-users`: local demo accounts (TRELocalAuthenticator)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer


def _password_file(path: Path | None) -> Path:
    if path is not None:
        return path
    from tre.hub.config import password_file
    from tre.settings import get_settings

    return password_file(get_settings())  # the file the generated hub config names


def add_user(
    name: str = typer.Argument(..., help="User name, as declared in policies/ (e.g. alice)."),
    password_stdin: bool = typer.Option(
        False, "--password-stdin", help="Read the password from standard input."
    ),
    password_file: Path | None = typer.Option(None, help="Password file (default: state dir)."),
) -> None:
    """Create a local account or reset its password; prints a generated password if none given."""
    from tre.hub.auth import PasswordError, PasswordFile, generate_password

    password = sys.stdin.readline().rstrip("\n") if password_stdin else generate_password()
    try:
        PasswordFile(_password_file(password_file)).set_password(name, password)
    except PasswordError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    if password_stdin:
        typer.echo(f"password set for {name}")
    else:
        typer.echo(f"{name}\t{password}")
    _warn_if_unregistered(name)


def _warn_if_unregistered(name: str) -> None:
    """A password alone does not let anyone in: say so if the registry does not know the user."""
    from tre.hub.auth import registry_access
    from tre.registry import RegistryError, load_registry
    from tre.settings import get_settings

    try:
        registry = load_registry(get_settings().policies_dir)
    except (RegistryError, OSError):
        return
    if not registry_access(registry, name).registered:
        typer.echo(
            f"warning: {name} is in no active project and is not staff: login will be refused "
            "until policies/ declares them",
            err=True,
        )


def remove_user(
    name: str = typer.Argument(...),
    password_file: Path | None = typer.Option(None, help="Password file (default: state dir)."),
) -> None:
    """Delete a local account (the registry still decides what the user may do)."""
    from tre.hub.auth import PasswordFile

    if not PasswordFile(_password_file(password_file)).remove(name):
        typer.echo(f"error: no local account {name!r}", err=True)
        raise typer.Exit(1)
    typer.echo(f"removed {name}")


def list_users(
    password_file: Path | None = typer.Option(None, help="Password file (default: state dir)."),
) -> None:
    """List the local accounts (names only)."""
    from tre.hub.auth import PasswordFile

    for name in PasswordFile(_password_file(password_file)).usernames():
        typer.echo(name)


def oidc_unbind(
    name: str = typer.Argument(..., help="TRE user name whose IdP subject is forgotten."),
    subjects_file: Path | None = typer.Option(None, help="Subject file (default: secrets dir)."),
) -> None:
    """Release a user name bound to an IdP subject (TREOIDCAuthenticator), e.g. after the
    person's account at the identity provider was replaced: the next login binds it anew."""
    from tre.hub.auth import SubjectBindings
    from tre.hub.config import oidc_subjects_file
    from tre.settings import get_settings

    path = subjects_file or oidc_subjects_file(get_settings())
    if not SubjectBindings(path).unbind(name):
        typer.echo(f"error: {name!r} is not bound to any IdP subject", err=True)
        raise typer.Exit(1)
    typer.echo(f"released {name}")


def register(app: typer.Typer) -> None:
    app.command("add-user")(add_user)
    app.command("remove-user")(remove_user)
    app.command("list-users")(list_users)
    app.command("oidc-unbind")(oidc_unbind)

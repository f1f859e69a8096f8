"""`tre policy` commands: validate every declaration; publish their JSON Schemas."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from tre.settings import REPO_ROOT, load_settings

app = typer.Typer(no_args_is_help=True)
console = Console()
err = Console(stderr=True, soft_wrap=True)
DEFAULT_SCHEMA_DIR = REPO_ROOT / "docs" / "schemas"


@app.command()
def validate(
    policies_dir: Path | None = typer.Option(
        None, help="Directory to validate (default: the installation's policies_dir)."
    ),
    schemas: Path | None = typer.Option(
        None, "--schemas", help="Also write the JSON Schemas into this directory."
    ),
    check_schemas: Path | None = typer.Option(
        None, "--check-schemas", help="Fail if the JSON Schemas in this directory are stale."
    ),
) -> None:
    """Validate sites, projects, staff, the disclosure policy and the data dictionary."""
    from tre.policy_validate import stale_schemas, validate_policies, write_schemas

    directory = policies_dir or load_settings().policies_dir
    _, problems = validate_policies(directory)
    status = 0
    if problems:
        err.print(f"[bold red]{len(problems)} problem(s)[/] in {directory}:")
        for p in problems:
            err.print(f"  {p.file}: [bold]{p.field or '(file)'}[/]: {p.message}")
        status = 1
    else:
        console.print(f"[green]All declarations in {directory} are valid.[/]")
    if schemas is not None:
        for path in write_schemas(schemas):
            console.print(f"wrote {path}")
    if check_schemas is not None:
        stale = stale_schemas(check_schemas)
        if stale:
            err.print(
                f"[red]stale JSON Schemas in {check_schemas}:[/] {', '.join(stale)} "
                "(regenerate with `tre policy validate --schemas docs/schemas`)"
            )
            status = 1
    raise typer.Exit(status)

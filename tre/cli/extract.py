"""`tre extract` commands: build and inspect per-project read-only extracts."""

from __future__ import annotations

import datetime as dt

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(no_args_is_help=True)
console = Console()


def _on(date: str | None) -> dt.date | None:
    if date is None:
        return None
    try:
        return dt.date.fromisoformat(date)
    except ValueError:
        raise typer.BadParameter(f"{date!r} is not a date (YYYY-MM-DD)") from None


@app.command("build")
def build(
    project: str | None = typer.Argument(None, help="Project id (omit with --all)."),
    all_projects: bool = typer.Option(False, "--all", help="Build every project's extract."),
    on: str | None = typer.Option(
        None, "--on", help="Evaluate end dates and embargoes on this date (default: today)."
    ),
    pooled_version: int | None = typer.Option(
        None, "--pooled-version", help="Rebuild from this earlier pooled version (one project)."
    ),
) -> None:
    """Build a project's extract (or all of them) from the current pooled version."""
    import duckdb

    from tre.extract import ExtractError, build_all, build_extract
    from tre.pooled import PooledStoreError
    from tre.registry import RegistryError, load_registry
    from tre.settings import get_settings

    if (project is None) == (not all_projects):
        raise typer.BadParameter("name one PROJECT or pass --all")
    if all_projects and pooled_version is not None:
        raise typer.BadParameter("--pooled-version needs one PROJECT")
    settings = get_settings()
    try:
        registry = load_registry(settings.policies_dir)
    except RegistryError as exc:
        console.print(f"[red]invalid declarations:[/red]\n{exc}")
        raise typer.Exit(2) from None
    date = _on(on)
    if project is not None:
        try:
            path = build_extract(settings, registry, project, date, pooled_version)
        except (ExtractError, PooledStoreError, duckdb.Error) as exc:
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(1) from None
        if path is None:
            console.print(f"project {project!r} is not active: no extract (any old one removed)")
        else:
            console.print(f"built {path}")
        return
    outcomes = build_all(settings, registry, date)
    table = Table("project", "result")
    for o in outcomes:
        if o.error:
            table.add_row(o.project_id, f"[red]error: {o.error}[/red]")
        elif o.path is not None:
            table.add_row(o.project_id, f"built {o.path}")
        else:
            table.add_row(o.project_id, "no extract (inactive or undeclared; old one removed)")
    console.print(table)
    if any(o.error for o in outcomes):
        raise typer.Exit(1)


@app.command("info")
def info(project: str = typer.Argument(..., help="Project id.")) -> None:
    """Show where a project's extract came from: pooled version, sites, build time, tables."""
    from tre.extract import ExtractError, extract_info
    from tre.settings import get_settings

    try:
        meta = extract_info(get_settings(), project)
    except ExtractError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    head = Table(show_header=False)
    for k in ("project_id", "path", "mode", "size_bytes", "pooled_version", "sites",
              "contributing_sites", "built_at"):  # fmt: skip
        head.add_row(k, str(meta[k]))
    head.add_row("row_filters", str({k: v for k, v in meta["row_filters"].items() if v}))
    console.print(head)
    tables = Table("table", "rows", "columns")
    for name, t in meta["tables"].items():
        tables.add_row(name, str(t["rows"]), ", ".join(t["columns"]))
    console.print(tables)

"""The ``airlock`` command line: ``airlock check FILE...`` (and, later, ``airlock serve``)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from airlock import service_cli

app = typer.Typer(no_args_is_help=True, help="The airlock: disclosure checks and release service.")


@app.callback()
def _root() -> None:
    """Disclosure checks and the release-review service."""


class CheckSetupError(ValueError):
    """The check could not run (unknown project, unreadable policy...): not a verdict."""


def run_checks(
    files: list[Path],
    project: str | None = None,
    evidence: Path | None = None,
    policies_dir: Path | None = None,
    extracts_dir: Path | None = None,
) -> list:
    """The Python API behind ``airlock check``: reports for ``files`` under the project's policy
    (its overrides of policies/disclosure.yaml) and its extract when one exists.

    Raises CheckSetupError when the check cannot run; a bad FILE is a finding, not an error,
    but a file that does not exist is an error (nothing was checked).
    """
    from airlock.checks.engine import check_files, extract_for_project
    from airlock.policy import policy_for_project
    from tre.settings import get_settings

    missing = [str(f) for f in files if not Path(f).exists()]
    if missing:
        raise CheckSetupError(f"no such file: {', '.join(missing)}")
    if evidence is not None and not evidence.is_file():
        raise CheckSetupError(f"no such evidence file: {evidence}")
    settings = get_settings()
    policies_dir = policies_dir or settings.policies_dir
    chosen = None
    extract = None
    if project is not None:
        from tre.registry import RegistryError, load_registry

        try:
            registry = load_registry(policies_dir)
        except RegistryError as exc:
            raise CheckSetupError(f"the project registry is invalid:\n{exc}") from None
        if project not in registry.projects:
            known = ", ".join(sorted(registry.projects)) or "none"
            raise CheckSetupError(f"unknown project {project!r} (known: {known})")
        chosen = registry.projects[project]
        extract = extract_for_project(project, extracts_dir or settings.extracts_dir)
    try:
        policy = policy_for_project(chosen, policies_dir / "disclosure.yaml")
    except Exception as exc:  # noqa: BLE001 (pydantic/yaml errors: the policy is unusable)
        raise CheckSetupError(f"the disclosure policy cannot be loaded: {exc}") from None
    return check_files(files, policy, evidence_path=evidence, extract_path=extract)


_STYLE = {"pass": "green", "review": "yellow", "fail": "bold red"}


def _print_reports(reports: list) -> None:
    from rich.console import Console
    from rich.table import Table

    from airlock.checks.findings import describe_places

    console = Console()
    for report in reports:
        status = report.status.value
        console.print(
            f"[{_STYLE[status]}]{status.upper():6}[/] {report.path}  "
            f"[dim]({report.output_class})[/]"
        )
        if not report.findings:
            continue
        table = Table(show_header=True, header_style="bold", box=None, padding=(0, 1))
        table.add_column("status")
        table.add_column("rule", no_wrap=True)
        table.add_column("message", overflow="fold")
        table.add_column("where", overflow="fold")
        for f in report.findings:
            where = describe_places(f.cells)
            table.add_row(
                f"[{_STYLE[f.status.value]}]{f.status.value}[/]", f.rule, f.message, where
            )
        console.print(table)


@app.command("check")
def check(
    files: list[Path] = typer.Argument(..., help="Files to check."),
    project: str | None = typer.Option(
        None, "--project", help="Apply this project's policy overrides and its extract."
    ),
    evidence: Path | None = typer.Option(
        None, "--evidence", help="Evidence file for the tables (or an ACRO results.json)."
    ),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per file."),
) -> None:
    """Run the disclosure checks on FILES. Exit status 0 whatever the verdicts; non-zero only
    when the check could not run."""
    try:
        reports = run_checks(files, project=project, evidence=evidence)
    except CheckSetupError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps([r.public_dict() for r in reports], indent=2))
    else:
        _print_reports(reports)


service_cli.register(app)  # serve, db, workflow: the review service


@app.command("strip-metadata")
def strip_metadata_command(
    src: Path = typer.Argument(..., help="A PNG, JPEG or SVG figure."),
    dst: Path = typer.Argument(..., help="Where to write the clean copy."),
) -> None:
    """Write a copy of a figure without metadata, embedded text or trailing data."""
    from airlock.checks.figures import FigureError, strip_metadata

    if not src.is_file():
        typer.echo(f"error: no such file: {src}", err=True)
        raise typer.Exit(2)
    if dst.exists() and dst.resolve() == src.resolve():
        typer.echo("error: write the clean copy to another file", err=True)
        raise typer.Exit(2)
    try:
        removed = strip_metadata(src, dst)
    except (FigureError, ValueError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {dst}; removed: {', '.join(removed) or 'nothing'}")


def main() -> None:
    app()


if __name__ == "__main__":  # the hub starts the service as `python -m airlock.cli serve`
    main()

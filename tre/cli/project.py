"""`tre project` commands: provisioning as code.

``apply`` reconciles the declarations with the running system (plan first, then apply);
``create``/``add-member``/``remove-member``/``grant``/``suspend``/``close``/``reactivate``/
``extend`` edit a declaration (comments preserved), validate it, then apply; ``enforce`` runs the
end-date enforcement once or in a loop.
"""

from __future__ import annotations

import datetime as dt
import getpass
import os
import threading
from collections.abc import Callable

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tre.registry import Registry, RegistryError, load_registry
from tre.settings import Settings, load_settings

app = typer.Typer(no_args_is_help=True)
console = Console()
err = Console(stderr=True, soft_wrap=True)


def _actor(actor: str | None) -> str:
    return actor or os.environ.get("TRE_ACTOR") or getpass.getuser()


def _registry(settings: Settings) -> Registry:
    try:
        return load_registry(settings.policies_dir)
    except RegistryError as exc:
        _print_problems(exc)
        raise typer.Exit(2) from None


def _print_problems(exc: RegistryError) -> None:
    err.print("[bold red]invalid declarations[/] (nothing was changed):")
    for p in exc.problems:
        err.print(f"  {p.file}: [bold]{p.field or '(file)'}[/]: {p.message}")


def plan_table(changes: list) -> Table:
    table = Table(title="Plan", show_lines=False)
    table.add_column("project")
    table.add_column("change")
    table.add_column("detail")
    for c in changes:
        table.add_row(c.project, c.action.value, c.detail)
    return table


def run_apply(
    settings: Settings,
    *,
    actor: str,
    dry_run: bool = False,
    use_hub: bool = True,
    today: dt.date | None = None,
) -> int:
    """Plan, print, apply; return the exit status (0 ok, 1 a step failed, 2 bad declarations)."""
    from tre.provision import ProvisionError, reconcile

    registry = _registry(settings)

    def show(changes: list) -> None:
        if changes:
            console.print(plan_table(changes))
        else:
            console.print("[green]Nothing to do:[/] the system matches the declarations.")

    def step(change: object, error: str | None) -> None:
        mark = "[red]FAILED[/]" if error else "[green]done[/]"
        console.print(f"  {mark} {change.project} {change.action.value} {change.detail}")  # type: ignore[attr-defined]
        if error:
            err.print(f"    {error}")

    try:
        rec = reconcile(
            settings,
            registry,
            actor=actor,
            dry_run=dry_run,
            use_hub=use_hub,
            today=today,
            on_plan=show,
            on_step=step,
        )
    except ProvisionError as exc:
        err.print(f"[red]error:[/] {exc}")
        return 1
    if rec.hub_warning:
        err.print(f"[yellow]hub groups not synchronised:[/] {rec.hub_warning}")
    if dry_run:
        if rec.changes:
            console.print(f"(dry run: {len(rec.changes)} change(s) not applied)")
        return 0
    if rec.result is not None and not rec.result.ok:
        err.print("[red]apply stopped at the failed step; the rest stays in the next plan.[/]")
        return 1
    return 0


@app.command()
def apply(
    dry_run: bool = typer.Option(False, "--dry-run", help="Show the plan only."),
    no_hub: bool = typer.Option(False, "--no-hub", help="Do not mirror groups into the hub."),
    actor: str | None = typer.Option(None, help="Who applies (recorded in the audit log)."),
) -> None:
    """Reconcile policies/projects/ with the running system: show the plan, then apply it."""
    raise typer.Exit(
        run_apply(load_settings(), actor=_actor(actor), dry_run=dry_run, use_hub=not no_hub)
    )


@app.command("list")
def list_projects() -> None:
    """Projects as declared, with their status today."""
    from tre.provision import effective_status

    settings = load_settings()
    registry = _registry(settings)
    today = dt.date.today()
    table = Table(title="Projects")
    for col in ("id", "status", "members", "tables", "end date"):
        table.add_column(col)
    for p in sorted(registry.projects.values(), key=lambda p: p.id):
        table.add_row(
            p.id,
            effective_status(p, today).value,
            ", ".join(sorted(p.member_names())),
            ", ".join(sorted(p.grants)),
            p.end_date.isoformat(),
        )
    console.print(table)


def _edit_then_apply(
    edit: Callable[[Settings], tuple[str, str, dict]], apply_after: bool, actor: str | None
) -> None:
    """Run a declaration edit (it returns what to audit); on success, apply (unless --no-apply)."""
    from tre.provision import AirlockAudit

    settings = load_settings()
    try:
        action, project_id, details = edit(settings)
    except RegistryError as exc:
        _print_problems(exc)
        raise typer.Exit(2) from None
    AirlockAudit(settings).record(
        _actor(actor), f"declaration.{action}", f"project:{project_id}", details
    )
    if apply_after:
        raise typer.Exit(run_apply(settings, actor=_actor(actor)))
    console.print("Declaration saved; run `tre project apply` to apply it.")


NO_APPLY = typer.Option(False, "--no-apply", help="Only edit the declaration.")
ACTOR = typer.Option(None, help="Who makes the change (recorded in the audit log).")


@app.command()
def create(
    project_id: str,
    title: str = typer.Option(..., help="Project title."),
    lay_summary: str = typer.Option(..., help="Plain-language summary (public)."),
    purpose: str = typer.Option(..., help="academic, public_health or commercial."),
    jurisdiction: str = typer.Option(..., help="ISO 3166-1 alpha-2 of the researchers."),
    lead: str = typer.Option(..., help="Username of the project lead."),
    institution: list[str] = typer.Option([], help="Institution (repeatable)."),
    grant: list[str] = typer.Option(
        ..., help="TABLE=col1,col2 or TABLE=* (repeatable).", show_default=False
    ),
    start_date: str = typer.Option(dt.date.today().isoformat(), help="YYYY-MM-DD."),
    end_date: str = typer.Option(..., help="YYYY-MM-DD."),
    retention_days: int = typer.Option(365, help="Days the workspace archive is kept."),
    no_apply: bool = NO_APPLY,
    actor: str | None = ACTOR,
) -> None:
    """Declare a new project (policies/projects/<id>.yaml), validate it, apply it."""
    from tre.project_edit import create_project

    grants: dict[str, list[str]] = {}
    for g in grant:
        table, _, cols = g.partition("=")
        if not table or not cols:
            err.print(f"[red]--grant {g!r}: expected TABLE=col1,col2 or TABLE=*[/]")
            raise typer.Exit(2)
        grants[table.strip()] = [c.strip() for c in cols.split(",") if c.strip()]
    try:
        start, end = dt.date.fromisoformat(start_date), dt.date.fromisoformat(end_date)
    except ValueError as exc:
        err.print(f"[red]--start-date/--end-date: {exc} (expected YYYY-MM-DD)[/]")
        raise typer.Exit(2) from None
    fields = {
        "id": project_id,
        "title": title,
        "lay_summary": lay_summary,
        "purpose": purpose,
        "jurisdiction": jurisdiction,
        "institutions": list(institution),
        "members": [{"username": lead, "role": "lead"}],
        "grants": grants,
        "start_date": start,
        "end_date": end,
        "retention_days": retention_days,
    }

    def edit(settings: Settings) -> tuple[str, str, dict]:
        create_project(settings.policies_dir, fields)
        return ("create", project_id, dict(title=title))

    _edit_then_apply(edit, not no_apply, actor)


@app.command("add-member")
def add_member_cmd(
    project_id: str,
    username: str,
    role: str = typer.Option("researcher", help="lead or researcher."),
    institution: str | None = typer.Option(None),
    no_apply: bool = NO_APPLY,
    actor: str | None = ACTOR,
) -> None:
    """Add a member to a project."""
    from tre.project_edit import add_member

    def edit(settings: Settings) -> tuple[str, str, dict]:
        add_member(settings.policies_dir, project_id, username, role, institution)
        return ("add_member", project_id, dict(user=username, role=role))

    _edit_then_apply(edit, not no_apply, actor)


@app.command("remove-member")
def remove_member_cmd(
    project_id: str, username: str, no_apply: bool = NO_APPLY, actor: str | None = ACTOR
) -> None:
    """Remove a member from a project (their running sandbox is stopped on apply)."""
    from tre.project_edit import remove_member

    def edit(settings: Settings) -> tuple[str, str, dict]:
        remove_member(settings.policies_dir, project_id, username)
        return ("remove_member", project_id, dict(user=username))

    _edit_then_apply(edit, not no_apply, actor)


@app.command("grant")
def grant_cmd(
    project_id: str,
    table: str,
    columns: list[str] = typer.Argument(..., help="Columns, or * for every column."),
    revoke: bool = typer.Option(False, "--revoke", help="Take the columns away instead."),
    no_apply: bool = NO_APPLY,
    actor: str | None = ACTOR,
) -> None:
    """Grant (or revoke) columns of a table; the extract is rebuilt on apply."""
    from tre.project_edit import grant

    def edit(settings: Settings) -> tuple[str, str, dict]:
        grant(settings.policies_dir, project_id, table, list(columns), revoke=revoke)
        action = "revoke" if revoke else "grant"
        return (action, project_id, {"table": table, "columns": list(columns)})

    _edit_then_apply(edit, not no_apply, actor)


def _status_cmd(status: str, doc: str) -> None:
    def command(project_id: str, no_apply: bool = NO_APPLY, actor: str | None = ACTOR) -> None:
        from tre.project_edit import set_status

        def edit(settings: Settings) -> tuple[str, str, dict]:
            set_status(settings.policies_dir, project_id, status)
            return (f"status.{status}", project_id, {})

        _edit_then_apply(edit, not no_apply, actor)

    command.__doc__ = doc
    return command  # type: ignore[return-value]


app.command("suspend")(_status_cmd("suspended", "Suspend a project: sandboxes stop, access ends."))
app.command("close")(_status_cmd("closed", "Close a project: access ends, workspace archived."))
app.command("reactivate")(_status_cmd("active", "Reactivate a suspended project."))


@app.command()
def extend(
    project_id: str,
    end_date: str = typer.Argument(..., help="New end date, YYYY-MM-DD."),
    no_apply: bool = NO_APPLY,
    actor: str | None = ACTOR,
) -> None:
    """Change a project's end date."""
    from tre.project_edit import set_end_date

    try:
        new_end = dt.date.fromisoformat(end_date)
    except ValueError:
        err.print(f"[red]{end_date!r} is not a date (YYYY-MM-DD)[/]")
        raise typer.Exit(2) from None

    def edit(settings: Settings) -> tuple[str, str, dict]:
        set_end_date(settings.policies_dir, project_id, new_end)
        return ("end_date", project_id, dict(end_date=end_date))

    _edit_then_apply(edit, not no_apply, actor)


@app.command()
def enforce(
    loop: bool = typer.Option(
        False,
        "--loop",
        help="Run every enforce_interval_seconds, and within enforce_poll_seconds of a change "
        "to the declarations.",
    ),
    no_hub: bool = typer.Option(
        False,
        "--no-hub",
        help="There is no hub (or it is stopped): do not call it, and archive workspaces "
        "without checking for running sandboxes.",
    ),
    no_gc: bool = typer.Option(
        False,
        "--no-gc",
        help="Do not run the airlock's retention collection (`airlock gc`), even when due.",
    ),
) -> None:
    """Enforce end dates: stop sandboxes, remove extracts, archive workspaces, purge archives;
    then run the airlock's retention collection if gc_interval_hours (policies/retention.yaml)
    passed since its last run."""
    from tre.enforce import EnforceReport, enforce, enforce_loop
    from tre.provision import AirlockAudit, TreExtracts, open_hub

    settings = load_settings()
    audit, extracts = AirlockAudit(settings), TreExtracts()

    def show(report: EnforceReport) -> None:
        for c in report.changes:
            console.print(f"{c.project}: {c.action.value} {c.detail}")
        for group, users in report.staff_revoked:
            console.print(f"hub group {group}: removed {', '.join(users)} (not in staff.yaml)")
        for a in report.archived:
            console.print(f"archived workspace -> {a}")
        for d in report.deleted:
            console.print(f"deleted archive past its date: {d}")
        if report.gc is not None and not report.gc.error:  # a failure is among the errors
            console.print(report.gc.summary(), markup=False, highlight=False, soft_wrap=True)
            for st in report.gc.details.get("stale_staging", []):
                console.print(f"  removed staging released/{st['path']}", markup=False)
        for e in report.errors:
            err.print(f"[red]{escape(e)}[/]")  # paths and exception texts may hold brackets
        if not report.did_something and report.ok:
            console.print("[green]Nothing to enforce.[/]")

    if loop:
        stop = threading.Event()
        try:
            enforce_loop(
                settings,
                lambda: load_registry(settings.policies_dir),
                extracts=extracts,
                audit=audit,
                stop=stop,
                on_report=show,
                use_hub=not no_hub,
                gc=not no_gc,
            )
        except KeyboardInterrupt:
            stop.set()
        return
    hub, warning = (None, "--no-hub") if no_hub else open_hub(settings)
    if warning:
        err.print(f"[yellow]hub not used:[/] {warning}")
    report = enforce(
        settings,
        _registry(settings),
        hub=hub,
        extracts=extracts,
        audit=audit,
        archive_without_hub=no_hub,
        gc=not no_gc,
    )
    show(report)
    raise typer.Exit(0 if report.ok else 1)

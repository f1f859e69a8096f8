"""`airlock serve`, `airlock gc`, `airlock db ...` and `airlock workflow ...` (the review
service side)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from tre.settings import get_settings

if TYPE_CHECKING:
    from airlock.retention import GcReport

DOC = Path(__file__).resolve().parent.parent / "docs" / "airlock.md"

db_app = typer.Typer(no_args_is_help=True, help="The airlock database.")
workflow_app = typer.Typer(no_args_is_help=True, help="The request state machine.")


def serve(
    host: str = typer.Option(None, help="TCP address (default: settings.hub_ip)."),
    port: int = typer.Option(None, help="TCP port (default: settings.airlock_port)."),
    uds: Path = typer.Option(None, "--uds", help="Also listen on this unix socket (sandboxes)."),
    log_level: str = typer.Option("info"),
    workers: int = typer.Option(
        None,
        min=1,
        max=64,
        help="Worker processes sharing the sockets; about one per core, since one Python "
        "process runs on one core at a time (default: settings.airlock_workers, 2).",
    ),
    threads: int = typer.Option(
        None,
        min=1,
        max=256,
        help="Per worker: threads running the endpoints; further requests wait in the event "
        "loop (default: settings.airlock_threads, 8).",
    ),
    check_processes: int = typer.Option(
        None,
        min=0,
        max=64,
        help="Per worker: processes running the disclosure checks at nice 10 (0: in the "
        "request's thread; default: settings.airlock_check_processes, 1).",
    ),
) -> None:
    """Run the airlock service (as a JupyterHub service: reads the JUPYTERHUB_* environment)."""
    from airlock.service.auth import HubConfig
    from airlock.service.runner import serve_workers

    settings = get_settings()
    serve_workers(
        settings,
        HubConfig.from_env(),
        host or settings.hub_ip,
        port or settings.airlock_port,
        uds,
        log_level,
        workers=workers or settings.airlock_workers,
        check_processes=(
            settings.airlock_check_processes if check_processes is None else check_processes
        ),
        threads=threads or settings.airlock_threads,
    )


@db_app.command("upgrade")
def db_upgrade(
    url: str = typer.Option(None, help="Database URL (default: settings.airlock_db_url)."),
) -> None:
    """Apply the Alembic migrations (idempotent)."""
    from airlock.service.db import current_revision, make_engine, upgrade

    engine = make_engine(url or get_settings().airlock_db_url or "")
    upgrade(engine)
    typer.echo(f"airlock database at revision {current_revision(engine)}")


@workflow_app.command("diagram")
def diagram(
    write: bool = typer.Option(False, "--write", help=f"Update the diagram in {DOC.name}."),
    check: bool = typer.Option(False, "--check", help="Exit 1 if the document is stale."),
) -> None:
    """Print (or write into docs/airlock.md) the state diagram generated from the table."""
    from airlock.workflow import doc_is_current, generated_block, render_doc

    if check:
        if not doc_is_current(DOC):
            typer.echo(f"{DOC} is stale: run `airlock workflow diagram --write`", err=True)
            raise typer.Exit(1)
        typer.echo(f"{DOC} is current")
        return
    if write:
        text = DOC.read_text(encoding="utf-8") if DOC.exists() else "# The airlock\n"
        DOC.write_text(render_doc(text), encoding="utf-8")
        typer.echo(f"wrote {DOC}")
        return
    typer.echo(generated_block())


def gc(
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print what would be removed; change nothing."
    ),
    url: str = typer.Option(None, help="Database URL (default: settings.airlock_db_url)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Apply policies/retention.yaml: remove snapshots no request can still release, the
    released files of projects past their grace period, the file contents of requests released
    longer ago than released_content_retention_days (their record stays) and the staging
    directories of releases that never finished (one audit event per run, and one per request
    whose content is purged). The expiry enforcer runs this too."""
    from airlock.retention import (
        GcIncomplete,
        RetentionPolicyError,
        collect,
        load_retention_policy,
    )
    from airlock.service.core import AirlockService
    from airlock.service.db import make_engine
    from tre.registry import RegistryError, load_registry

    settings = get_settings()
    try:
        policy = load_retention_policy(settings.policies_dir)
        registry = load_registry(settings.policies_dir)
    except (RetentionPolicyError, RegistryError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    engine = make_engine(url or settings.airlock_db_url or "")
    failure: GcIncomplete | None = None
    try:
        report = collect(AirlockService(settings, engine, registry), policy, dry_run=dry_run)
    except GcIncomplete as exc:  # everything decided and recorded; some trash is left
        failure, report = exc, exc.report
    except OSError as exc:  # a disk error mid-run: what it moved is finished by the next run
        typer.echo(f"error: airlock gc stopped: {exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        engine.dispose()
    _print_gc_report(report, dry_run, as_json)
    if failure is not None:
        typer.echo(f"error: {failure}", err=True)
        raise typer.Exit(1)


def _print_gc_report(report: GcReport, dry_run: bool, as_json: bool) -> None:
    import json

    if as_json:
        details = {"dry_run": dry_run, **report.details(), "not_deleted": report.not_deleted}
        typer.echo(json.dumps(details, indent=2))
        return
    verb = "would remove" if dry_run else "removed"
    size = sum(s["size"] for s in report.snapshots + report.orphans)
    typer.echo(
        f"{verb} {len(report.snapshots)} snapshot(s) of ended requests and"
        f" {len(report.orphans)} unreferenced snapshot(s) ({size} bytes);"
        f" kept {len(report.kept_shared)} shared with a request that still needs them"
    )
    for s in report.snapshots:
        typer.echo(f"  snapshot {s['sha256']} ({', '.join(s['requests'])})")
    days = report.released_content_retention_days
    if days is None:
        typer.echo("kept the contents of released requests (released_content_retention_days null)")
    else:
        typer.echo(
            f"{verb} the file contents of {len(report.released_content)} request(s) released"
            f" more than {days} days ago"
        )
    for p in report.released_content:
        typer.echo(f"  {p['request']} ({p['project']}, released {p['released_at'][:10]})")
    typer.echo(f"{verb} the released files of {len(report.released)} request(s)")
    for r in report.released:
        why = (
            f"downloadable until {r['downloadable_until']}"
            if r["downloadable_until"]
            else "contents purged"
        )
        typer.echo(f"  {r['request']} ({r['project']}, {why})")
    typer.echo(f"{verb} {len(report.stale_staging)} stale staging dir(s) of unfinished releases")
    for st in report.stale_staging:
        typer.echo(f"  released/{st['path']} (last changed {st['last_changed']})")
    if report.stale_uploads:
        typer.echo(
            f"{verb} {len(report.stale_uploads)} file(s) a killed snapshot left in snapshots/tmp"
        )
    if report.stale_checks:
        typer.echo(
            f"{verb} {len(report.stale_checks)} working dir(s) of killed disclosure checks"
            " in checking/"
        )
    if report.finished_from_interrupted_run:
        typer.echo(
            f"finished an interrupted run: {len(report.finished_from_interrupted_run)} item(s)"
        )
    for item in report.not_deleted:
        typer.echo(f"  NOT DELETED {item['path']}: {item['error']}")


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    app.command("gc")(gc)
    app.add_typer(db_app, name="db")
    app.add_typer(workflow_app, name="workflow")

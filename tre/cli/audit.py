"""`tre audit` commands: verify the hash chain, export the log as JSON lines."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

app = typer.Typer(no_args_is_help=True)

DB_URL = typer.Option(None, "--db-url", help="Airlock database (default: settings.airlock_db_url).")


def _session(db_url: str | None):  # noqa: ANN202
    from sqlalchemy import inspect
    from sqlalchemy.orm import Session

    from airlock.service.db import make_engine
    from tre.settings import get_settings

    engine = make_engine(db_url or get_settings().airlock_db_url or "")
    if not inspect(engine).has_table("audit_event"):
        typer.echo("no audit log in this database (run `airlock db upgrade`)", err=True)
        raise typer.Exit(2)
    return Session(engine)


@app.command("verify")
def verify(db_url: str = DB_URL) -> None:
    """Check the hash chain; name every edited, removed or reordered event (exit 1)."""
    from tre.audit import verify_chain

    with _session(db_url) as session:
        problems = verify_chain(session)
        count = session.execute(
            __import__("sqlalchemy").text("SELECT count(*) FROM audit_event")
        ).scalar_one()
    if problems:
        for p in problems:
            typer.echo(f"TAMPERED {p}", err=True)
        typer.echo(f"audit log: {len(problems)} problem(s) in {count} events", err=True)
        raise typer.Exit(1)
    typer.echo(f"audit log verifies: {count} events, chain intact")


@app.command("export")
def export(
    output: Path = typer.Option(None, "--output", "-o", help="File to write (default stdout)."),
    db_url: str = DB_URL,
) -> None:
    """Write every event, oldest first, as JSON lines (with their hashes)."""
    from tre.audit import export_events

    with _session(db_url) as session:
        out = open(output, "w", encoding="utf-8") if output else sys.stdout  # noqa: SIM115
        try:
            for line in export_events(session):
                out.write(line + "\n")
        finally:
            if output:
                out.close()

"""The ``tre`` command line: one sub-command group per concern, each in its own module."""

from __future__ import annotations

import typer

from tre.cli import audit, data, demo, extract, hub, policy, project

app = typer.Typer(no_args_is_help=True, help="Childhood-cancer trusted research environment.")
app.add_typer(data.app, name="data", help="Generate, import and ingest site data.")
app.add_typer(extract.app, name="extract", help="Build per-project read-only extracts.")
app.add_typer(project.app, name="project", help="Provision projects (declared as code).")
app.add_typer(audit.app, name="audit", help="Verify and export the hash-chained audit log.")
app.add_typer(hub.app, name="hub", help="Generate JupyterHub configuration and run the hub.")
app.add_typer(policy.app, name="policy", help="Validate declarations; publish JSON Schemas.")
app.command("demo")(demo.demo)


def main() -> None:
    app()

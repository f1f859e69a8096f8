"""`tre demo`: the whole TRE locally on the embedded default."""

from __future__ import annotations

import typer


def demo(
    tour: bool = typer.Option(False, "--tour", help="Run the whole story headlessly and exit."),
) -> None:
    """Build the demo data (and, as the hub and airlock land, start them)."""
    from tre.demo import run_demo

    raise typer.Exit(run_demo(tour=tour))

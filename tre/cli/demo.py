"""`tre demo`: the whole TRE locally on the embedded default."""

from __future__ import annotations

from pathlib import Path

import typer

from tre.settings import REPO_ROOT


def demo(
    tour: bool = typer.Option(False, "--tour", help="Run the whole story headlessly and exit."),
    screenshots: bool = typer.Option(
        False, "--screenshots", help="Run the tour and photograph the main pages (Chromium)."
    ),
    screenshots_dir: Path = typer.Option(
        REPO_ROOT / "docs" / "screenshots", help="Where --screenshots writes its PNG files."
    ),
    patients: int = typer.Option(
        2000, min=50, help="Synthetic children in total (first run only; the data is reused)."
    ),
    skip_quality_reports: bool = typer.Option(
        False, help="Ingest without the per-batch data-quality reports (a faster first start)."
    ),
) -> None:
    """Start the TRE locally (hub, sandboxes, airlock, demo data and accounts); Ctrl-C stops it."""
    from tre.demo import run_demo

    then = None
    if tour or screenshots:
        from tre.demo_tour import run_tour

        shots = screenshots_dir if screenshots else None

        def then(ctx):  # noqa: ANN001, ANN202 (a DemoContext; the tour's exit status)
            return run_tour(ctx, screenshots=shots)

    raise typer.Exit(
        run_demo(then=then, patients=patients, quality_reports=not skip_quality_reports)
    )

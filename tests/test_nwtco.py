"""The real NWTS cohort as site us-nwts: honest mapping, nothing invented, validates clean."""

from __future__ import annotations

import polars as pl
import pytest
from typer.testing import CliRunner

from tre.cli import app
from tre.dictionary import errors_of, load_dictionary, validate_batch
from tre.nwtco import DAYS_PER_MONTH, SITE_ID, load_nwtco, nwtco_delivery
from tre.registry import load_registry
from tre.synth import read_delivery


@pytest.fixture(scope="module")
def source():
    return load_nwtco()


@pytest.fixture(scope="module")
def delivery(source):
    return nwtco_delivery(source)


def test_source_is_the_real_cohort(source):
    assert source.height == 4028
    assert source["seqno"].n_unique() == 4028
    assert set(source["study"]) == {3, 4}
    assert set(source["stage"]) == {1, 2, 3, 4}


def test_mapping_is_row_for_row(source, delivery):
    pat, tum, ev, fu = (delivery[t] for t in ("patient", "tumour", "event", "followup"))
    assert pat.height == tum.height == fu.height == 4028
    assert ev.height == source["rel"].sum()
    src = source.with_columns(
        pl.concat_str([pl.lit("NWTS-"), pl.col("seqno").cast(pl.String)]).alias("patient_id")
    )
    t = tum.join(src, on="patient_id", how="inner")
    assert t.height == 4028
    # age in months m -> a day inside month m of life
    days = t["age_at_diagnosis_days"].cast(pl.Int64)
    assert ((days >= t["age"] * DAYS_PER_MONTH) & (days < (t["age"] + 1) * DAYS_PER_MONTH)).all()
    assert (
        t["stage"] == t["stage_right"].replace_strict({1: "I", 2: "II", 3: "III", 4: "IV"})
    ).all()
    assert (
        t["histology_group"] == t["histol"].replace_strict({1: "Favourable", 2: "Unfavourable"})
    ).all()
    assert set(t["icdo3_morphology"]) == {"8960"} and set(t["icdo3_topography"]) == {"C64.9"}
    p = pat.join(src, on="patient_id")
    assert p.select(
        (
            pl.col("study_id") == pl.concat_str([pl.lit("NWTS-"), pl.col("study").cast(pl.String)])
        ).all()
    ).item()
    # relapse at diagnosis + edrel days; last contact likewise
    e = ev.with_columns(pl.col("tumour_id").str.replace("-T1$", "").alias("patient_id")).join(
        t.select("patient_id", "age_at_diagnosis_days", "edrel", "rel"), on="patient_id"
    )
    assert (e["rel"] == 1).all()
    assert (
        e["age_at_event_days"].cast(pl.Int64)
        == e["age_at_diagnosis_days"].cast(pl.Int64) + e["edrel"]
    ).all()


def test_nothing_is_invented(delivery):
    assert set(delivery["patient"]["sex"]) == {"Not Reported"}
    assert delivery["patient"]["birth_year"].null_count() == 4028
    assert delivery["tumour"]["diagnosis_year"].null_count() == 4028
    assert delivery["tumour"]["laterality"].null_count() == 4028
    assert delivery["treatment"].height == 0
    assert set(delivery["followup"]["vital_status"]) == {"Not Reported"}
    assert delivery["followup"]["cause_of_death"].null_count() == 4028
    assert set(delivery["event"]["event_type"]) == {"Relapse"}


def test_delivery_validates_clean_and_is_wilms(delivery):
    res = validate_batch(load_dictionary(), delivery)
    assert errors_of(res).height == 0
    tum = res["tumour"].valid
    assert set(tum["iccc3_subgroup"]) == {"VIa"}
    assert res["patient"].valid.height == 4028


def test_cli_import_without_a_home_directory(tmp_path, monkeypatch, policies_dir):
    monkeypatch.setenv("HOME", str(tmp_path / "no-such-home"))
    r = CliRunner().invoke(app, ["data", "import-nwtco", "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    site = load_registry(policies_dir).sites[SITE_ID]
    files = sorted(p.name for p in (tmp_path / "out" / SITE_ID).iterdir())
    assert files == sorted(
        f"{t}.{site.file_format}" for t in ("event", "followup", "patient", "treatment", "tumour")
    )
    tables = read_delivery(tmp_path / "out" / SITE_ID)
    assert tables["tumour"].height == 4028
    assert not (tmp_path / "no-such-home").exists()

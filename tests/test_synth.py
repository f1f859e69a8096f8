"""Synthetic deliveries: determinism, site plans, dialects, defects manifest, realism."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lifelines import KaplanMeierFitter
from typer.testing import CliRunner

from tre.cli import app
from tre.dictionary import errors_of, load_dictionary, validate_batch
from tre.iccc3 import recode
from tre.registry import load_registry
from tre.synth import (
    DEFECT_KINDS,
    REAL_SITES,
    SHARES_FILE,
    generate,
    load_profile,
    plan_sites,
    read_delivery,
)


def digest_tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def dictionary():
    return load_dictionary()


def test_same_seed_gives_byte_identical_files(tmp_path, policies_dir):
    a = generate(tmp_path / "a", 3, 1500, seed=11, defects_rate=0.02, policies_dir=policies_dir)
    generate(tmp_path / "b", 3, 1500, seed=11, defects_rate=0.02, policies_dir=policies_dir)
    generate(tmp_path / "c", 3, 1500, seed=12, defects_rate=0.02, policies_dir=policies_dir)
    da, db, dc = (digest_tree(tmp_path / x) for x in "abc")
    assert da == db
    assert da != dc
    assert da.keys() == dc.keys()
    formats = {s["id"]: s["file_format"] for s in a.sites}
    assert any(k.endswith(".parquet") for k in da) and any(k.endswith(".csv") for k in da)
    for site, fmt in formats.items():
        for t in ("patient", "tumour", "treatment", "event", "followup"):
            assert f"{site}/{t}.{fmt}" in da
    assert not list(tmp_path.rglob("*.tmp"))


def test_site_plan_follows_the_declared_sites(policies_dir):
    declared = {
        s.id: s for s in load_registry(policies_dir).sites.values() if s.id not in REAL_SITES
    }
    plans = plan_sites(len(declared) * 2 + 1, 10_001, policies_dir)
    assert sum(p.patients for p in plans) == 10_001
    assert len({p.id for p in plans}) == len(plans)
    assert all(p.id not in REAL_SITES for p in plans)
    for p in plans:
        t = declared[p.template]
        assert p.file_format == t.file_format and p.country == t.country
        assert p.id == t.id or p.id.startswith(t.id + "-")
    assert {p.id for p in plans[: len(declared)]} == set(declared)
    with pytest.raises(ValueError):
        plan_sites(0, 10, policies_dir)


def test_extra_sites_get_declarations_the_registry_accepts(tmp_path, policies_dir):
    import shutil

    s = generate(tmp_path / "out", 5, 500, seed=2, policies_dir=policies_dir)
    extra = [x["id"] for x in s.sites if x["id"] != x["template"]]
    assert extra
    # a copy of the policies with the extra declarations added loads cleanly
    pol = tmp_path / "policies"
    shutil.copytree(policies_dir, pol)
    for f in (tmp_path / "out" / "site-declarations").iterdir():
        shutil.copy(f, pol / "sites" / f.name)
    reg = load_registry(pol)
    for x in s.sites:
        site = reg.sites[x["id"]]
        assert site.file_format == x["file_format"]
    with pytest.raises(ValueError):
        plan_sites(5, 3, policies_dir)


def test_clean_deliveries_in_every_dialect_validate_without_errors(
    tmp_path, dictionary, policies_dir
):
    s = generate(tmp_path, 4, 4000, seed=5, policies_dir=policies_dir)
    assert len({site["dialect"] for site in s.sites}) == 3
    assert not (tmp_path / "defects.csv").exists()
    for site in s.sites:
        tables = read_delivery(tmp_path / site["id"])
        res = validate_batch(dictionary, tables)
        errs = errors_of(res)
        assert errs.height == 0, (site["id"], errs.head(5))
        assert {t: r.valid.height for t, r in res.items()} == site["rows"]
    # local ids differ between sites and are not positional
    ids = pl.read_csv(tmp_path / s.sites[0]["id"] / "patient.csv", infer_schema=False)["patient_id"]
    assert ids.n_unique() == ids.len() and ids.to_list() != sorted(ids.to_list())


def test_defects_are_caught_exactly(tmp_path, dictionary, policies_dir):
    generate(tmp_path, 3, 9000, seed=21, defects_rate=0.02, policies_dir=policies_dir)
    manifest = pl.read_csv(tmp_path / "defects.csv")
    assert set(manifest["kind"]) == set(DEFECT_KINDS)  # every kind is exercised
    for site, man in manifest.group_by("site"):
        res = validate_batch(dictionary, read_delivery(tmp_path / site[0]))
        errs = errors_of(res)
        found = set(errs.select("table", "row").unique().iter_rows())
        expected = set(man.select("table", "row").iter_rows())
        assert found == expected, (site, sorted(found ^ expected)[:5])
        # and the rule the manifest names is among the errors of that row
        joined = man.join(errs, on=["table", "row", "rule"], how="anti")
        assert joined.height == 0, joined.head()


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, policies_dir_module):
    out = tmp_path_factory.mktemp("cohort")
    generate(out, 3, 60_000, seed=3, policies_dir=policies_dir_module)
    d = load_dictionary()
    frames = {t: [] for t in ("patient", "tumour", "followup")}
    for site in sorted(p for p in out.iterdir() if p.is_dir()):
        res = validate_batch(d, read_delivery(site))
        for t in frames:
            frames[t].append(
                res[t].valid.drop("_row").with_columns(pl.lit(site.name).alias("site"))
            )
    tum = pl.concat(frames["tumour"])
    fu = pl.concat(frames["followup"])
    pat = pl.concat(frames["patient"])
    return pat, tum.join(fu, on=["site", "patient_id"]).join(pat, on=["site", "patient_id"])


@pytest.fixture(scope="module")
def policies_dir_module():
    return Path(__file__).resolve().parent.parent / "policies"


def km5(df: pl.DataFrame) -> float:
    t = (df["age_at_last_contact_days"] - df["age_at_diagnosis_days"]).to_numpy() / 365.25
    e = (df["vital_status"] == "Dead").to_numpy()
    return float(KaplanMeierFitter().fit(t, e).survival_function_at_times(5.0).iloc[0])


def test_iccc3_mix_matches_the_expected_shares(cohort):
    _, tum = cohort
    expected = pl.read_csv(SHARES_FILE)
    mix = tum.group_by("iccc3_group").len().with_columns(pl.col("len") / tum.height)
    got = dict(mix.iter_rows())
    for g, share in expected.select("group", "expected_share").iter_rows():
        assert abs(got.get(g, 0) - share) < max(0.006, 0.15 * share), (g, got.get(g), share)


def test_age_and_sex_shapes(cohort):
    pat, tum = cohort
    age = pl.col("age_at_diagnosis_days") / 365.25
    under5 = tum.select((age < 5).mean()).item()
    assert 0.40 <= under5 <= 0.55
    med = dict(tum.group_by("iccc3_subgroup").agg(age.median()).iter_rows())
    assert 2 <= med["Ia"] <= 5.5  # lymphoid leukaemia peaks at 2-4
    assert med["IVa"] < 2.5 and med["V"] < 2.5  # embryonal tumours in infancy
    assert med["VIIIa"] > 10 and med["IIa"] > 10  # bone tumours and Hodgkin in adolescence
    boys = pat.select((pl.col("sex") == "Male").mean()).item()
    assert 0.52 <= boys <= 0.56
    # tumour ages stay inside childhood, follow-up after diagnosis
    assert tum.select(age.max()).item() < 15
    assert (tum["age_at_last_contact_days"] > tum["age_at_diagnosis_days"]).all()


def test_survival_is_calibrated(cohort):
    _, tum = cohort
    overall = km5(tum)
    assert 0.77 <= overall <= 0.85
    by = {g: km5(tum.filter(pl.col("iccc3_subgroup") == g)) for g in ("Ia", "Ib", "VIa")}
    assert 0.84 <= by["Ia"] <= 0.92
    assert 0.60 <= by["Ib"] <= 0.76
    assert 0.87 <= by["VIa"] <= 0.96
    cns = km5(tum.filter(pl.col("iccc3_group") == "III"))
    assert 0.58 <= cns <= 0.80


def test_profile_diagnoses_recode_to_their_subgroups():
    p = load_profile()
    assert np.isclose(p.probs.sum(), 1)
    df = pl.DataFrame(
        {"m": p.diag_morph, "b": p.diag_beh, "t": p.diag_topo},
    )
    out = recode(df, "m", "b", "t")
    assert out["iccc3_subgroup"].null_count() == 0


def test_cli_generate_and_bad_arguments(tmp_path):
    runner = CliRunner()
    out = tmp_path / "out"
    r = runner.invoke(
        app,
        ["data", "generate", "--sites", "2", "--patients", "300", "--seed", "1", "--out", str(out)],
    )
    assert r.exit_code == 0, r.output
    assert (out / "manifest.json").exists()
    bad = tmp_path / "bad"
    r = runner.invoke(
        app, ["data", "generate", "--sites", "5", "--patients", "2", "--out", str(bad)]
    )
    assert r.exit_code != 0 and "patients" in r.output
    assert not bad.exists()
    r = runner.invoke(app, ["data", "generate", "--defects", "0.9", "--out", str(bad)])
    assert r.exit_code != 0
    assert not bad.exists()


def test_stage_and_histology_change_survival(cohort):
    _, tum = cohort
    nb = tum.filter(pl.col("iccc3_subgroup") == "IVa")
    assert km5(nb.filter(pl.col("stage") == "L1")) - km5(nb.filter(pl.col("stage") == "M")) > 0.2
    wilms = tum.filter(pl.col("icdo3_morphology") == 8960)
    fav = km5(wilms.filter(pl.col("histology_group") == "Favourable"))
    unfav = km5(wilms.filter(pl.col("histology_group") == "Unfavourable"))
    assert fav - unfav > 0.05
    share = wilms.select((pl.col("histology_group") == "Unfavourable").mean()).item()
    assert 0.07 <= share <= 0.13


def test_rerun_replaces_the_whole_output_and_refuses_foreign_directories(tmp_path, policies_dir):
    out = tmp_path / "out"
    generate(out, 4, 400, seed=1, defects_rate=0.05, policies_dir=policies_dir)
    assert (out / "defects.csv").exists() and (out / "site-declarations").exists()
    generate(out, 2, 200, seed=1, policies_dir=policies_dir)
    # nothing of the earlier, larger run survives
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", *[p.id for p in plan_sites(2, 200, policies_dir)]]
    )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.txt").write_text("precious")
    with pytest.raises(ValueError, match="not an earlier output"):
        generate(foreign, 1, 10, seed=1, policies_dir=policies_dir)
    assert [p.name for p in foreign.iterdir()] == ["thesis.txt"]


def test_cli_check_reports_errors_by_rule(tmp_path, policies_dir):
    runner = CliRunner()
    generate(tmp_path / "d", 1, 500, seed=4, defects_rate=0.05, policies_dir=policies_dir)
    site = tmp_path / "d" / plan_sites(1, 500, policies_dir)[0].id
    r = runner.invoke(app, ["data", "check", str(site), "--errors-out", str(tmp_path / "e.csv")])
    assert r.exit_code == 1, r.output
    errs = pl.read_csv(tmp_path / "e.csv")
    manifest = pl.read_csv(tmp_path / "d" / "defects.csv")
    assert set(errs.select("table", "row").iter_rows()) == set(
        manifest.select("table", "row").iter_rows()
    )
    generate(tmp_path / "clean", 1, 200, seed=4, policies_dir=policies_dir)
    clean = tmp_path / "clean" / plan_sites(1, 200, policies_dir)[0].id
    r = runner.invoke(app, ["data", "check", str(clean)])
    assert r.exit_code == 0 and "no errors" in r.output
    (tmp_path / "empty").mkdir()
    r = runner.invoke(app, ["data", "check", str(tmp_path / "empty")])
    assert r.exit_code == 2


@settings(max_examples=6, deadline=None)
@given(
    sites=st.integers(1, 4),
    patients=st.integers(4, 400),
    seed=st.integers(0, 2**31),
    rate=st.sampled_from([0.01, 0.05, 0.2, 0.5]),
)
def test_any_generated_cohort_has_exactly_its_manifest_rejected(sites, patients, seed, rate):
    import tempfile

    d = load_dictionary()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        patients = max(patients, sites)
        generate(
            out, sites, patients, seed, rate, Path(__file__).resolve().parent.parent / "policies"
        )
        manifest = pl.read_csv(out / "defects.csv", schema_overrides={"row": pl.Int64})
        for site in sorted(
            p for p in out.iterdir() if p.is_dir() and p.name != "site-declarations"
        ):
            errs = errors_of(validate_batch(d, read_delivery(site)))
            found = set(errs.select("table", "row").unique().iter_rows())
            expected = set(
                manifest.filter(pl.col("site") == site.name).select("table", "row").iter_rows()
            )
            assert found == expected


def test_cli_check_reads_as_ingest_does_a_corrupt_parquet_is_a_clear_error(tmp_path, policies_dir):
    """`tre data check` read Parquet with polars' reader, which aborted the whole process on a
    corrupt page header (ingest had been hardened against it); it now reads as ingest does.
    Run as a real process so that an abort shows as a failure, not as a dead test runner."""
    import os
    import subprocess
    import sys

    from test_fuzz_ingest import corrupt_page_header

    generate(tmp_path / "d", 1, 200, seed=4, policies_dir=policies_dir)
    site = tmp_path / "d" / plan_sites(1, 200, policies_dir)[0].id
    for csv in site.glob("*.csv"):  # deliver every table as Parquet
        pl.read_csv(csv, infer_schema=False).write_parquet(csv.with_suffix(".parquet"))
        csv.unlink()
    corrupt_page_header(site / "tumour.parquet", negative=True)
    res = subprocess.run(
        [sys.executable, "-c", "from tre.cli import main; main()", "data", "check", str(site)],
        capture_output=True, text=True, timeout=120,
        env=dict(os.environ, RUST_BACKTRACE="0", COLUMNS="200"),
    )  # fmt: skip
    assert res.returncode == 2, (res.returncode, res.stderr[-800:])
    assert "tumour.parquet: cannot be read" in res.stdout + res.stderr
    assert "Traceback" not in res.stderr and "panicked" not in res.stderr

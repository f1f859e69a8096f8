"""A site's own column names and local codes, declared in policies/sites/<site>.yaml (`columns`,
`codes`): a real registry delivers its export as it is, the admin declares how to read it."""

import shutil
from pathlib import Path

import duckdb
import polars as pl
import pytest
import site_files
import yaml
from typer.testing import CliRunner

from tre.ingest import IngestError, ingest_files
from tre.policy_validate import validate_policies
from tre.pseudonymise import init_key
from tre.registry import RegistryError, load_registry
from tre.settings import Settings, get_settings

REPO = Path(__file__).resolve().parent.parent
# the site's export: its own headers, and sex coded 1 = girl, 2 = boy (the dictionary's shared
# synonyms read '1' as Male, '2' as Female: only the site's own codes give the right answer)
COLUMNS = {
    "patient": {"Pat ID": "patient_id", "Gender": "sex"},
    "tumour": {"Tumour Ref": "tumour_id", "Pat ID": "patient_id"},
    "treatment": {"Tumour Ref": "tumour_id"},
    "event": {"Tumour Ref": "tumour_id"},
    "followup": {"Pat ID": "patient_id"},
}
CODES = {"patient.sex": {"1": "Female", "2": "Male", " U ": "Unknown"}}


def _policies(tmp_path: Path, **site_fields) -> Path:
    out = tmp_path / "policies"
    shutil.copytree(REPO / "policies", out, dirs_exist_ok=True)
    path = out / "sites" / "uk-ccr.yaml"
    site = yaml.safe_load(path.read_text()) | site_fields
    path.write_text(yaml.safe_dump(site, sort_keys=False))
    return out


def _export(tmp_path: Path) -> tuple[list[Path], dict[str, pl.DataFrame]]:
    """A delivery as the site exports it: its headers, its sex codes, one invalid child."""
    tables = site_files.generate(80, seed=5, id_prefix="UKX")
    n = tables["patient"].height
    sex = pl.Series(["1", "2", "u"] * (n // 3) + ["1"] * (n % 3))
    tables["patient"] = tables["patient"].with_columns(sex.alias("sex"))
    tables["patient"] = site_files.set_cell(tables["patient"], 4, "birth_year", "not a year")
    renamed = {
        t: df.rename({d: s for s, d in COLUMNS[t].items() if d in df.columns})
        for t, df in tables.items()
    }
    return site_files.write(renamed, tmp_path / "export"), tables


def _settings(tmp_path: Path, policies: Path) -> Settings:
    s = Settings(state_dir=tmp_path / "state", policies_dir=policies)
    init_key(s.hmac_key_file)
    return s


def test_a_site_export_is_read_with_its_own_names_and_codes(tmp_path):
    s = _settings(tmp_path, _policies(tmp_path, columns=COLUMNS, codes=CODES))
    files, tables = _export(tmp_path)
    r = ingest_files(s, "uk-ccr", files, on_invalid="quarantine", quality_report=False)
    assert r.status == "loaded", r.errors
    patient_errors = r.errors.filter(pl.col("table") == "patient")
    assert patient_errors.select("row", "column").rows() == [(5, "birth_year")]
    # the child's other rows go with it (their parent is not loaded), nothing else
    others = r.errors.filter(pl.col("table") != "patient")
    assert set(others["column"]) <= {"patient_id", "tumour_id"}
    con = duckdb.connect(str(s.pooled_dir / "pooled.duckdb"), read_only=True)
    try:
        sexes = dict(con.execute("SELECT sex, count(*) FROM patient GROUP BY 1").fetchall())
        quarantined = con.execute("SELECT data FROM _quarantine").fetchall()
        joined = con.execute(
            "SELECT count(*) FROM tumour t JOIN patient p USING (site_id, patient_id)"
        ).fetchone()[0]
    finally:
        con.close()
    delivered = tables["patient"]["sex"].to_list()
    kept = delivered[:4] + delivered[5:]  # row 5 is quarantined
    assert sexes == {
        "Female": kept.count("1"),
        "Male": kept.count("2"),
        "Unknown": kept.count("u"),
    }
    # the tumours of kept children join their child: the same pseudonym under both names
    assert joined == tables["tumour"].filter(pl.col("patient_id") != "UKX00000004").height
    # the quarantined row is stored under the dictionary's names, its id pseudonymised: the
    # site's header 'Pat ID' must not carry the local id past the pseudonymisation
    assert len(quarantined) == r.invalid_rows > 1
    for (data,) in quarantined:
        assert "UKX00000004" not in data and '"pat_id"' not in data


def test_without_the_sites_codes_the_shared_synonyms_would_invert_sex(tmp_path):
    """The control: the same export read with the names but not the codes."""
    s = _settings(tmp_path, _policies(tmp_path, columns=COLUMNS))
    files, tables = _export(tmp_path)
    r = ingest_files(s, "uk-ccr", files, on_invalid="quarantine", quality_report=False)
    con = duckdb.connect(str(s.pooled_dir / "pooled.duckdb"), read_only=True)
    try:
        female = con.execute("SELECT count(*) FROM patient WHERE sex = 'Female'").fetchone()[0]
    finally:
        con.close()
    assert r.status == "loaded"
    kept = tables["patient"]["sex"].to_list()
    assert female == (kept[:4] + kept[5:]).count("2")


def test_without_a_declaration_the_export_is_refused_by_name(tmp_path):
    s = _settings(tmp_path, _policies(tmp_path))
    files, _ = _export(tmp_path)
    with pytest.raises(IngestError, match="pat_id"):
        ingest_files(s, "uk-ccr", files, quality_report=False)


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"columns": {"patient": {"Gender": "gender"}}}, "not a delivered column"),
        ({"columns": {"patient": {"Country": "country"}}}, "not a delivered column"),
        ({"columns": {"patients": {"Gender": "sex"}}}, "not a table"),
        ({"columns": {"patient": {"A": "sex", "B": "sex"}}}, "mapped to sex too"),
        ({"columns": {"patient": {"Pat ID": "patient_id", "pat-id": "sex"}}}, "several names"),
        ({"codes": {"patient.sex": {"1": "F"}}}, "'F' is not one of"),
        ({"codes": {"patient.birth_year": {"x": "1999"}}}, "not a delivered code column"),
        ({"codes": {"patient.sex": {"f": "Female", " F": "Male"}}}, "also given as"),
    ],
)
def test_a_wrong_declaration_is_refused_before_anything_is_read(tmp_path, fields, problem):
    s = _settings(tmp_path, _policies(tmp_path, **fields))
    files, _ = _export(tmp_path)
    with pytest.raises(IngestError, match=problem) as exc:
        ingest_files(s, "uk-ccr", files, quality_report=False)
    assert "policies/sites/uk-ccr.yaml" in str(exc.value)
    assert not (s.pooled_dir / "pooled.duckdb").exists()
    found = [p for p in validate_policies(s.policies_dir)[1] if p.file.name == "uk-ccr.yaml"]
    assert any(problem in str(p) for p in found), found  # `tre policy validate` says it too


@pytest.mark.parametrize(
    "text", ["codes:\n  patient.sex:\n    1: Female\n", "codes:\n  patient.sex:\n    '1': 2\n"]
)
def test_unquoted_codes_are_refused(tmp_path, text):
    """YAML reads 01 as 1 and yes as true: a site code must be quoted text."""
    policies = _policies(tmp_path)
    path = policies / "sites" / "uk-ccr.yaml"
    path.write_text(path.read_text() + text)
    with pytest.raises(RegistryError, match="quoted text"):
        load_registry(policies)


def test_data_check_reads_the_export_as_the_site_declares_it(tmp_path, monkeypatch):
    from tre.cli import app

    policies = _policies(tmp_path, columns=COLUMNS, codes=CODES)
    files, _ = _export(tmp_path)
    runner = CliRunner()
    monkeypatch.setenv("TRE_POLICIES_DIR", str(policies))
    get_settings.cache_clear()
    try:
        without = runner.invoke(app, ["data", "check", str(files[0].parent)])
        out = tmp_path / "errors.csv"
        args = ["data", "check", "--site", "uk-ccr", "--errors-out", str(out)]
        declared = runner.invoke(app, [*args, str(files[0].parent)])
    finally:
        get_settings.cache_clear()
    assert without.exit_code == 2 and "pat_id" in without.output, without.output
    assert declared.exit_code == 1, declared.output
    assert pl.read_csv(out).select("table", "row", "column").rows() == [
        ("patient", 5, "birth_year")
    ]

"""A table added to the data dictionary works end to end without a code change: the dictionary
is data (policies/dictionary.yaml), so a custodian who adds, say, a biospecimen table must get
it validated, pseudonymised, pooled, granted to projects and extracted like the core tables."""

import datetime as dt
import shutil
from pathlib import Path

import duckdb
import polars as pl
import pytest
import site_files
import yaml

from tre.extract import build_extract
from tre.ingest import IngestError, ingest_files, table_of
from tre.pseudonymise import init_key
from tre.registry import RegistryError, load_registry
from tre.settings import Settings

REPO = Path(__file__).resolve().parent.parent
TODAY = dt.date(2026, 6, 1)

BIOSPECIMEN = {
    "description": "One row per stored biospecimen.",
    "columns": {
        "specimen_id": {"type": "string", "required": True, "identifier": True, "unique": True},
        "tumour_id": {"type": "string", "required": True, "identifier": True},
        "specimen_type": {
            "type": "code",
            "required": True,
            "codes": ["Tissue", "Blood", "Bone marrow"],
            "synonyms": {"Bone marrow": ["bm"]},
        },
        "age_at_collection_days": {"type": "int", "required": True, "min": 0, "max": 21915},
    },
}
RULES = [
    {
        "id": "biospecimen_tumour_exists",
        "kind": "foreign_key",
        "table": "biospecimen",
        "column": "tumour_id",
        "ref_table": "tumour",
        "ref_column": "tumour_id",
    },
    {
        "id": "collection_after_diagnosis",
        "kind": "not_before",
        "table": "biospecimen",
        "column": "age_at_collection_days",
        "key": "tumour_id",
        "ref_table": "tumour",
        "ref_key": "tumour_id",
        "ref_column": "age_at_diagnosis_days",
        "aggregate": "min",
        "tolerance_days": 0,
    },
]


@pytest.fixture
def policies(tmp_path: Path) -> Path:
    out = tmp_path / "policies"
    shutil.copytree(REPO / "policies", out)
    d = yaml.safe_load((out / "dictionary.yaml").read_text())
    d["tables"]["biospecimen"] = BIOSPECIMEN
    d["rules"] += RULES
    (out / "dictionary.yaml").write_text(yaml.safe_dump(d, sort_keys=False))
    return out


def _delivery(tmp_path: Path) -> tuple[list[Path], dict[str, pl.DataFrame]]:
    tables = site_files.generate(60, seed=3)
    tumour = tables["tumour"]
    tables["biospecimen"] = pl.DataFrame(
        {
            "specimen_id": [f"S{i:05d}" for i in range(tumour.height)],
            "tumour_id": tumour["tumour_id"],
            "specimen_type": ["Tissue", "bm", "blood"] * (tumour.height // 3)
            + ["Tissue"] * (tumour.height % 3),
            "age_at_collection_days": (tumour["age_at_diagnosis_days"].cast(pl.Int64) + 10).cast(
                pl.String
            ),
        }
    )
    b = tables["biospecimen"]
    b = site_files.set_cell(b, 0, "tumour_id", "NO-SUCH-TUMOUR")  # orphan
    b = site_files.set_cell(b, 1, "specimen_type", "saliva")  # not in the code list
    b = site_files.set_cell(b, 2, "age_at_collection_days", "0")  # before diagnosis
    tables["biospecimen"] = b
    return site_files.write(tables, tmp_path / "delivery"), tables


def test_a_dictionary_table_is_ingested_pseudonymised_and_extracted(tmp_path, policies):
    s = Settings(state_dir=tmp_path / "state", policies_dir=policies)
    init_key(s.hmac_key_file)
    files, tables = _delivery(tmp_path)
    r = ingest_files(s, "uk-ccr", files, on_invalid="quarantine")
    assert r.status == "loaded"
    # the data-quality report covers the new table (completeness, code distributions)
    assert r.report_error is None
    report = r.report_html.read_text()
    assert "biospecimen.specimen_type" in report and "Bone marrow" in report
    errs = r.errors.filter(pl.col("table") == "biospecimen")
    assert sorted(zip(errs["row"], errs["rule"], strict=True)) == [
        (1, "biospecimen_tumour_exists"),
        (2, "code_list"),
        (3, "collection_after_diagnosis"),
    ]
    assert r.rows_added["biospecimen"] == tables["biospecimen"].height - 3

    con = duckdb.connect(str(s.pooled_dir / "pooled.duckdb"), read_only=True)
    try:
        pooled = con.execute(
            "SELECT count(*), count(t.tumour_id), count(DISTINCT b.specimen_type), "
            "bool_and(b.specimen_id NOT LIKE 'S%'), max(b.load_batch) "
            "FROM biospecimen b LEFT JOIN tumour t USING (site_id, tumour_id)"
        ).fetchone()
    finally:
        con.close()
    # every kept row's pseudonymised tumour_id is the tumour table's pseudonym of that tumour,
    # codes harmonised ('bm' -> 'Bone marrow'), local ids replaced, provenance stamped
    assert pooled == (r.rows_added["biospecimen"], r.rows_added["biospecimen"], 3, True, r.batch_id)

    project = yaml.safe_load((policies / "projects" / "wilms-outcomes.yaml").read_text())
    project["grants"]["biospecimen"] = ["specimen_id", "tumour_id", "specimen_type"]
    (policies / "projects" / "wilms-outcomes.yaml").write_text(yaml.safe_dump(project))
    reg = load_registry(policies)
    path = build_extract(s, reg, "wilms-outcomes", TODAY)
    assert path is not None
    ext = duckdb.connect(str(path), read_only=True)
    try:
        cols = [
            c for (c,) in ext.execute("SELECT column_name FROM (DESCRIBE biospecimen)").fetchall()
        ]
        outside = ext.execute(
            "SELECT count(*) FROM biospecimen WHERE tumour_id NOT IN (SELECT tumour_id FROM tumour)"
        ).fetchone()[0]
        kept = ext.execute("SELECT count(*) FROM biospecimen").fetchone()[0]
    finally:
        ext.close()
    assert cols == ["specimen_id", "tumour_id", "specimen_type"]
    # the project's tumour filter (Wilms tumours) reaches the new table through tumour_id
    assert outside == 0 and 0 < kept < r.rows_added["biospecimen"]


def test_delivered_file_names_follow_the_dictionary(policies):
    from tre.dictionary import load_dictionary

    tables = list(load_dictionary(policies / "dictionary.yaml").tables)
    assert table_of(Path("uk-ccr_biospecimen.csv"), tables) == "biospecimen"
    assert table_of(Path("tumour.parquet"), tables) == "tumour"
    with pytest.raises(IngestError, match="biospecimen"):
        table_of(Path("samples.csv"), tables)


def test_data_check_reads_the_dictionary_tables(tmp_path, policies, monkeypatch):
    from typer.testing import CliRunner

    from tre.cli import app
    from tre.settings import get_settings

    files, _ = _delivery(tmp_path)
    site = files[0].parent
    (site / "biospecimen.csv").rename(site / "uk-ccr_biospecimen.csv")  # named as ingest allows
    monkeypatch.setenv("TRE_POLICIES_DIR", str(policies))
    get_settings.cache_clear()
    try:
        res = CliRunner().invoke(
            app, ["data", "check", str(site), "--errors-out", str(tmp_path / "e.csv")]
        )
    finally:
        monkeypatch.delenv("TRE_POLICIES_DIR")
        get_settings.cache_clear()
    assert res.exit_code == 1, res.output
    errors = pl.read_csv(tmp_path / "e.csv").filter(pl.col("table") == "biospecimen")
    assert sorted(errors["rule"]) == [
        "biospecimen_tumour_exists",
        "code_list",
        "collection_after_diagnosis",
    ]


def test_a_grant_of_a_table_the_dictionary_lacks_is_refused(tmp_path):
    policies = tmp_path / "policies"
    shutil.copytree(REPO / "policies", policies)
    project = yaml.safe_load((policies / "projects" / "wilms-outcomes.yaml").read_text())
    project["grants"]["biospecimen"] = ["specimen_id"]
    (policies / "projects" / "wilms-outcomes.yaml").write_text(yaml.safe_dump(project))
    with pytest.raises(RegistryError, match="biospecimen"):
        load_registry(policies)


def test_a_grant_of_a_dictionary_table_is_accepted(policies):
    project = yaml.safe_load((policies / "projects" / "wilms-outcomes.yaml").read_text())
    project["grants"]["biospecimen"] = ["*"]
    (policies / "projects" / "wilms-outcomes.yaml").write_text(yaml.safe_dump(project))
    assert "biospecimen" in load_registry(policies).projects["wilms-outcomes"].grants

import json
import os
import shutil
import stat

import duckdb
import polars as pl
import pytest
import site_files

from tre.ingest import IngestError, batch_identity, ingest_files, table_of
from tre.pooled import PooledStore
from tre.pseudonymise import Pseudonymiser, PseudonymKeyError, init_key, load_key
from tre.settings import Settings

TABLES = ("patient", "tumour", "treatment", "event", "followup")


@pytest.fixture
def settings(tmp_path):
    s = Settings(state_dir=tmp_path / "state")
    init_key(s.hmac_key_file)
    return s


@pytest.fixture(scope="module")
def delivery():
    return site_files.generate(400, seed=3)


def ingest(settings, site, files, **kw):
    kw.setdefault("quality_report", False)
    return ingest_files(settings, site, files, **kw)


def q(settings, sql, params=None):
    con = duckdb.connect(str(PooledStore(settings.pooled_dir).db_path), read_only=True)
    try:
        return con.execute(sql, params or {}).fetchall()
    finally:
        con.close()


def state(settings):
    """A fingerprint of everything the pooled store holds (order-independent)."""
    path = PooledStore(settings.pooled_dir).db_path
    if not path.exists():
        return None
    con = duckdb.connect(str(path), read_only=True)
    try:
        out = {}
        for (t,) in con.execute(
            "SELECT table_name FROM duckdb_tables() ORDER BY table_name"
        ).fetchall():
            cols = [
                c
                for (c,) in con.execute(
                    "SELECT column_name FROM duckdb_columns() WHERE table_name = $t", {"t": t}
                ).fetchall()
                if c not in ("recorded_at", "created_at")
            ]
            sel = ", ".join(f'"{c}"' for c in cols)
            out[t] = con.execute(
                f"SELECT count(*), coalesce(sum(hash({sel})), 0) FROM (SELECT {sel} FROM {t})"
            ).fetchone()
        return out
    finally:
        con.close()


def data_state(st):
    """Only the pooled data tables and versions (rejections are recorded in _batches)."""
    if st is None:
        return {}
    return {k: v for k, v in st.items() if k != "_batches" and v[0] > 0}


def test_valid_batch_loads_pseudonymised_harmonised_with_provenance(settings, tmp_path, delivery):
    files = site_files.write(delivery, tmp_path / "in")
    r = ingest(settings, "uk-ccr", files, source_version="2026-06")
    assert r.status == "loaded" and r.pooled_version == 1 and r.invalid_rows == 0
    assert r.rows_added == {t: delivery[t].height for t in TABLES}
    # provenance on every row of every table
    for t in TABLES:
        [(n, sites, ds, sv, lb)] = q(
            settings,
            f"SELECT count(*), list(DISTINCT site_id), list(DISTINCT source_dataset), "
            f"list(DISTINCT source_version), list(DISTINCT load_batch) FROM {t}",
        )
        assert n == delivery[t].height
        assert (sites, ds, sv, lb) == (["uk-ccr"], ["ukccr-national"], ["2026-06"], [r.batch_id])
    # pseudonyms: keyed HMAC of the local id; no local id is left anywhere in the store
    p = Pseudonymiser(load_key(settings.hmac_key_file))
    local = delivery["patient"]["patient_id"][5]
    [(sex, by)] = q(
        settings,
        "SELECT sex, birth_year FROM patient WHERE patient_id = $p",
        {"p": p.pseudonym("patient", "uk-ccr", local)},
    )
    assert by == int(delivery["patient"]["birth_year"][5])
    assert sex in {"Female", "Male"}  # harmonised from f / M / 1 / 2 ...
    raw = PooledStore(settings.pooled_dir).db_path.read_bytes()
    assert local.encode() not in raw and b"P00000" not in raw
    # the key is not stored with the data
    assert load_key(settings.hmac_key_file).hex().encode() not in raw
    # ICCC-3 derived, country/source type from the site declaration
    expected = {m + c: g for m, _, c, g in site_files.TUMOURS}
    got = q(
        settings,
        "SELECT icdo3_morphology::VARCHAR || icdo3_topography, iccc3_group FROM tumour",
    )
    assert got and all(expected[k] == g for k, g in got)
    assert q(settings, "SELECT DISTINCT country, source_type FROM patient") == [("GB", "registry")]
    # tumour.patient_id points at patient.patient_id after pseudonymisation
    [(orphans,)] = q(
        settings,
        "SELECT count(*) FROM tumour WHERE patient_id NOT IN (SELECT patient_id FROM patient)",
    )
    assert orphans == 0
    # the store and its batch records are for the TRE's services only
    assert stat.S_IMODE(settings.pooled_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(r.batch_dir.parent.stat().st_mode) == 0o700
    # batch record next to the store
    record = json.loads((r.batch_dir / "batch.json").read_text())
    assert record["status"] == "loaded" and record["pooled_version"] == 1
    assert {f["table"] for f in record["files"]} == set(TABLES)
    assert (r.batch_dir / "errors.csv").exists()


def test_same_id_two_sites_never_collide_and_same_site_is_stable(settings, tmp_path):
    a = site_files.generate(50, seed=1)
    ingest(settings, "uk-ccr", site_files.write(a, tmp_path / "a"))
    ingest(settings, "de-gpoh", site_files.write(a, tmp_path / "b"))  # same local ids
    [(n, distinct)] = q(settings, "SELECT count(*), count(DISTINCT patient_id) FROM patient")
    assert n == distinct == 100
    # a later batch from uk-ccr adds events for tumours loaded earlier: same pseudonyms
    events = a["tumour"].select("tumour_id").head(5)
    events = events.with_columns(
        pl.lit("Death").alias("event_type"), pl.lit("7000").alias("age_at_event_days")
    )
    later = {"event": events}
    r = ingest(settings, "uk-ccr", site_files.write(later, tmp_path / "c"))
    assert r.status == "loaded", r.errors
    [(joined,)] = q(
        settings,
        "SELECT count(*) FROM event e JOIN tumour t USING (tumour_id) "
        "WHERE e.event_type = 'Death' AND t.site_id = 'uk-ccr' AND e.site_id = 'uk-ccr'",
    )
    assert joined == 5
    # ... but the same events delivered as de-gpoh point at de-gpoh's tumours, not uk-ccr's
    r = ingest(settings, "de-gpoh", site_files.write(later, tmp_path / "d"))
    [(cross,)] = q(
        settings,
        "SELECT count(*) FROM event e JOIN tumour t USING (tumour_id) WHERE e.site_id <> t.site_id",
    )
    assert cross == 0


def _defective(delivery):
    d = dict(delivery)
    d["patient"] = site_files.set_cell(d["patient"], 3, "sex", "banana")  # row 4
    d["tumour"] = site_files.set_cell(d["tumour"], 0, "icdo3_morphology", "1234")  # row 1
    d["tumour"] = site_files.set_cell(d["tumour"], 7, "patient_id", "NOBODY")  # row 8
    d["followup"] = site_files.set_cell(d["followup"], 9, "age_at_last_contact_days", "-5")
    return d


def test_defective_batch_is_rejected_with_a_per_row_report(settings, tmp_path, delivery):
    good = ingest(
        settings, "uk-ccr", site_files.write(site_files.generate(20, 9, "Q"), tmp_path / "g")
    )
    before = data_state(state(settings))
    r = ingest(settings, "uk-ccr", site_files.write(_defective(delivery), tmp_path / "in"))
    assert r.status == "rejected" and r.pooled_version is None and not r.ok
    assert data_state(state(settings)) == before  # nothing of the batch was loaded
    assert q(settings, "SELECT max(version) FROM _versions") == [(good.pooled_version,)]
    report = pl.read_csv(r.errors_csv)
    assert report.columns == ["table", "row", "column", "value", "rule", "message"]
    got = {(t, row, col) for t, row, col in report.select("table", "row", "column").iter_rows()}
    assert ("patient", 4, "sex") in got
    assert ("tumour", 1, "icdo3_morphology") in got
    assert ("tumour", 8, "patient_id") in got
    assert ("followup", 10, "age_at_last_contact_days") in got
    # the invalid patient's tumours, treatments and follow-up are reported too (cascade)
    bad_patient = delivery["patient"]["patient_id"][3]
    tumour_rows = (
        delivery["tumour"].with_row_index("r", 1).filter(pl.col("patient_id") == bad_patient)
    )
    assert {("tumour", int(x)) for x in tumour_rows["r"]} <= {(t, row) for t, row, _ in got}
    # values: the offending value, identifiers only as pseudonyms
    sex_err = report.filter((pl.col("table") == "patient") & (pl.col("column") == "sex"))
    assert sex_err["value"][0] == "banana"
    assert "NOBODY" not in r.errors_csv.read_text()
    # the rejection is recorded, the rows are not
    assert q(settings, "SELECT status FROM _batches WHERE batch_id = $b", {"b": r.batch_id}) == [
        ("rejected",)
    ]


def test_quarantine_policy_loads_valid_rows_and_keeps_invalid_apart(settings, tmp_path, delivery):
    r = ingest(
        settings, "uk-ccr", site_files.write(_defective(delivery), tmp_path / "in"),
        on_invalid="quarantine",
    )  # fmt: skip
    assert r.status == "loaded"
    report = pl.read_csv(r.errors_csv)
    bad = report.select("table", "row").unique()
    assert r.quarantined_rows == bad.height > 4
    for t in TABLES:
        n_bad = bad.filter(pl.col("table") == t).height
        assert q(settings, f"SELECT count(*) FROM {t}")[0][0] == delivery[t].height - n_bad
    quarantined = q(settings, "SELECT table_name, source_row, errors, data FROM _quarantine")
    assert {(t, row) for t, row, _, _ in quarantined} == set(bad.iter_rows())
    by_key = {(t, row): (json.loads(e), json.loads(d)) for t, row, e, d in quarantined}
    errs, data = by_key[("patient", 4)]
    assert data["sex"] == "banana" and errs[0]["column"] == "sex"
    p = Pseudonymiser(load_key(settings.hmac_key_file))
    assert data["patient_id"] == p.pseudonym(
        "patient", "uk-ccr", delivery["patient"]["patient_id"][3]
    )
    # the bad patient is not pooled, nor any row that depends on it
    pid = data["patient_id"]
    assert q(settings, "SELECT count(*) FROM patient WHERE patient_id = $p", {"p": pid}) == [(0,)]
    assert q(settings, "SELECT count(*) FROM tumour WHERE patient_id = $p", {"p": pid}) == [(0,)]
    [(orphans,)] = q(
        settings,
        "SELECT count(*) FROM treatment WHERE tumour_id NOT IN (SELECT tumour_id FROM tumour)",
    )
    assert orphans == 0


def test_identical_batch_is_a_no_op_whatever_the_file_names(settings, tmp_path, delivery):
    files = site_files.write(delivery, tmp_path / "a")
    first = ingest(settings, "uk-ccr", files)
    after = state(settings)
    again = ingest(settings, "uk-ccr", list(reversed(files)))
    assert again.status == "unchanged" and again.batch_id == first.batch_id
    assert again.pooled_version == first.pooled_version
    renamed = tmp_path / "b"
    renamed.mkdir()
    for f in files:
        shutil.copy(f, renamed / f"uk-ccr_{f.name}")
    third = ingest(settings, "uk-ccr", sorted(renamed.iterdir()))
    assert third.status == "unchanged"
    (renamed / "README.txt").write_text("not data")
    assert ingest(settings, "uk-ccr", [renamed]).status == "unchanged"  # a directory
    assert state(settings) == after
    # a different site is a different batch even for the same bytes
    assert batch_identity("de-gpoh", {}) != batch_identity("uk-ccr", {})


def test_overlapping_batch_rows_already_pooled_are_errors(settings, tmp_path, delivery):
    ingest(settings, "uk-ccr", site_files.write(delivery, tmp_path / "a"))
    before = state(settings)
    changed = dict(delivery)
    changed["patient"] = site_files.set_cell(delivery["patient"], 0, "study_id", "NEW")
    r = ingest(settings, "uk-ccr", site_files.write(changed, tmp_path / "b"))
    assert r.status == "rejected"
    assert "already_pooled" in set(r.errors["rule"])
    assert data_state(state(settings)) == data_state(before)


def test_parquet_delivery_gives_the_same_rows_as_csv(tmp_path, delivery):
    results = {}
    for fmt in ("csv", "parquet"):
        s = Settings(state_dir=tmp_path / fmt)
        init_key(s.hmac_key_file)
        if fmt == "parquet":
            shutil.copy(tmp_path / "csv" / "secrets" / "hmac.key", s.hmac_key_file)
        r = ingest(s, "fr-rnce", site_files.write(delivery, tmp_path / f"in-{fmt}", fmt))
        assert r.status == "loaded"
        results[fmt] = q(s, "SELECT * EXCLUDE (load_batch) FROM tumour ORDER BY tumour_id")
    assert results["csv"] == results["parquet"]


def test_bad_input_is_a_clear_error_and_changes_nothing(settings, tmp_path, delivery):
    files = site_files.write(delivery, tmp_path / "in")
    with pytest.raises(IngestError, match="unknown site"):
        ingest(settings, "xx-nowhere", files)
    (tmp_path / "empty-dir").mkdir()
    with pytest.raises(IngestError, match="no CSV or Parquet"):
        ingest(settings, "uk-ccr", [tmp_path / "empty-dir"])
    with pytest.raises(IngestError, match="no such file"):
        ingest(settings, "uk-ccr", [tmp_path / "missing.csv"])
    odd = tmp_path / "hospital.csv"
    odd.write_text("a,b\n1,2\n")
    with pytest.raises(IngestError, match="which table"):
        ingest(settings, "uk-ccr", [odd])
    with pytest.raises(IngestError, match="unsupported file type"):
        table_of(tmp_path / "patient.xlsx", ["patient"])
    extra = delivery["patient"].with_columns(pl.lit("Alice").alias("child_name"))
    (tmp_path / "x").mkdir()
    extra.write_csv(tmp_path / "x" / "patient.csv")
    with pytest.raises(IngestError, match="child_name"):
        ingest(settings, "uk-ccr", [tmp_path / "x" / "patient.csv"])
    (tmp_path / "y").mkdir()
    delivery["patient"].drop("sex").write_csv(tmp_path / "y" / "patient.csv")
    with pytest.raises(IngestError, match="sex"):
        ingest(settings, "uk-ccr", [tmp_path / "y" / "patient.csv"])
    garbage = tmp_path / "z" / "patient.parquet"
    garbage.parent.mkdir()
    garbage.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(IngestError, match="cannot be read"):
        ingest(settings, "uk-ccr", [garbage])
    with pytest.raises(IngestError, match="on-invalid"):
        ingest(settings, "uk-ccr", files, on_invalid="ignore")
    assert not PooledStore(settings.pooled_dir).db_path.exists()  # nothing was created


def test_missing_or_misplaced_key_stops_ingest(tmp_path, delivery):
    files = site_files.write(delivery, tmp_path / "in")
    s = Settings(state_dir=tmp_path / "s")
    with pytest.raises(PseudonymKeyError, match="init-key"):
        ingest(s, "uk-ccr", files)
    inside = Settings(state_dir=tmp_path / "t", hmac_key_file=tmp_path / "t" / "pooled" / "k")
    init_key(inside.hmac_key_file)
    with pytest.raises(PseudonymKeyError, match="never be stored with the data"):
        ingest(inside, "uk-ccr", files)
    os.chmod(s.hmac_key_file.parent, 0o700) if s.hmac_key_file.parent.exists() else None
    assert not PooledStore(s.pooled_dir).db_path.exists()


@pytest.mark.slow
def test_each_loaded_batch_gets_a_quality_report(settings, tmp_path):
    files = site_files.write(site_files.generate(60, seed=5), tmp_path / "in")
    r = ingest_files(settings, "uk-ccr", files)
    assert r.status == "loaded" and r.report_error is None, r.report_error
    assert r.report_html == settings.reports_dir / f"{r.batch_id}.html"
    html = r.report_html.read_text()
    assert r.batch_id in html and "<html" in html.lower()
    # a re-ingest changes nothing, not even the report (one report build keeps this test short)
    mtime = r.report_html.stat().st_mtime_ns
    again = ingest_files(settings, "uk-ccr", files)
    assert again.status == "unchanged" and again.report_html.stat().st_mtime_ns == mtime


def test_cli_init_key_ingest_and_status(tmp_path, monkeypatch, delivery):
    from typer.testing import CliRunner

    from tre.cli import app
    from tre.settings import get_settings

    monkeypatch.setenv("TRE_STATE_DIR", str(tmp_path / "cli"))
    get_settings.cache_clear()
    runner = CliRunner()
    try:
        res = runner.invoke(app, ["data", "init-key"])
        assert res.exit_code == 0 and "0600" in res.output
        assert runner.invoke(app, ["data", "init-key"]).exit_code == 1  # never silently replaced
        bad = site_files.write(_defective(delivery), tmp_path / "bad")
        res = runner.invoke(app, ["data", "ingest", "--site", "uk-ccr", *map(str, bad),
                                  "--no-report"])  # fmt: skip
        assert res.exit_code == 1 and "rejected" in res.output and "code_list" in res.output
        assert "errors.csv" in res.output
        good = site_files.write(delivery, tmp_path / "good")
        args = ["data", "ingest", "--site", "uk-ccr", *map(str, good), "--no-report"]
        res = runner.invoke(app, [*args, "--rebuild-extracts"])
        assert res.exit_code == 0 and "pooled version 1" in res.output, res.output
        from tre.registry import load_registry

        for project in load_registry(get_settings().policies_dir).projects.values():
            assert f"extract {project.id}" in res.output
            extract = tmp_path / "cli" / "extracts" / f"{project.id}.duckdb"
            assert extract.exists() == project.is_active()
        res = runner.invoke(app, args)
        assert res.exit_code == 0 and "already loaded" in res.output
        res = runner.invoke(app, ["data", "ingest", "--site", "nowhere", *map(str, good)])
        assert res.exit_code == 2 and "unknown site" in res.output
        res = runner.invoke(app, ["data", "status"])
        assert res.exit_code == 0 and "pooled version 1" in res.output
    finally:
        get_settings.cache_clear()


def test_generated_multi_site_deliveries_with_planted_defects(settings, tmp_path):
    """The project's generator (site dialects, CSV and Parquet, a manifest of planted defects):
    every planted defect is reported with its rule, the pool holds exactly the rest, and
    nothing in the pool points at a missing row."""
    from tre.synth import generate

    summary = generate(tmp_path / "d", 3, 3000, seed=11, defects_rate=0.02)
    manifest = pl.read_csv(tmp_path / "d" / "defects.csv")
    for site in summary.sites:
        files = sorted((tmp_path / "d" / site["id"]).iterdir())
        r = ingest(settings, site["id"], files, on_invalid="quarantine")
        assert r.status == "loaded"
        planted = manifest.filter(pl.col("site") == site["id"]).select("table", "row", "rule")
        missed = planted.join(r.errors, on=["table", "row", "rule"], how="anti")
        assert missed.height == 0, missed.head()
        bad = r.errors.select("table", "row").unique()
        for t, delivered in site["rows"].items():
            n_bad = bad.filter(pl.col("table") == t).height
            assert r.rows_added.get(t, 0) == delivered - n_bad
    for child, parent, key in [
        ("tumour", "patient", "patient_id"),
        ("followup", "patient", "patient_id"),
        ("treatment", "tumour", "tumour_id"),
        ("event", "tumour", "tumour_id"),
    ]:
        [(orphans,)] = q(
            settings,
            f"SELECT count(*) FROM {child} WHERE {key} NOT IN (SELECT {key} FROM {parent})",
        )
        assert orphans == 0
    sites = {s for (s,) in q(settings, "SELECT DISTINCT site_id FROM patient")}
    assert sites == {s["id"] for s in summary.sites}


def test_hostile_values_and_column_names_are_data_not_code(settings, tmp_path):
    hostile = [
        "x'); DROP TABLE patient; --",
        '"; DELETE FROM _batches; --',
        '=HYPERLINK("http://127.0.0.1/")',
        "line\nbreak, comma",
        "ünïcødé ✓ 病",
        "A" * 100_000,
    ]
    d = site_files.generate(len(hostile) + 2, seed=4)
    d["patient"] = d["patient"].with_columns(
        pl.Series("study_id", [*hostile, None, None], dtype=pl.String)
    )
    r = ingest(settings, "uk-ccr", site_files.write(d, tmp_path / "in"))
    assert r.status == "loaded", r.errors
    got = {v for (v,) in q(settings, "SELECT study_id FROM patient WHERE study_id IS NOT NULL")}
    assert got == set(hostile)  # stored verbatim
    assert q(settings, "SELECT count(*) FROM _batches") == [(1,)]
    # a hostile column NAME is an unknown column: the batch is refused before any SQL
    bad = d["patient"].rename({"study_id": 'study_id"; DROP TABLE patient; --'})
    (tmp_path / "bad").mkdir()
    bad.write_csv(tmp_path / "bad" / "patient.csv")
    with pytest.raises(IngestError, match="unknown column"):
        ingest(settings, "uk-ccr", [tmp_path / "bad" / "patient.csv"])
    assert q(settings, "SELECT count(*) FROM patient") == [(len(hostile) + 2,)]


def test_a_damaged_pooled_store_is_a_clear_cli_error(settings, tmp_path, monkeypatch, delivery):
    from typer.testing import CliRunner

    from tre.cli import app
    from tre.settings import get_settings

    files = site_files.write(delivery, tmp_path / "in")
    settings.pooled_dir.mkdir(parents=True)
    db = PooledStore(settings.pooled_dir).db_path
    db.write_bytes(b"this is not a duckdb file" * 100)
    monkeypatch.setenv("TRE_STATE_DIR", str(settings.state_dir))
    get_settings.cache_clear()
    try:
        res = CliRunner().invoke(app, ["data", "ingest", "--site", "uk-ccr", *map(str, files)])
    finally:
        get_settings.cache_clear()
    assert res.exit_code == 3 and "pooled store error" in res.output
    assert db.read_bytes() == b"this is not a duckdb file" * 100  # left for the admin to inspect


@pytest.mark.parametrize("force_collisions", [False, True])
def test_every_row_gets_its_own_ids_pseudonym_even_when_join_hashes_collide(
    monkeypatch, force_collisions
):
    """The id -> pseudonym join is keyed by a 64-bit hash of the id; a hash shared by two ids
    must never hand one id the other's pseudonym (forced here: hash = id length)."""
    import tre.ingest as ingest_mod

    if force_collisions:
        monkeypatch.setattr(ingest_mod, "_id_hash", lambda ids: ids.str.len_bytes().cast(pl.UInt64))
    p = Pseudonymiser(bytes(range(32)))
    ids = [f"P{i}" for i in range(300)] + ["é", "中", "", None]
    frames = {
        "patient": pl.DataFrame({"patient_id": ids, "x": range(len(ids))}),
        "tumour": pl.DataFrame(
            {"tumour_id": [f"T{i}" for i in range(len(ids))], "patient_id": ids[::-1]}
        ),
        "followup": pl.DataFrame({"patient_id": [None, "P7", "never-in-patient"]}),
    }
    idcols = {"patient": ["patient_id"], "tumour": ["tumour_id", "patient_id"],
              "followup": ["patient_id"]}  # fmt: skip
    out = ingest_mod.pseudonymise_frames(frames, idcols, p, "uk-ccr")
    for table, cols in idcols.items():
        assert out[table].height == frames[table].height
        for c in cols:
            kind = c.removesuffix("_id")
            want = [None if v is None else p.pseudonym(kind, "uk-ccr", v) for v in frames[table][c]]
            assert out[table][c].to_list() == want, (table, c)
    assert out["patient"]["x"].to_list() == list(range(len(ids)))  # other columns untouched


def test_foreign_keys_checked_on_candidate_rows_give_the_same_errors_as_on_every_row(
    tmp_path, monkeypatch, delivery
):
    """The pool-level foreign-key check runs only on rows that can break it (no parent in the
    batch, or an invalid parent); checking every row must give exactly the same report and
    store, over a batch with invalid parents and a later batch whose rows point at pooled,
    duplicated, quarantined and missing parents."""
    import tre.ingest as ingest_mod

    a = _defective(delivery)
    b = site_files.generate(40, seed=6, id_prefix="Q")
    later = {
        "patient": pl.concat([b["patient"], delivery["patient"].head(6)]),  # 0-2 pooled, 3 was bad
        "tumour": pl.concat([b["tumour"], delivery["tumour"].head(12)]),
        "treatment": pl.concat([b["treatment"], delivery["treatment"].head(12)]),
        "event": pl.concat([b["event"], delivery["event"].head(8)]),
        "followup": pl.concat([b["followup"], delivery["followup"].head(12)]),
    }
    later["tumour"] = site_files.set_cell(later["tumour"], 2, "patient_id", "NOBODY")
    outcomes = []
    for everything in (False, True):
        monkeypatch.setattr(ingest_mod, "FK_CHECK_CANDIDATES_ONLY", not everything)
        s = Settings(state_dir=tmp_path / f"state-{everything}")
        s.hmac_key_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if outcomes:  # the same key: the two stores must hold the same bytes
            shutil.copy(tmp_path / "key", s.hmac_key_file)
        else:
            init_key(s.hmac_key_file)
            shutil.copy(s.hmac_key_file, tmp_path / "key")
        r1 = ingest(s, "uk-ccr", site_files.write(a, tmp_path / "a"), on_invalid="quarantine")
        r2 = ingest(s, "uk-ccr", site_files.write(later, tmp_path / "b"), on_invalid="quarantine")
        assert r1.status == r2.status == "loaded"
        assert "tumour_patient_exists" in set(r2.errors["rule"])
        assert "already_pooled" in set(r2.errors["rule"])
        outcomes.append(([r1.errors, r2.errors], r2.rows_added, data_state(state(s))))
    (errors_c, added_c, state_c), (errors_e, added_e, state_e) = outcomes
    for x, y in zip(errors_c, errors_e, strict=True):
        assert x.equals(y)
    assert added_c == added_e
    assert state_c == state_e


def test_spreadsheet_style_deliveries_give_the_same_rows(tmp_path, delivery):
    """Semicolons (comma-decimal locales), CRLF, a byte-order mark and headers such as
    'Patient ID' or 'SEX' are read as the canonical CSV is; the pooled rows are identical."""
    results = {}
    key = None
    for style in ("canonical", "spreadsheet"):
        s = Settings(state_dir=tmp_path / style)
        init_key(s.hmac_key_file)
        if key is None:
            key = s.hmac_key_file.read_bytes()
        else:
            s.hmac_key_file.write_bytes(key)
        files = site_files.write(delivery, tmp_path / f"in-{style}")
        if style == "spreadsheet":
            for path in files:
                lines = path.read_text().splitlines()
                header = [h.replace("_", " ").title() for h in lines[0].split(",")]
                body = [";".join(pl.Series([ln]).str.split(",").item()) for ln in lines[1:]]
                text = "\r\n".join([";".join(header), *body]) + "\r\n"
                path.write_bytes(b"\xef\xbb\xbf" + text.encode())
        r = ingest(s, "fr-rnce", files)
        assert r.status == "loaded", r.errors
        results[style] = q(s, "SELECT * EXCLUDE (load_batch) FROM tumour ORDER BY tumour_id")
    assert results["canonical"] == results["spreadsheet"]


def test_ambiguous_headers_and_non_utf8_text_are_clear_errors(settings, tmp_path, delivery):
    (tmp_path / "a").mkdir()
    clash = delivery["patient"].with_columns(pl.col("sex").alias("SEX"))
    clash.write_csv(tmp_path / "a" / "patient.csv")
    with pytest.raises(IngestError, match="several columns are named sex"):
        ingest(settings, "uk-ccr", [tmp_path / "a" / "patient.csv"])
    (tmp_path / "b").mkdir()
    text = delivery["patient"].with_columns(pl.lit("Léa-étude").alias("study_id")).write_csv()
    (tmp_path / "b" / "patient.csv").write_bytes(text.encode("latin-1"))
    with pytest.raises(IngestError, match="UTF-8"):
        ingest(settings, "uk-ccr", [tmp_path / "b" / "patient.csv"])
    assert not PooledStore(settings.pooled_dir).db_path.exists()


def test_rows_to_quarantine_are_read_again_only_if_the_file_is_unchanged(tmp_path):
    """Validated files are not held in memory; quarantine reads them again, and refuses a file
    that changed since the batch began rather than quarantining other rows than it checked."""
    from tre.ingest import DeliveredFiles, _sha256_file

    path = tmp_path / "patient.csv"
    path.write_text("patient_id,sex\nP1,F\nP2,M\n")
    files = DeliveredFiles({"patient": (path, _sha256_file(path))}, {"patient": 2})
    assert files.read("patient").height == 2
    path.write_text("patient_id,sex\nP1,F\nP3,M\n")
    with pytest.raises(IngestError, match="changed while it was being ingested"):
        files.read("patient")


def test_broken_files_are_refused_with_a_message_naming_the_file(settings, tmp_path, delivery):
    """Regressions found by tests/test_fuzz_ingest.py: each was a crash, a silent load or an
    error that did not say which file or what was wrong."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def refused(name: str, data: bytes, match: str) -> None:
        d = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        d.mkdir()
        (d / name).write_bytes(data)
        with pytest.raises(IngestError, match=match):
            ingest(settings, "uk-ccr", [d / name])

    text = delivery["patient"].write_csv()
    refused("patient.csv", text.encode("utf-16"), r"patient.csv: .*UTF-16.*UTF-8")
    refused("patient.csv", text.replace("F", "F\x00", 1).encode(), r"patient.csv: .*NUL bytes")
    refused("patient.csv", text.replace("study_id", "sex", 1).encode(), "several columns .* sex")
    refused("patient.csv", text.replace("study_id", "", 1).encode(), "column 4 has no name")
    refused("patient.csv", text.replace("study_id", "_row", 1).encode(), r"unknown column.*_row")
    refused("x_patient.csv", text.replace("study_id", "nhs", 1).encode(), "x_patient.csv: unknown")
    # Parquet: nested or binary columns were cast to text and loaded ('{1}'); binary is read
    # only when it is UTF-8 text (tests/test_ingest_quirks.py)
    for array, match in (
        (pa.array([{"a": 1}] * 400), "study_id .* nested, binary"),
        (pa.array([b"\xff\x00"] * 400), r"column study_id \(binary\) .* not UTF-8"),
    ):
        t = delivery["patient"].to_arrow().set_column(3, "study_id", array)
        buf = pa.BufferOutputStream()
        pq.write_table(t, buf)
        refused("patient.parquet", buf.getvalue().to_pybytes(), match)
    # a directory, FIFO or symlink where a delivered file should be
    (tmp_path / "dir" / "patient.csv").mkdir(parents=True)
    with pytest.raises(IngestError, match="no CSV or Parquet files"):
        ingest(settings, "uk-ccr", [tmp_path / "dir" / "patient.csv"])
    os.mkfifo(tmp_path / "dir" / "tumour.csv")
    with pytest.raises(IngestError, match="tumour.csv: not a regular file"):
        ingest(settings, "uk-ccr", [tmp_path / "dir" / "tumour.csv"])
    (tmp_path / "link").mkdir()
    (tmp_path / "link" / "patient.csv").symlink_to(settings.hmac_key_file)
    with pytest.raises(IngestError, match="symbolic link"):
        ingest(settings, "uk-ccr", [tmp_path / "link"])
    assert not PooledStore(settings.pooled_dir).db_path.exists()


def test_a_corrupt_parquet_page_header_is_an_error_not_a_crashed_process(tmp_path, delivery):
    """polars' Parquet reader aborted the process (a 2 EiB allocation) on a page header
    declaring a negative number of values; run in a child so the old code fails cleanly."""
    import subprocess
    import sys

    from test_fuzz_ingest import corrupt_page_header

    path = tmp_path / "tumour.parquet"
    delivery["tumour"].write_parquet(path)
    corrupt_page_header(path, negative=True)
    res = subprocess.run(
        [sys.executable, "-c", f"from tre.ingest import _read; from pathlib import Path; "
         f"_read(Path({str(path)!r}))"],
        capture_output=True, text=True, env=dict(os.environ, RUST_BACKTRACE="0"), timeout=60,
    )  # fmt: skip
    assert res.returncode == 1, res.stderr[-500:]
    assert "IngestError: tumour.parquet: cannot be read: " in res.stderr

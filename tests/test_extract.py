import datetime as dt
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
from pooled_synth import build_pooled, pooled_rows

from tre.extract import (
    ExtractError,
    build_all,
    build_extract,
    extract_info,
    extract_path,
)
from tre.pooled import PooledStore
from tre.registry import Project, Registry, RowFilters, Site, Staff
from tre.settings import Settings

TODAY = dt.date(2026, 6, 1)
SITES = {"uk-ccr": "GB", "fr-rnce": "FR", "us-nwts": "US", "de-gpoh": "DE"}


def site(id_, purposes=("academic",), jurisdictions=("*",), embargo=None):
    return Site(
        id=id_,
        name=id_,
        country=SITES[id_],
        source_type="registry",
        source_dataset=f"ds-{id_}",
        allowed_purposes=list(purposes),
        allowed_jurisdictions=list(jurisdictions),
        embargo_until=embargo,
    )


def project(id_="wilms", **kw):
    base = dict(
        id=id_,
        title="A test project",
        lay_summary="A project used by the extract tests.",
        purpose="academic",
        jurisdiction="GB",
        members=[{"username": "alice"}],
        grants={"patient": ["patient_id", "sex", "site_id"], "tumour": ["*"]},
        start_date=dt.date(2026, 1, 1),
        end_date=dt.date(2027, 1, 1),
    )
    base.update(kw)
    return Project(**base)


def registry(projects, sites=None):
    sites = sites or [
        site("uk-ccr", jurisdictions=["GB", "FR"]),
        site("fr-rnce", purposes=["academic", "public_health"], jurisdictions=["FR"]),
        site("us-nwts"),
        site("de-gpoh", purposes=["commercial"]),
    ]
    return Registry(
        sites={s.id: s for s in sites}, projects={p.id: p for p in projects}, staff=Staff()
    )


@pytest.fixture(scope="module")
def pooled_state(tmp_path_factory):
    """A pooled store built once; each test copies it (extract building never writes it)."""
    root = tmp_path_factory.mktemp("pooled")
    store = PooledStore(root / "pooled")
    counts = build_pooled(store, SITES, 300, seed=7)
    return store, counts


@pytest.fixture
def settings(tmp_path, pooled_state):
    store, _ = pooled_state
    shutil.copytree(store.dir, tmp_path / "state" / "pooled")
    return Settings(state_dir=tmp_path / "state")


def rows(path, sql):
    con = duckdb.connect(str(path), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def table_names(path):
    return {r[0] for r in rows(path, "SELECT table_name FROM duckdb_tables()")}


def test_only_granted_tables_and_columns(settings):
    reg = registry([project()])
    path = build_extract(settings, reg, "wilms", TODAY)
    assert path == extract_path(settings, "wilms") and path.exists()
    assert table_names(path) == {"patient", "tumour", "_extract"}
    cols = rows(path, "SELECT column_name FROM duckdb_columns() WHERE table_name='patient'")
    assert [c for (c,) in cols] == ["patient_id", "sex", "site_id"]
    pooled_cols = pooled_rows(
        PooledStore(settings.pooled_dir),
        "SELECT column_name FROM duckdb_columns() WHERE table_name='tumour' ORDER BY column_index",
    )
    tumour_cols = rows(
        path,
        "SELECT column_name FROM duckdb_columns() WHERE table_name='tumour' ORDER BY column_index",
    )
    assert tumour_cols == pooled_cols  # '*' grants every pooled column, in order


def test_only_rows_from_sites_allowing_purpose_and_jurisdiction(settings):
    reg = registry([project()])  # academic, GB: uk-ccr and us-nwts allow it; fr-rnce (FR only)
    path = build_extract(settings, reg, "wilms", TODAY)  # and de-gpoh (commercial) do not
    got = {s for (s,) in rows(path, "SELECT DISTINCT site_id FROM patient")}
    assert got == {"uk-ccr", "us-nwts"}
    assert {s for (s,) in rows(path, "SELECT DISTINCT site_id FROM tumour")} == got
    [(sites,)] = rows(path, "SELECT sites FROM _extract")
    assert sorted(sites) == ["uk-ccr", "us-nwts"]
    # every pooled row of those sites is there (no tumour filter)
    store = PooledStore(settings.pooled_dir)
    [(n,)] = pooled_rows(
        store, "SELECT count(*) FROM patient WHERE site_id IN ('uk-ccr','us-nwts')"
    )
    assert rows(path, "SELECT count(*) FROM patient")[0][0] == n


def test_site_filter_and_other_jurisdiction(settings):
    p = project(jurisdiction="FR", row_filters=RowFilters(sites=["fr-rnce", "us-nwts"]))
    path = build_extract(settings, registry([p]), "wilms", TODAY)
    got = {s for (s,) in rows(path, "SELECT DISTINCT site_id FROM patient")}
    assert got == {"fr-rnce", "us-nwts"}  # uk-ccr allows FR too, but the filter excludes it


def test_embargo_excludes_site_until_its_date(settings):
    sites = [site("uk-ccr", embargo=dt.date(2026, 9, 1)), site("us-nwts")]
    reg = registry([project()], sites)
    path = build_extract(settings, reg, "wilms", TODAY)
    assert {s for (s,) in rows(path, "SELECT DISTINCT site_id FROM patient")} == {"us-nwts"}
    path = build_extract(settings, reg, "wilms", dt.date(2026, 9, 1))
    got = {s for (s,) in rows(path, "SELECT DISTINCT site_id FROM patient")}
    assert got == {"uk-ccr", "us-nwts"}


def test_iccc3_filter_restricts_tumours_and_dependent_tables(settings):
    grants = {t: ["*"] for t in ("patient", "tumour", "treatment", "event", "followup")}
    p = project(grants=grants, row_filters=RowFilters(iccc3_groups=["VI", "I"]))
    path = build_extract(settings, registry([p]), "wilms", TODAY)
    assert {g for (g,) in rows(path, "SELECT DISTINCT iccc3_group FROM tumour")} == {"I", "VI"}
    store = PooledStore(settings.pooled_dir)
    sites = "('uk-ccr','us-nwts')"
    expected_tumours = pooled_rows(
        store,
        f"SELECT count(*) FROM tumour WHERE iccc3_group IN ('I','VI') AND site_id IN {sites}",
    )[0][0]
    assert rows(path, "SELECT count(*) FROM tumour")[0][0] == expected_tumours > 0
    # patients: exactly those with a qualifying tumour
    pat = set(rows(path, "SELECT patient_id FROM patient"))
    assert pat == set(rows(path, "SELECT DISTINCT patient_id FROM tumour"))
    expected_pat = set(
        pooled_rows(
            store,
            f"SELECT DISTINCT patient_id FROM tumour WHERE iccc3_group IN ('I','VI') "
            f"AND site_id IN {sites}",
        )
    )
    assert pat == expected_pat
    # a patient with a group-I tumour and another tumour: the other tumour is NOT exported
    other = pooled_rows(
        store,
        f"SELECT count(*) FROM tumour WHERE iccc3_group NOT IN ('I','VI') AND site_id IN {sites} "
        f"AND patient_id IN (SELECT patient_id FROM tumour WHERE iccc3_group IN ('I','VI'))",
    )[0][0]
    assert other > 0  # the generated data has such patients
    # treatments/events only of qualifying tumours, all of them
    for table in ("treatment", "event"):
        tids = rows(path, f"SELECT DISTINCT tumour_id FROM {table}")
        assert set(tids) <= set(rows(path, "SELECT tumour_id FROM tumour"))
        expected = pooled_rows(
            store,
            f"SELECT count(*) FROM {table} WHERE tumour_id IN (SELECT tumour_id FROM tumour "
            f"WHERE iccc3_group IN ('I','VI') AND site_id IN {sites})",
        )[0][0]
        assert rows(path, f"SELECT count(*) FROM {table}")[0][0] == expected > 0
    assert set(rows(path, "SELECT patient_id FROM followup")) == pat


def test_diagnosis_year_filter(settings):
    p = project(row_filters=RowFilters(diagnosis_year_min=2005, diagnosis_year_max=2010))
    path = build_extract(settings, registry([p]), "wilms", TODAY)
    [(lo, hi, n)] = rows(
        path, "SELECT min(diagnosis_year), max(diagnosis_year), count(*) FROM tumour"
    )
    assert n > 0 and lo >= 2005 and hi <= 2010
    expected = pooled_rows(
        PooledStore(settings.pooled_dir),
        "SELECT count(*) FROM tumour WHERE diagnosis_year BETWEEN 2005 AND 2010 "
        "AND site_id IN ('uk-ccr','us-nwts')",
    )[0][0]
    assert n == expected


def test_metadata_names_pooled_version_sites_project_and_time(settings):
    path = build_extract(settings, registry([project()]), "wilms", TODAY)
    info = extract_info(settings, "wilms")
    assert info["project_id"] == "wilms"
    assert info["pooled_version"] == len(SITES)  # one version per generated batch
    assert sorted(info["sites"]) == ["uk-ccr", "us-nwts"]
    age = dt.datetime.now(dt.UTC) - info["built_at"]
    assert dt.timedelta(0) <= age < dt.timedelta(minutes=5)
    assert info["tables"]["patient"]["columns"] == ["patient_id", "sex", "site_id"]
    assert info["tables"]["patient"]["rows"] == rows(path, "SELECT count(*) FROM patient")[0][0]
    assert info["mode"] == "0o444"


def test_extract_is_read_only_file(settings):
    path = build_extract(settings, registry([project()]), "wilms", TODAY)
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    assert not any(p.name.endswith((".tmp", ".wal")) for p in settings.extracts_dir.iterdir())


def _try_write(path, as_nobody: bool):
    code = (
        "import duckdb,sys\n"
        "try:\n"
        f"    c = duckdb.connect({str(path)!r})\n"
        "    c.execute('CREATE TABLE hacked AS SELECT 1')\n"
        "    c.close()\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, e); sys.exit(3)\n"
        "sys.exit(0)\n"
    )
    cmd, env = [sys.executable, "-c", code], None
    if as_nobody:
        # `nobody` may not reach this checkout's environment (e.g. a checkout under /root):
        # give it the base interpreter and a world-readable copy of the duckdb package
        lib = path.parent / "nobody-pylib"
        site = Path(duckdb.__file__).resolve().parent.parent
        for item in [site / "duckdb", *site.glob("_duckdb*"), *site.glob("duckdb-*.dist-info")]:
            copy = shutil.copytree if item.is_dir() else shutil.copy2
            copy(item, lib / item.name)
        for root, _dirs, files in os.walk(lib):
            os.chmod(root, 0o755)
            for f in files:
                os.chmod(os.path.join(root, f), 0o644)
        cmd = [os.path.realpath(sys.executable), "-c", code]
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(lib)}
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)


def test_opening_the_extract_for_writing_fails_for_a_non_owner(settings, tmp_path):
    path = build_extract(settings, registry([project()]), "wilms", TODAY)
    if os.geteuid() == 0:
        # root ignores 0444; the sandbox user is not root: prove it as `nobody`
        for p in [path.parent, *path.parents]:
            if p == p.parent:
                break
            os.chmod(p, os.stat(p).st_mode | 0o005)
        res = _try_write(path, as_nobody=True)
    else:
        res = _try_write(path, as_nobody=False)
    assert res.returncode == 3, res.stdout + res.stderr
    assert "Permission denied" in res.stdout
    assert "hacked" not in {t for t in table_names(path)}
    # and reading works for that user
    assert rows(path, "SELECT count(*) FROM patient")[0][0] > 0


def test_opening_for_writing_fails_on_a_read_only_mount(settings, require_bwrap):
    path = build_extract(settings, registry([project()]), "wilms", TODAY)
    code = (
        "import duckdb,sys\n"
        "try:\n"
        "    c = duckdb.connect('/data/x.duckdb')\n"
        "    c.execute('CREATE TABLE hacked AS SELECT 1'); c.close()\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, e); sys.exit(3)\n"
        "c = duckdb.connect('/data/x.duckdb', read_only=True)\n"
        "print(c.execute('SELECT count(*) FROM patient').fetchone()[0]); sys.exit(0)\n"
    )
    res = subprocess.run(
        [require_bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--tmpfs", "/mnt",
         "--ro-bind", str(path.parent), "/mnt/data",
         "--unshare-net", sys.executable, "-c", code.replace("/data/x", f"/mnt/data/{path.stem}")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 3, res.stdout + res.stderr
    assert "Read-only file system" in res.stdout
    assert "hacked" not in table_names(path)


def test_rebuild_swaps_atomically_and_old_readers_keep_working(settings):
    reg = registry([project()])
    path = build_extract(settings, reg, "wilms", TODAY)
    old_reader = duckdb.connect(str(path), read_only=True)
    before = old_reader.execute("SELECT count(*) FROM patient").fetchone()[0]
    old_inode = path.stat().st_ino
    # more pooled data, then rebuild while the old reader holds the file open
    build_pooled(PooledStore(settings.pooled_dir), {"uk-ccr": "GB"}, 50, seed=99)
    build_extract(settings, reg, "wilms", TODAY)
    assert path.stat().st_ino != old_inode
    assert old_reader.execute("SELECT count(*) FROM patient").fetchone()[0] == before
    old_reader.close()
    assert rows(path, "SELECT count(*) FROM patient")[0][0] == before + 50
    assert extract_info(settings, "wilms")["pooled_version"] == len(SITES) + 1


@pytest.mark.parametrize(
    "change",
    [
        {"end_date": dt.date(2026, 5, 31)},
        {"status": "suspended"},
        {"status": "closed"},
        {"start_date": dt.date(2026, 7, 1), "end_date": dt.date(2027, 7, 1)},
    ],
)
def test_inactive_project_gets_no_extract_and_loses_the_old_one(settings, change):
    path = build_extract(settings, registry([project()]), "wilms", TODAY)
    assert path.exists()
    inactive = project(**change)
    assert build_extract(settings, registry([inactive]), "wilms", TODAY) is None
    assert not extract_path(settings, "wilms").exists()


def test_unknown_column_is_a_clear_error_and_keeps_the_old_extract(settings):
    path = build_extract(settings, registry([project()]), "wilms", TODAY)
    before = path.read_bytes()
    # a broader grant with a typo: the old extract is still within the rules, so it stays
    bad = project(
        grants={"patient": ["patient_id", "sex", "site_id", "name_of_child"], "tumour": ["*"]}
    )
    with pytest.raises(ExtractError, match="name_of_child"):
        build_extract(settings, registry([bad]), "wilms", TODAY)
    assert path.read_bytes() == before
    assert sorted(p.name for p in settings.extracts_dir.iterdir()) == ["wilms.duckdb"]


def test_unknown_project_and_missing_pooled_store(settings, tmp_path):
    with pytest.raises(ExtractError, match="unknown project"):
        build_extract(settings, registry([project()]), "nope", TODAY)
    from tre.pooled import PooledStoreError

    empty = Settings(state_dir=tmp_path / "empty")
    with pytest.raises(PooledStoreError, match="ingest data first"):
        build_extract(empty, registry([project()]), "wilms", TODAY)
    [outcome] = build_all(empty, registry([project()]), TODAY)  # reported, not raised
    assert outcome.path is None and "ingest data first" in outcome.error


def test_build_all_builds_active_removes_inactive_and_undeclared(settings):
    a = project("alpha")
    b = project("beta", status="suspended")
    c = project("gamma", grants={"patient": ["nope"]})
    build_extract(settings, registry([project("beta"), project("zeta")]), "beta", TODAY)
    build_extract(settings, registry([project("zeta")]), "zeta", TODAY)
    outcomes = {o.project_id: o for o in build_all(settings, registry([a, b, c]), TODAY)}
    assert outcomes["alpha"].path == extract_path(settings, "alpha")
    assert outcomes["beta"].path is None and outcomes["beta"].removed
    assert "nope" in outcomes["gamma"].error
    assert outcomes["zeta"].removed
    assert sorted(p.name for p in settings.extracts_dir.iterdir()) == ["alpha.duckdb"]


def test_no_allowed_site_gives_empty_tables(settings):
    p = project(purpose="commercial", jurisdiction="JP")
    sites = [site("uk-ccr"), site("us-nwts")]  # academic only
    path = build_extract(settings, registry([p], sites), "wilms", TODAY)
    assert rows(path, "SELECT count(*) FROM patient")[0][0] == 0
    assert rows(path, "SELECT sites FROM _extract")[0][0] == []


def test_cli_extract_build_and_info(settings, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from tre.cli import app
    from tre.settings import get_settings

    monkeypatch.setenv("TRE_STATE_DIR", str(settings.state_dir))
    get_settings.cache_clear()
    runner = CliRunner()
    try:
        # the shipped policies: wilms-outcomes is active until 2028 (academic, GB)
        res = runner.invoke(app, ["extract", "build", "wilms-outcomes", "--on", "2026-06-01"])
        assert res.exit_code == 0, res.output
        res = runner.invoke(app, ["extract", "info", "wilms-outcomes"])
        assert res.exit_code == 0 and "pooled_version" in res.output and "0o444" in res.output
        res = runner.invoke(app, ["extract", "build", "--all", "--on", "2029-01-01"])
        assert res.exit_code == 0 and "no extract" in res.output  # both projects ended
        assert not extract_path(settings, "wilms-outcomes").exists()
        assert runner.invoke(app, ["extract", "build", "nope"]).exit_code == 1
        assert runner.invoke(app, ["extract", "info", "wilms-outcomes"]).exit_code == 1
        assert runner.invoke(app, ["extract", "build"]).exit_code != 0
    finally:
        get_settings.cache_clear()


def test_empty_group_list_selects_nothing(settings):
    grants = {"patient": ["*"], "tumour": ["*"], "event": ["*"]}
    p = project(grants=grants, row_filters=RowFilters(iccc3_groups=[]))
    path = build_extract(settings, registry([p]), "wilms", TODAY)
    assert [rows(path, f"SELECT count(*) FROM {t}")[0][0] for t in grants] == [0, 0, 0]


def test_end_to_end_from_ingested_sites_with_the_shipped_projects(tmp_path, policies_dir):
    """Real pipeline: generated deliveries and the NWTS-like site ingested through
    tre.ingest, then the shipped projects' extracts built as declared in policies/."""
    import site_files

    from tre.ingest import ingest_files
    from tre.pseudonymise import init_key
    from tre.registry import load_registry

    s = Settings(state_dir=tmp_path / "e2e")
    init_key(s.hmac_key_file)
    for n, site_id in enumerate(("uk-ccr", "fr-rnce", "us-nwts", "de-gpoh")):
        files = site_files.write(site_files.generate(150, seed=n), tmp_path / site_id)
        assert ingest_files(s, site_id, files, quality_report=False).status == "loaded"
    reg = load_registry(policies_dir)
    on = dt.date(2026, 6, 1)
    for project in reg.projects.values():
        path = build_extract(s, reg, project.id, on)
        allowed = {x.id for x in reg.sites_for(project, on)}
        info = extract_info(s, project.id)
        assert set(info["sites"]) == allowed and info["pooled_version"] == 4
        for table, cols in project.grants.items():
            sql = (
                "SELECT column_name FROM duckdb_columns() "
                f"WHERE table_name = '{table}' ORDER BY column_index"
            )
            got = [c for (c,) in rows(path, sql)]
            if cols != ["*"]:
                assert got == cols
        tumour_sites = {x for (x,) in rows(path, "SELECT DISTINCT site_id FROM tumour")}
        assert tumour_sites == allowed  # every allowed site has qualifying tumours here
        groups = {g for (g,) in rows(path, "SELECT DISTINCT iccc3_group FROM tumour")}
        assert groups == set(project.row_filters.iccc3_groups)
    # leukaemia-incidence (public health, FR) never sees the academic-only us-nwts rows
    assert "us-nwts" not in extract_info(s, "leukaemia-incidence")["sites"]


def test_rebuild_from_an_earlier_pooled_version(settings):
    """The pool is append-only: an extract can be rebuilt exactly as of an earlier version."""
    grants = {t: ["*"] for t in ("patient", "tumour", "treatment", "event", "followup")}
    p = project(grants=grants, row_filters=RowFilters(iccc3_groups=["I", "VI"]))
    reg = registry([p], [site(s) for s in SITES])
    now = build_extract(settings, reg, "wilms", TODAY)
    full = {t: rows(now, f"SELECT count(*) FROM {t}")[0][0] for t in grants}
    older = build_extract(settings, reg, "wilms", TODAY, pooled_version=2)
    assert extract_info(settings, "wilms")["pooled_version"] == 2
    store = PooledStore(settings.pooled_dir)
    first_two = pooled_rows(
        store, "SELECT batch_id FROM _batches WHERE pooled_version <= 2 ORDER BY pooled_version"
    )
    batches = {b for (b,) in first_two}
    for t in grants:
        got = {b for (b,) in rows(older, f"SELECT DISTINCT load_batch FROM {t}")}
        assert got == batches  # exactly the first two batches' rows
        assert 0 < rows(older, f"SELECT count(*) FROM {t}")[0][0] < full[t]
    # patients still follow the ICCC-3 filter as of that version
    assert set(rows(older, "SELECT patient_id FROM patient")) == set(
        rows(older, "SELECT DISTINCT patient_id FROM tumour")
    )
    again = build_extract(settings, reg, "wilms", TODAY, pooled_version=len(SITES))
    assert {t: rows(again, f"SELECT count(*) FROM {t}")[0][0] for t in grants} == full
    with pytest.raises(ExtractError, match="does not exist"):
        build_extract(settings, reg, "wilms", TODAY, pooled_version=99)


GROUP_NAMES = ["I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX", "X", "XI", "XII"]


@pytest.fixture(scope="module")
def pooled_frames(pooled_state):
    store, _ = pooled_state
    con = duckdb.connect(str(store.db_path), read_only=True)
    try:
        return {
            t: con.sql(f"SELECT * FROM {t}").pl()
            for t in ("patient", "tumour", "treatment", "event", "followup")
        }
    finally:
        con.close()


def test_extract_rows_equal_an_independent_reference_for_random_projects(settings, pooled_frames):
    """Random purposes, jurisdictions, embargoes, groups, years and site filters: the extract
    holds exactly the rows a plain polars reading of the rules selects."""
    import polars as pl
    from hypothesis import HealthCheck, given
    from hypothesis import settings as hsettings
    from hypothesis import strategies as st

    @hsettings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        purpose=st.sampled_from(["academic", "public_health", "commercial"]),
        jurisdiction=st.sampled_from(["GB", "FR", "US", "JP"]),
        groups=st.none() | st.lists(st.sampled_from(GROUP_NAMES), max_size=4, unique=True),
        years=st.none() | st.tuples(st.integers(1995, 2030), st.integers(0, 15)),
        site_filter=st.none() | st.lists(st.sampled_from(sorted(SITES)), min_size=1, unique=True),
        embargoed=st.sets(st.sampled_from(sorted(SITES))),
    )
    def check(purpose, jurisdiction, groups, years, site_filter, embargoed):
        sites = [
            site("uk-ccr", purposes=["academic", "public_health"], jurisdictions=["GB", "FR"]),
            site("fr-rnce", purposes=["academic", "public_health"], jurisdictions=["FR"]),
            site("us-nwts", purposes=["academic"]),
            site("de-gpoh", purposes=["academic", "public_health", "commercial"]),
        ]
        sites = [
            s.model_copy(update={"embargo_until": dt.date(2027, 1, 1)}) if s.id in embargoed else s
            for s in sites
        ]
        filters = RowFilters(
            iccc3_groups=groups,
            sites=site_filter,
            diagnosis_year_min=years[0] if years else None,
            diagnosis_year_max=years[0] + years[1] if years else None,
        )
        grants = {t: ["*"] for t in pooled_frames}
        p = project(purpose=purpose, jurisdiction=jurisdiction, grants=grants, row_filters=filters)
        reg = registry([p], sites)
        path = build_extract(settings, reg, "wilms", TODAY)
        # the reference: the rules read literally, in polars
        allowed = [
            s.id
            for s in sites
            if s.embargo_until is None
            and purpose in s.allowed_purposes
            and ("*" in s.allowed_jurisdictions or jurisdiction in s.allowed_jurisdictions)
            and (site_filter is None or s.id in site_filter)
        ]
        f = pooled_frames
        tum = f["tumour"].filter(pl.col("site_id").is_in(allowed))
        tumour_filtered = groups is not None or years is not None
        if groups is not None:
            tum = tum.filter(pl.col("iccc3_group").is_in(groups))
        if years is not None:
            tum = tum.filter(pl.col("diagnosis_year").is_between(years[0], years[0] + years[1]))
        pats = set(tum["patient_id"])
        tids = set(tum["tumour_id"])

        def expected(table):
            df = f[table].filter(pl.col("site_id").is_in(allowed))
            if tumour_filtered:
                if "tumour_id" in df.columns:
                    df = df.filter(pl.col("tumour_id").is_in(tids))
                else:
                    df = df.filter(pl.col("patient_id").is_in(pats))
            return df.height

        for table in grants:
            assert rows(path, f"SELECT count(*) FROM {table}")[0][0] == expected(table), table
        assert sorted(rows(path, "SELECT sites FROM _extract")[0][0]) == sorted(allowed)

    check()


BUILD_SCRIPT = """
import datetime as dt, sys
from pathlib import Path
from tre.extract import build_extract
from tre.registry import Project, Registry, Site, Staff
from tre.settings import Settings
sites = {s: Site(id=s, name=s, country="GB", source_type="registry", source_dataset=s,
                 allowed_purposes=["academic"], allowed_jurisdictions=["*"])
         for s in ("uk-ccr", "fr-rnce", "us-nwts", "de-gpoh")}
p = Project(id="wilms", title="Kill test", lay_summary="A project for the kill test.",
            purpose="academic", jurisdiction="GB", members=[{"username": "alice"}],
            grants={t: ["*"] for t in ("patient", "tumour", "treatment", "event", "followup")},
            start_date=dt.date(2026, 1, 1), end_date=dt.date(2027, 1, 1))
print("ready", flush=True)
build_extract(Settings(state_dir=Path(sys.argv[1])), Registry(sites, {"wilms": p}, Staff()),
              "wilms", dt.date(2026, 6, 1))
"""


@pytest.mark.slow
def test_kill_9_during_a_build_never_exposes_a_partial_extract(settings):
    import random
    import signal
    import time

    path = build_extract(settings, registry([project()]), "wilms", TODAY)
    old = path.read_bytes()
    build_pooled(PooledStore(settings.pooled_dir), {"uk-ccr": "GB"}, 20000, seed=5)
    rng = random.Random()
    outcomes = set()
    for i in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", BUILD_SCRIPT, str(settings.state_dir)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        proc.stdout.readline()
        time.sleep(rng.uniform(0, 0.4 * (i + 1)))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        # the visible extract is the old file or a complete new one, never a partial one
        data = path.read_bytes()
        if data == old:
            outcomes.add("old")
        else:
            info = extract_info(settings, "wilms")
            assert (
                info["tables"]["patient"]["rows"]
                == rows(path, "SELECT count(*) FROM patient")[0][0]
            )
            outcomes.add("new")
        assert stat.S_IMODE(path.stat().st_mode) == 0o444
    # a later build cleans up (stale temporaries are removed by build_all after an hour)
    build_extract(settings, registry([project()]), "wilms", TODAY)
    temporaries = [p for p in settings.extracts_dir.iterdir() if p.name.startswith(".")]
    for p in temporaries:
        os.utime(p, (0, 0))  # pretend they are old
    build_all(settings, registry([project()]), TODAY)
    assert [p.name for p in settings.extracts_dir.iterdir()] == ["wilms.duckdb"]
    assert outcomes


def test_metadata_separates_allowed_from_contributing_sites(settings):
    quiet = Site(
        id="nl-skion", name="NL", country="NL", source_type="trial", source_dataset="skion",
        allowed_purposes=["academic"], allowed_jurisdictions=["*"],
    )  # fmt: skip
    p = project(grants={"patient": ["sex"]})  # site_id is not even granted
    reg = registry([p], [site("us-nwts"), site("uk-ccr"), quiet])
    build_extract(settings, reg, "wilms", TODAY)
    info = extract_info(settings, "wilms")
    assert sorted(info["sites"]) == ["nl-skion", "uk-ccr", "us-nwts"]  # allowed
    assert sorted(info["contributing_sites"]) == ["uk-ccr", "us-nwts"]  # rows actually present


def _compressions(path, table, column):
    return {
        c
        for (c,) in rows(
            path,
            f"SELECT DISTINCT compression FROM pragma_storage_info('{table}') "
            f"WHERE column_name = '{column}' AND segment_type = 'VARCHAR'",
        )
    }


def test_pseudonym_columns_are_stored_with_the_configured_compression(settings, tmp_path):
    reg = registry([project(grants={"patient": ["*"], "tumour": ["*"]})])
    zstd = build_extract(settings, reg, "wilms", TODAY)
    # the dictionary's identifier columns (pseudonyms) only; codes keep DuckDB's own choice
    assert _compressions(zstd, "tumour", "tumour_id") == {"ZSTD"}
    assert _compressions(zstd, "tumour", "patient_id") == {"ZSTD"}
    assert "ZSTD" not in _compressions(zstd, "tumour", "iccc3_group")
    zstd_rows = rows(zstd, "SELECT * FROM tumour ORDER BY tumour_id")

    auto = settings.model_copy(update={"extract_identifier_compression": "auto"})
    path = build_extract(auto, reg, "wilms", TODAY)
    assert "ZSTD" not in _compressions(path, "tumour", "tumour_id")
    assert rows(path, "SELECT * FROM tumour ORDER BY tumour_id") == zstd_rows

    # without a readable dictionary the hint is gone, the extract is the same
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "dictionary.yaml").write_text("tables: [not, a, dictionary\n")
    broken = settings.model_copy(update={"policies_dir": policies})
    path = build_extract(broken, reg, "wilms", TODAY)
    assert "ZSTD" not in _compressions(path, "tumour", "tumour_id")
    assert rows(path, "SELECT * FROM tumour ORDER BY tumour_id") == zstd_rows


def test_unknown_identifier_compression_is_a_settings_error(tmp_path):
    with pytest.raises(ValueError, match="extract_identifier_compression"):
        Settings(state_dir=tmp_path, extract_identifier_compression="lz4")

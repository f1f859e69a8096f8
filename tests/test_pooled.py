"""The pooled store: versions, locking, and all-or-nothing batches under kill -9."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import pytest
import site_files

from tre.ingest import ingest_files
from tre.pooled import PooledStore, PooledStoreError
from tre.pseudonymise import init_key
from tre.settings import Settings

REPO = Path(__file__).resolve().parent.parent


def fingerprint(state_dir: Path):
    """Everything the pooled store holds, order-independent; timestamps left out."""
    path = state_dir / "pooled" / "pooled.duckdb"
    if not path.exists():
        return None
    con = duckdb.connect(str(path), read_only=True)
    try:
        out = {}
        tables = con.execute("SELECT table_name FROM duckdb_tables() ORDER BY 1").fetchall()
        for (t,) in tables:
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
            ).fetchall()[0]
        return out
    finally:
        con.close()


def settings_for(state_dir: Path) -> Settings:
    return Settings(state_dir=state_dir)


def test_versions_count_loaded_batches_and_name_reproducible_states(tmp_path):
    s = settings_for(tmp_path / "state")
    init_key(s.hmac_key_file)
    results = []
    for i in range(3):
        files = site_files.write(
            site_files.generate(30 + i, seed=i, id_prefix=f"B{i}-"), tmp_path / str(i)
        )
        results.append(ingest_files(s, "uk-ccr", files, quality_report=False))
    bad = site_files.generate(5, seed=9, id_prefix="X")
    bad["patient"] = site_files.set_cell(bad["patient"], 0, "sex", "??")
    rejected = ingest_files(
        s, "uk-ccr", site_files.write(bad, tmp_path / "bad"), quality_report=False
    )
    assert [r.pooled_version for r in results] == [1, 2, 3]
    assert rejected.status == "rejected"
    store = PooledStore(s.pooled_dir)
    st = store.status()
    assert st["version"] == 3  # a rejected batch creates no version
    con = duckdb.connect(str(store.db_path), read_only=True)
    for version, counts in con.execute("SELECT version, row_counts FROM _versions").fetchall():
        for table, n in json.loads(counts).items():
            # version N = exactly the rows of batches with pooled_version <= N
            [(got,)] = con.execute(
                f"SELECT count(*) FROM {table} WHERE load_batch IN (SELECT batch_id FROM _batches "
                "WHERE status = 'loaded' AND pooled_version <= $v)",
                {"v": version},
            ).fetchall()
            assert got == n
    con.close()


def test_writer_excludes_readers_with_a_clear_error(tmp_path):
    store = PooledStore(tmp_path / "pooled")
    with store.writer():
        with pytest.raises(PooledStoreError, match="busy"):
            with store.reader(timeout=0.2):
                pass
    with store.reader(), store.reader(timeout=0.2):  # readers share
        pass


def test_reader_on_missing_store_says_ingest_first(tmp_path):
    with pytest.raises(PooledStoreError, match="ingest data first"):
        with PooledStore(tmp_path / "none").reader():
            pass


INGEST_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from tre.ingest import ingest_files
    from tre.settings import Settings
    s = Settings(state_dir=Path(sys.argv[1]))
    files = [Path(p) for p in sys.argv[2:]]
    r = ingest_files(s, "uk-ccr", files, on_invalid="quarantine", quality_report=False)
    print(r.status, r.pooled_version)
    """
)


def run_ingest(state: Path, files, crash_at=None, kill_after=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRE_")}
    if crash_at:
        env["TRE_INGEST_CRASH_AT"] = crash_at
    proc = subprocess.Popen(
        [sys.executable, "-c", INGEST_SCRIPT, str(state), *map(str, files)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    if kill_after is not None:
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def crash_setup(tmp_path_factory):
    """A store holding batch A (state S0), batch B's files, and S1 = S0 + B done cleanly."""
    root = tmp_path_factory.mktemp("crash")
    s0 = root / "s0"
    s = settings_for(s0)
    init_key(s.hmac_key_file)
    a = site_files.write(site_files.generate(200, seed=1, id_prefix="A"), root / "a")
    ingest_files(s, "uk-ccr", a, quality_report=False)
    b_tables = site_files.generate(6000, seed=2, id_prefix="B")
    b_tables["patient"] = site_files.set_cell(b_tables["patient"], 10, "sex", "??")  # quarantine
    b = site_files.write(b_tables, root / "b")
    ref = root / "ref"
    shutil.copytree(s0, ref)
    t0 = time.monotonic()
    code, out, err = run_ingest(ref, b)
    duration = time.monotonic() - t0
    assert code == 0 and out.startswith("loaded 2"), err
    return {"root": root, "s0": s0, "b": b, "S0": fingerprint(s0), "S1": fingerprint(ref),
            "duration": duration}  # fmt: skip


def _fresh(crash_setup, name):
    state = crash_setup["root"] / name
    shutil.copytree(crash_setup["s0"], state)
    return state


def _retry_completes(crash_setup, state, expect_status):
    r = ingest_files(settings_for(state), "uk-ccr", crash_setup["b"], on_invalid="quarantine",
                     quality_report=False)  # fmt: skip
    assert r.status == expect_status
    assert fingerprint(state) == crash_setup["S1"]
    batches = state / "pooled" / "batches"
    assert (batches / r.batch_id / "batch.json").exists()
    assert (batches / r.batch_id / "errors.csv").read_text().count("\n") > 1
    assert not [p for p in batches.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
@pytest.mark.parametrize(
    "point", ["before-transaction", "after-insert-patient", "after-insert-treatment",
              "before-commit", "after-commit"],
)  # fmt: skip
def test_kill_9_at_each_stage_leaves_before_or_after_and_retry_completes(crash_setup, point):
    state = _fresh(crash_setup, f"at-{point}")
    code, _, err = run_ingest(state, crash_setup["b"], crash_at=point)
    assert code == -signal.SIGKILL, err
    after_crash = fingerprint(state)
    if point == "after-commit":
        assert after_crash == crash_setup["S1"]  # committed: the after state
        _retry_completes(crash_setup, state, "unchanged")  # and the record is repaired
    else:
        assert after_crash == crash_setup["S0"]  # not committed: exactly the before state
        _retry_completes(crash_setup, state, "loaded")


@pytest.mark.slow
def test_kill_9_at_random_moments(crash_setup):
    rng = random.Random(os.environ.get("PYTEST_SEED", time.time_ns()))
    seen = set()
    for i in range(4):
        state = _fresh(crash_setup, f"random-{i}")
        delay = rng.uniform(0.2, crash_setup["duration"])
        code, _, err = run_ingest(state, crash_setup["b"], kill_after=delay)
        got = fingerprint(state)
        assert got in (crash_setup["S0"], crash_setup["S1"]), f"kill after {delay:.2f}s: {err}"
        seen.add("after" if got == crash_setup["S1"] else "before")
        _retry_completes(crash_setup, state, "unchanged" if got == crash_setup["S1"] else "loaded")
    assert seen  # (which of the two states was hit depends on timing)


def test_a_column_added_to_the_dictionary_is_added_to_the_pooled_table(tmp_path):
    import yaml

    old_policies = tmp_path / "old-policies"
    shutil.copytree(REPO / "policies", old_policies)
    d = yaml.safe_load((old_policies / "dictionary.yaml").read_text())
    del d["tables"]["tumour"]["columns"]["laterality"]
    (old_policies / "dictionary.yaml").write_text(yaml.safe_dump(d))
    old = Settings(state_dir=tmp_path / "state", policies_dir=old_policies)
    init_key(old.hmac_key_file)
    first = site_files.generate(20, seed=1, id_prefix="A")
    first["tumour"] = first["tumour"].drop("laterality")
    ingest_files(old, "uk-ccr", site_files.write(first, tmp_path / "a"), quality_report=False)
    new = Settings(state_dir=tmp_path / "state")
    second = site_files.generate(20, seed=2, id_prefix="B")
    r = ingest_files(new, "uk-ccr", site_files.write(second, tmp_path / "b"), quality_report=False)
    assert r.status == "loaded"
    con = duckdb.connect(str(PooledStore(new.pooled_dir).db_path), read_only=True)
    rows = con.execute(
        "SELECT load_batch = $b, count(*), count(laterality) FROM tumour GROUP BY 1 ORDER BY 1",
        {"b": r.batch_id},
    ).fetchall()
    con.close()
    assert rows[0][2] == 0  # the earlier batch has no laterality
    assert rows[1][2] > 0  # the new one has

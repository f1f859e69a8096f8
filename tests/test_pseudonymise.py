import hashlib
import hmac
import os
import stat

import duckdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tre.pseudonymise import (
    PSEUDONYM_HEX_CHARS,
    Pseudonymiser,
    PseudonymKeyError,
    init_key,
    load_key,
)


@pytest.fixture
def key_file(tmp_path):
    return init_key(tmp_path / "secrets" / "hmac.key")


def test_init_key_creates_owner_only_file_and_refuses_to_overwrite(tmp_path):
    path = init_key(tmp_path / "s" / "hmac.key")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = load_key(path)
    assert len(key) == 32
    with pytest.raises(PseudonymKeyError, match="already exists"):
        init_key(path)
    assert load_key(path) == key  # unchanged
    init_key(path, overwrite=True)
    assert load_key(path) != key


def test_two_keys_differ(tmp_path):
    assert load_key(init_key(tmp_path / "a")) != load_key(init_key(tmp_path / "b"))


def test_missing_exposed_malformed_or_misplaced_key_is_refused(tmp_path, key_file):
    with pytest.raises(PseudonymKeyError, match="init-key"):
        load_key(tmp_path / "nope.key")
    os.chmod(key_file, 0o644)
    with pytest.raises(PseudonymKeyError, match="0644"):
        load_key(key_file)
    os.chmod(key_file, 0o600)
    with pytest.raises(PseudonymKeyError, match="never be stored with the data"):
        load_key(key_file, forbidden_dirs=(tmp_path,))
    bad = tmp_path / "bad.key"
    bad.write_text("not hex at all")
    os.chmod(bad, 0o600)
    with pytest.raises(PseudonymKeyError, match="hex"):
        load_key(bad)
    short = tmp_path / "short.key"
    short.write_text("ab" * 8)
    os.chmod(short, 0o600)
    with pytest.raises(PseudonymKeyError, match="32"):
        load_key(short)


def test_pseudonym_is_keyed_hmac_sha256_of_kind_site_and_local_id(key_file):
    key = load_key(key_file)
    p = Pseudonymiser(key)
    expected = hmac.new(key, b"patient\x1fuk-ccr\x1fP-0001", hashlib.sha256).hexdigest()
    assert p.pseudonym("patient", "uk-ccr", "P-0001") == expected[:PSEUDONYM_HEX_CHARS]


def test_same_id_same_site_is_stable_other_site_kind_or_key_differ(tmp_path, key_file):
    p = Pseudonymiser(load_key(key_file))
    a = p.pseudonym("patient", "uk-ccr", "123")
    assert a == Pseudonymiser(load_key(key_file)).pseudonym("patient", "uk-ccr", "123")
    assert a != p.pseudonym("patient", "fr-rnce", "123")  # other site: no collision
    assert a != p.pseudonym("tumour", "uk-ccr", "123")  # other kind
    other = Pseudonymiser(load_key(init_key(tmp_path / "other.key")))
    assert a != other.pseudonym("patient", "uk-ccr", "123")  # other key
    assert "123" not in a


@settings(max_examples=40, deadline=None)
@given(ids=st.lists(st.text(min_size=0, max_size=30), min_size=1, max_size=30))
def test_duckdb_bulk_hmac_equals_python_hmac(ids):
    key = bytes(range(32))
    p = Pseudonymiser(key)
    con = duckdb.connect()
    p.register(con)
    con.execute("CREATE TABLE t (id VARCHAR)")
    con.executemany("INSERT INTO t VALUES (?)", [[i] for i in ids])
    got = con.execute(f"SELECT id, {p.sql('tumour', 'de-gpoh', 'id')} FROM t").fetchall()
    for local, pseudo in got:
        assert pseudo == p.pseudonym("tumour", "de-gpoh", local)


def test_long_keys_are_hashed_like_rfc2104():
    key = os.urandom(100)
    p = Pseudonymiser(key)
    con = duckdb.connect()
    p.register(con)
    [(got,)] = con.execute(
        f"SELECT {p.sql('patient', 'uk-ccr', chr(39) + 'x' + chr(39))}"
    ).fetchall()
    assert got == hmac.new(key, b"patient\x1fuk-ccr\x1fx", hashlib.sha256).hexdigest()[:32]


def test_sql_refuses_injection_through_kind_or_site():
    with pytest.raises(ValueError):
        Pseudonymiser.sql("patient", "x'); DROP TABLE t; --", "id")


def test_pads_live_in_a_temp_table_only(tmp_path):
    con = duckdb.connect(str(tmp_path / "db.duckdb"))
    Pseudonymiser(os.urandom(32)).register(con)
    con.close()
    con = duckdb.connect(str(tmp_path / "db.duckdb"))
    assert con.execute("SELECT count(*) FROM duckdb_tables()").fetchone()[0] == 0


@settings(max_examples=30, deadline=None)
@given(ids=st.lists(st.one_of(st.none(), st.text(max_size=20)), min_size=1, max_size=30))
def test_bulk_python_pseudonyms_equal_reference_and_keep_nulls(ids):
    import polars as pl

    p = Pseudonymiser(bytes(range(1, 33)))
    got = p.pseudonyms("patient", "uk-ccr", pl.Series("id", ids, dtype=pl.String)).to_list()
    assert got == [None if i is None else p.pseudonym("patient", "uk-ccr", i) for i in ids]


def test_ensure_key_creates_once(tmp_path):
    from tre.pseudonymise import ensure_key

    path = tmp_path / "k" / "hmac.key"
    assert ensure_key(path) is True
    key = load_key(path)
    assert ensure_key(path) is False and load_key(path) == key


def _random_ids(rng, n: int) -> list[str]:
    """Ids of every shape: ASCII, non-ASCII (accents, CJK, emoji, controls), empty, and long
    enough to span several SHA-256 blocks (the message crosses 55/64-byte padding limits)."""
    alphabets = [
        "0123456789",
        "ABCDEFGHIJKLMNOPQRSTUVWXYZ-_ /.",
        "éèüßçøåÆŒñ",
        "中文字符病人腫瘍",
        "😀🧬🏥",
        "\x00\x01\x1f\x7f\t\n",
    ]
    out = ["", " ", "\x1f", "a" * 55, "b" * 56, "c" * 64, "d" * 119, "e" * 1000]
    for _ in range(n - len(out)):
        chars = "".join(rng.sample(alphabets, rng.randint(1, len(alphabets))))
        out.append("".join(rng.choice(chars) for _ in range(rng.choice([1, 8, 16, 40, 70, 200]))))
    return out


@pytest.mark.parametrize("key_len", [32, 64, 65, 100])
def test_vectorised_pseudonyms_are_byte_identical_to_python_hmac(key_len):
    """The bulk path (two vectorised SHA-256 passes) must give exactly RFC 2104 HMAC-SHA256 of
    the same UTF-8 message as Python's ``hmac``: already-pooled data depends on it."""
    import random

    import polars as pl

    rng = random.Random(key_len)
    key = bytes(rng.randrange(256) for _ in range(key_len))
    p = Pseudonymiser(key)
    ids = _random_ids(rng, 5000)
    for kind, site in [("patient", "uk-ccr"), ("tumour", "de-gpoh"), ("x", "a-b_c")]:
        got = p.pseudonyms(kind, site, pl.Series("id", [*ids, None], dtype=pl.String))
        want = [
            hmac.new(key, f"{kind}\x1f{site}\x1f{i}".encode(), hashlib.sha256).hexdigest()[:32]
            for i in ids
        ]
        assert got.to_list() == [*want, None]
        assert got.dtype == pl.String

"""Pseudonymisation of site-local identifiers with a keyed HMAC-SHA256.

The key is a secret kept outside the pooled data (``Settings.hmac_key_file``), created once by
``tre data init-key`` with 0600 permissions. A pseudonym is

    HMAC-SHA256(key, kind || 0x1F || site_id || 0x1F || local_id), first 128 bits, hex

so the same local id from the same site always maps to the same pseudonym, the same local id
from two sites maps to two unrelated pseudonyms (the site is part of the message), and a patient
id never equals a tumour id (the kind is part of the message). The site-scoped identity of a row
is kept as the pair (``site_id``, pseudonym).

Both bulk forms use the textbook construction ``H((K ^ opad) || H((K ^ ipad) || m))``: in
polars with polars-hash's vectorised ``sha256`` (:meth:`Pseudonymiser.pseudonyms`, the ingest
path) and as a DuckDB expression (:meth:`Pseudonymiser.sql`, for the few values in error reports
and quarantined rows); ``tests/test_pseudonymise.py`` proves both equal Python's ``hmac`` byte
for byte.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

import duckdb
import polars as pl
import polars_hash  # noqa: F401 - registers the .chash expression namespace

KEY_BYTES = 32
PSEUDONYM_HEX_CHARS = 32  # 128 bits: collisions are negligible even for billions of ids
SEPARATOR = "\x1f"  # ASCII unit separator: cannot occur in a site id (slug) or a kind
_BLOCK = 64  # SHA-256 block size in bytes


class PseudonymKeyError(RuntimeError):
    """The pseudonymisation key is missing, malformed, exposed, or in the wrong place."""


def init_key(path: Path, *, overwrite: bool = False) -> Path:
    """Create a new random key at ``path`` with 0600 permissions (parent directory 0700).

    Refuses to replace an existing key unless ``overwrite``: a new key changes every pseudonym,
    so pooled data ingested under the old key could no longer be linked.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.exists() and not overwrite:
        raise PseudonymKeyError(
            f"{path} already exists; a new key would change every pseudonym "
            "(pass overwrite=True / --force only for a fresh, empty pooled store)"
        )
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, (secrets.token_hex(KEY_BYTES) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path


def ensure_key(path: Path) -> bool:
    """Create the key if there is none (the demo's first run); True if it was created."""
    if Path(path).exists():
        return False
    init_key(path)
    return True


def load_key(path: Path, *, forbidden_dirs: tuple[Path, ...] = ()) -> bytes:
    """Read the key; refuse one that others can read or that sits inside ``forbidden_dirs``."""
    path = Path(path)
    if not path.exists():
        raise PseudonymKeyError(
            f"no pseudonymisation key at {path}; create one with `tre data init-key`"
        )
    resolved = path.resolve()
    for d in forbidden_dirs:
        if resolved.is_relative_to(Path(d).resolve()):
            raise PseudonymKeyError(
                f"the key {path} lies inside {d}; it must never be stored with the data"
            )
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise PseudonymKeyError(
            f"{path} has permissions {mode:04o}; the key must be readable by its owner only "
            f"(chmod 600 {path})"
        )
    text = path.read_text(encoding="ascii", errors="replace").strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise PseudonymKeyError(f"{path} does not hold a hex-encoded key") from None
    if len(key) < KEY_BYTES:
        raise PseudonymKeyError(f"{path} holds a {len(key)}-byte key; at least 32 are needed")
    return key


class Pseudonymiser:
    """Keyed HMAC pseudonyms, one at a time (reference) or vectorised in DuckDB (bulk)."""

    def __init__(self, key: bytes) -> None:
        if len(key) < KEY_BYTES:
            raise PseudonymKeyError("the key must be at least 32 bytes")
        self._key = key
        # HMAC keys longer than the block are hashed first (RFC 2104)
        block_key = hashlib.sha256(key).digest() if len(key) > _BLOCK else key
        block_key = block_key.ljust(_BLOCK, b"\0")
        self._ipad = bytes(b ^ 0x36 for b in block_key)
        self._opad = bytes(b ^ 0x5C for b in block_key)

    @staticmethod
    def message(kind: str, site_id: str, local_id: str) -> str:
        return f"{kind}{SEPARATOR}{site_id}{SEPARATOR}{local_id}"

    def pseudonym(self, kind: str, site_id: str, local_id: str) -> str:
        """The pseudonym of one local id (the reference implementation)."""
        msg = self.message(kind, site_id, local_id).encode("utf-8")
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()[:PSEUDONYM_HEX_CHARS]

    def pseudonyms(self, kind: str, site_id: str, local_ids: pl.Series) -> pl.Series:
        """Pseudonyms of many local ids (pass distinct ids: one HMAC each), null for null.

        Vectorised RFC 2104 HMAC composed of two SHA-256 passes over Binary columns,
        ``H((K ^ opad) || H((K ^ ipad) || m))``, with polars-hash's ``sha2_256`` (Rust ``sha2``,
        no Python per id): a Python ``hmac`` loop costs ~1 us per id, mostly interpreter
        overhead. ``m`` is the UTF-8 message, as in :meth:`pseudonym`; tests prove equality
        with Python's ``hmac`` on random, non-ASCII, empty and long ids.
        """
        prefix = self.message(kind, site_id, "").encode("utf-8")
        ids = pl.col("local").cast(pl.String).cast(pl.Binary)  # UTF-8 bytes of the id
        inner = (pl.lit(self._ipad + prefix, dtype=pl.Binary) + ids).chash.sha2_256()
        outer = (pl.lit(self._opad, dtype=pl.Binary) + inner.str.decode("hex")).chash.sha2_256()
        out = pl.DataFrame({"local": local_ids}).select(
            outer.str.slice(0, PSEUDONYM_HEX_CHARS).alias(local_ids.name or "pseudonym")
        )
        return out.to_series()

    def register(self, con: duckdb.DuckDBPyConnection, name: str = "_hmac_pads") -> str:
        """Put the HMAC pads in a TEMP table of ``con`` (never persisted); return its name."""
        con.execute(f"CREATE OR REPLACE TEMP TABLE {name} (i BLOB, o BLOB)")
        con.execute(f"INSERT INTO {name} VALUES ($i, $o)", {"i": self._ipad, "o": self._opad})
        return name

    @staticmethod
    def sql(kind: str, site_id: str, id_sql: str, pads: str = "_hmac_pads") -> str:
        """DuckDB expression for the pseudonym of ``id_sql`` (a VARCHAR expression).

        Needs ``pads`` (from :meth:`register`) as a scalar sub-query. ``kind`` and ``site_id``
        are slugs checked here, so they can be inlined as literals without quoting issues.
        """
        for value in (kind, site_id):
            if not value.replace("-", "").replace("_", "").isalnum():
                raise ValueError(f"{value!r} is not a plain identifier")
        prefix = f"{kind}{SEPARATOR}{site_id}{SEPARATOR}"
        inner = f"sha256((SELECT i FROM {pads}) || encode('{prefix}' || {id_sql}))"
        outer = f"sha256((SELECT o FROM {pads}) || unhex({inner}))"
        return f"left({outer}, {PSEUDONYM_HEX_CHARS})"

"""Content-addressed snapshots (sha256), outside every sandbox, behind a ``typing.Protocol``.

A snapshot is taken when a file joins a request: later edits in the workspace change nothing
under review. Workspace paths are resolved defensively: no absolute paths, no ``..``, no symlink
anywhere on the path, regular files only. The path is walked one directory descriptor at a
time (``openat`` with ``O_NOFOLLOW``), never by name from the root: the researcher's sandbox can
change the workspace while the airlock reads it, and a directory swapped for a symlink between
a check and an open by path would let the airlock read, and snapshot, any file it can read.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Protocol

log = logging.getLogger("airlock.storage")

CHUNK = 1024 * 1024
CHECK_DIR_PREFIX = "check-"
SHA256_HEX = frozenset("0123456789abcdef")


class StorageError(ValueError):
    """A file cannot be snapshotted (bad path, not a regular file, too big, ...)."""


class SnapshotStore(Protocol):
    def put_stream(self, stream: BinaryIO, max_bytes: int) -> tuple[str, int]:
        """Store the bytes; return (sha256, size). Idempotent for equal content."""
        ...

    def exists(self, sha256: str) -> bool: ...

    def path(self, sha256: str) -> Path: ...

    def open(self, sha256: str) -> BinaryIO: ...


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _valid_sha(sha256: str) -> str:
    if len(sha256) != 64 or not set(sha256) <= SHA256_HEX:
        raise StorageError(f"not a sha256 digest: {sha256[:80]!r}")
    return sha256


class FileSystemStore:
    """Blobs at ``<root>/objects/<aa>/<sha256>``, written via temp file + fsync + rename."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.tmp = self.root / "tmp"
        self.objects.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        sha = _valid_sha(sha256)
        return self.objects / sha[:2] / sha

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def open(self, sha256: str) -> BinaryIO:
        return open(self.path(sha256), "rb")  # noqa: SIM115 (caller closes)

    def put_stream(self, stream: BinaryIO, max_bytes: int) -> tuple[str, int]:
        digest = hashlib.sha256()
        size = 0
        fd, tmp_name = tempfile.mkstemp(dir=self.tmp, prefix="put-")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := stream.read(CHUNK):
                    size += len(chunk)
                    if size > max_bytes:
                        raise StorageError(f"file is larger than the limit of {max_bytes} bytes")
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            sha = digest.hexdigest()
            final = self.path(sha)
            if final.exists():
                tmp.unlink()
            else:
                final.parent.mkdir(exist_ok=True)
                os.chmod(tmp, 0o440)
                os.replace(tmp, final)
                fsync_dir(final.parent)
            return sha, size
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def verify(self, sha256: str) -> bool:
        return self.exists(sha256) and sha256_file(self.path(sha256)) == sha256

    @contextlib.contextmanager
    def _locked(self, mode: int) -> Iterator[None]:
        # flock: per open file, so threads and processes alike; released if the holder dies
        fd = os.open(self.root / "gc.lock", os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)

    def pinned(self) -> contextlib.AbstractContextManager[None]:
        """Hold while snapshots are stored and until the rows referring to them commit: the
        garbage collector (``collecting``) cannot remove a blob between the two (a blob that
        already existed, shared by content with an ended request, is referenced again)."""
        return self._locked(fcntl.LOCK_SH)

    def collecting(self) -> contextlib.AbstractContextManager[None]:
        """Exclusive: no snapshot is being taken, every reference is committed."""
        return self._locked(fcntl.LOCK_EX)

    def blobs(self) -> Iterator[tuple[str, os.stat_result]]:
        """(sha256, stat) of every stored blob."""
        for sub in sorted(self.objects.iterdir()):
            if sub.is_dir():
                for blob in sorted(sub.iterdir()):
                    if len(blob.name) == 64 and set(blob.name) <= SHA256_HEX:
                        yield blob.name, blob.stat()


# --- working directories of the disclosure checks ---------------------------------------------
#
# A check runs on a copy of the snapshot named like the researcher's file (the checks dispatch on
# the name), in a directory of its own under ``<airlock store>/checking``. The copy is the
# researcher's bytes, so it must not outlive the check: the process running it holds an
# exclusive ``flock`` on the directory while it is in use (a kill -9 lets go of it with the
# process), and ``claim_stale_check_dirs`` (at the service's start and in ``airlock gc``)
# removes every directory nobody holds, never one a check in another worker still uses.
# They lived in the system's /tmp as ``airlock-check-*`` before, where a killed check left its
# copy for good.


def held_dir(path: Path) -> int | None:
    """An fd of ``path`` with an exclusive flock on it; None if someone holds it or it is gone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError, OSError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


@contextlib.contextmanager
def check_workdir(root: Path) -> Iterator[Path]:
    """A private directory under ``root`` for one check, held until the check is done, then
    removed."""
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    while True:
        path = Path(tempfile.mkdtemp(prefix=CHECK_DIR_PREFIX, dir=root))
        fd = held_dir(path)
        if fd is None:
            continue  # a cleaner found it before we held it: it is going, take another
        try:
            same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # a cleaner removed it between its creation and our lock
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)  # what is left goes at the next start or run
        os.close(fd)


def claim_stale_check_dirs(root: Path, claims: list[int]) -> list[Path]:
    """Check directories no process holds (their check was killed): each one's fd, locked,
    goes into ``claims``, to hold until it is deleted (so no second cleaner counts it too)."""
    if not root.is_dir():
        return []
    stale = []
    for path in sorted(root.iterdir()):
        if not path.name.startswith(CHECK_DIR_PREFIX) or path.is_symlink() or not path.is_dir():
            continue  # not ours: left alone
        fd = held_dir(path)
        if fd is None:
            continue  # a check in progress (in any process), or gone
        claims.append(fd)
        stale.append(path)
    return stale


def remove_stale_check_dirs(root: Path) -> list[str]:
    """At the service's start: remove what killed checks left; the names removed."""
    claims: list[int] = []
    try:
        stale = claim_stale_check_dirs(root, claims)
        for path in stale:
            shutil.rmtree(path, onerror=lambda _f, p, e: log.error("cannot delete %s: %s", p, e[1]))
        if stale:
            log.warning("removed %d check dir(s) that killed checks left in %s", len(stale), root)
        return [p.name for p in stale]
    finally:
        for fd in claims:
            os.close(fd)


def clean_relative_path(relpath: str) -> PurePosixPath:
    """A normalised relative path, or StorageError for anything that could escape."""
    if not relpath or "\x00" in relpath or len(relpath) > 512:
        raise StorageError("a file path must be 1 to 512 characters, without NUL")
    if "\\" in relpath:
        raise StorageError("use '/' to separate directories")
    pure = PurePosixPath(relpath)
    if pure.is_absolute():
        raise StorageError(f"{relpath!r}: give a path relative to the project workspace")
    parts = [p for p in pure.parts if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        raise StorageError(f"{relpath!r}: '..' is not allowed in a workspace path")
    return PurePosixPath(*parts)


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # a FIFO must not block


def _open_at(dir_fd: int, part: str, flags: int, rel: PurePosixPath) -> int:
    """One step of the walk: ``part`` in the directory ``dir_fd``, never through a symlink."""
    try:
        return os.open(part, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        raise StorageError(f"{rel}: no such file in the project workspace") from None
    except OSError as exc:
        # O_NOFOLLOW on a symlink: ELOOP; O_DIRECTORY on anything else: ENOTDIR
        try:
            is_link = stat.S_ISLNK(os.lstat(part, dir_fd=dir_fd).st_mode)
        except OSError:
            is_link = False
        if is_link or exc.errno == errno.ELOOP:
            raise StorageError(f"{rel}: symbolic links are not allowed ({part!r} is one)") from None
        if exc.errno == errno.ENOTDIR:
            raise StorageError(f"{rel}: {part!r} is not a directory") from None
        raise StorageError(f"{rel}: cannot be opened ({exc.strerror})") from None


def open_workspace_file(workspace: Path, relpath: str) -> tuple[PurePosixPath, BinaryIO]:
    """Open ``relpath`` under ``workspace`` for reading, refusing every way out of it.

    Each component is opened relative to the descriptor of its parent, with ``O_NOFOLLOW``, so
    what is opened is what was checked, whatever the sandbox renames meanwhile
    (``tests/airlock_service/test_workspace_race.py`` races a directory against a symlink).
    """
    rel = clean_relative_path(relpath)
    try:
        dir_fd = os.open(Path(workspace), _DIR_FLAGS)
    except OSError:
        raise StorageError("the project workspace does not exist") from None
    try:
        for part in rel.parts[:-1]:
            next_fd = _open_at(dir_fd, part, _DIR_FLAGS, rel)
            os.close(dir_fd)
            dir_fd = next_fd
        fd = _open_at(dir_fd, rel.parts[-1], _FILE_FLAGS, rel)
    finally:
        os.close(dir_fd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise StorageError(f"{rel}: not a regular file")
    return rel, os.fdopen(fd, "rb")


def iter_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            yield chunk

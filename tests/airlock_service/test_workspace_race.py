"""The sandbox can rename things in its workspace while the airlock snapshots a file from it.

A directory on the requested path swapped for a symlink (and back) between a check and an open
by name would make the airlock read any file it can read (another project's workspace, the
pseudonymisation key) and put it under review. The airlock walks the path one directory
descriptor at a time, so what it opens is what it checked. Against the earlier
check-then-open-by-path code this attack read the outside file about 200 times a second.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest

from airlock.storage import StorageError, open_workspace_file

RACE_SECONDS = 2.0


def _flip(workspace: str, stop) -> None:  # noqa: ANN001 - an Event of another process
    """Swap workspace/d between the real directory and a symlink to the outside, forever."""
    d, parked, link = (os.path.join(workspace, n) for n in ("d", "d.parked", "d.link"))
    while not stop.is_set():
        os.rename(d, parked)
        os.rename(link, d)  # d -> outside
        os.rename(d, link)
        os.rename(parked, d)  # d is the directory again


@pytest.fixture
def raced_workspace(tmp_path: Path):
    workspace, outside = tmp_path / "workspace", tmp_path / "outside"
    (workspace / "d").mkdir(parents=True)
    outside.mkdir()
    (workspace / "d" / "table.csv").write_text("inside\n")
    (outside / "table.csv").write_text("SECRET\n")
    os.symlink(outside, workspace / "d.link")
    stop = mp.get_context("fork").Event()
    flipper = mp.get_context("fork").Process(target=_flip, args=(str(workspace), stop))
    flipper.start()
    try:
        yield workspace
    finally:
        stop.set()
        flipper.join(10)


def test_a_directory_swapped_for_a_symlink_never_lets_the_outside_file_in(raced_workspace):
    seen = {"inside": 0, "refused": 0}
    deadline = time.monotonic() + RACE_SECONDS
    while time.monotonic() < deadline:
        try:
            rel, fh = open_workspace_file(raced_workspace, "d/table.csv")
        except StorageError:  # the path was a symlink or missing at that moment: a clear 4xx
            seen["refused"] += 1
            continue
        with fh:
            content = fh.read().decode().strip()
        assert content == "inside", "the airlock read a file outside the workspace"
        assert str(rel) == "d/table.csv"
        seen["inside"] += 1
    # the race really ran both ways (otherwise the test proves nothing)
    assert seen["inside"] > 100 and seen["refused"] > 100, seen


def test_walk_refuses_symlinks_and_non_directories_by_name(tmp_path):
    workspace = tmp_path / "workspace"
    (workspace / "d").mkdir(parents=True)
    (workspace / "d" / "t.csv").write_text("x\n")
    (workspace / "file").write_text("x\n")
    (workspace / "link").symlink_to(workspace / "d")
    (workspace / "d" / "fifo").parent.mkdir(exist_ok=True)
    os.mkfifo(workspace / "d" / "fifo")
    cases = {
        "link/t.csv": "symbolic links are not allowed ('link' is one)",
        "link": "symbolic links are not allowed ('link' is one)",
        "file/t.csv": "'file' is not a directory",
        "d/missing.csv": "no such file in the project workspace",
        "d/fifo": "not a regular file",  # opened without blocking, then refused
        "d": "not a regular file",
    }
    for path, message in cases.items():
        with pytest.raises(StorageError, match=message.replace("(", r"\(").replace(")", r"\)")):
            open_workspace_file(workspace, path)
    rel, fh = open_workspace_file(workspace, "./d//t.csv")
    with fh:
        assert (str(rel), fh.read()) == ("d/t.csv", b"x\n")
    with pytest.raises(StorageError, match="workspace does not exist"):
        open_workspace_file(tmp_path / "nope", "d/t.csv")
    (tmp_path / "ws-link").symlink_to(workspace)
    with pytest.raises(StorageError, match="workspace does not exist"):
        open_workspace_file(tmp_path / "ws-link", "d/t.csv")

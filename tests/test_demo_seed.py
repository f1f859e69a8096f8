"""`make demo` seeds the example notebook into a workspace that a sandbox owns (and may have
filled with symlinks since the last run): handing the files to the sandbox user must never
follow a link to a file or directory outside it."""

from __future__ import annotations

import os
import pwd

import pytest
from rich.console import Console

from tre import demo
from tre.settings import Settings


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root (the demo runs as root)")
def test_seeding_never_chowns_through_a_symlink(tmp_path, monkeypatch):
    settings = Settings(state_dir=tmp_path / "state")
    victim = tmp_path / "victim"  # e.g. /etc on a real host
    victim.mkdir()
    ws = settings.workspaces_dir / "wilms-outcomes"
    ws.mkdir(parents=True)
    (ws / "outputs").symlink_to(victim)  # the sandbox replaced outputs/ by a link
    sandbox = pwd.struct_passwd(("tre-sandbox", "x", 54321, 54321, "", "/", "/bin/false"))
    monkeypatch.setattr(demo.pwd, "getpwnam", lambda name: sandbox)

    demo.seed_workspaces(demo.DemoContext(settings, Console(quiet=True)))

    assert (ws / demo.EXAMPLE_NOTEBOOK).stat().st_uid == 54321
    assert os.lstat(ws / "outputs").st_uid == 54321  # the link itself
    assert victim.stat().st_uid == 0  # not what it points at


def test_seeding_never_writes_through_a_dangling_symlink(tmp_path, monkeypatch):
    """The sandbox put a link where the notebook goes, to a file that does not exist yet (e.g.
    /etc/cron.d/x): ``exists()`` is False for it, and root must not create the target."""
    settings = Settings(state_dir=tmp_path / "state")
    victim = tmp_path / "etc" / "planted"  # would be created, as root, with the notebook
    victim.parent.mkdir()
    ws = settings.workspaces_dir / "wilms-outcomes"
    ws.mkdir(parents=True)
    (ws / demo.EXAMPLE_NOTEBOOK).symlink_to(victim)
    monkeypatch.setattr(demo.pwd, "getpwnam", lambda name: (_ for _ in ()).throw(KeyError(name)))

    demo.seed_workspaces(demo.DemoContext(settings, Console(quiet=True)))

    assert not victim.exists()
    assert (ws / demo.EXAMPLE_NOTEBOOK).is_symlink()  # left as the sandbox made it

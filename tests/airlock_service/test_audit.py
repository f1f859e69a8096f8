"""The hash-chained audit log: every kind of tampering is detected and named, via the API and
via `tre audit verify` (exit 1), on SQLite and PostgreSQL."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from airlock.service.core import FileSpec
from tre.audit import AuditEvent, export_events, record_event, verify_chain
from tre.cli import app as tre_app


def fill(service, n: int = 6) -> None:
    with service.factory() as s, s.begin():
        for i in range(n):
            record_event(s, "admin", "admin_change", f"project:p{i}", {"i": i, "note": "é"})


def cli(db, *args):
    env = {}
    if db.schema:  # the CLI reaches the test schema through libpq's options
        env["PGOPTIONS"] = f"-csearch_path={db.schema}"
    return CliRunner().invoke(tre_app, ["audit", *args, "--db-url", db.url], env=env)


def problems(service):
    with service.factory() as s:
        return verify_chain(s)


def test_intact_chain_verifies_and_exports(service, db, tmp_path):
    fill(service)
    rid = service.create_request(service.who("alice"), "wilms-outcomes", [FileSpec("notes.txt")])
    service.submit(service.who("alice"), rid)
    assert problems(service) == []
    r = cli(db, "verify")
    assert r.exit_code == 0, r.output
    out = tmp_path / "audit.jsonl"
    assert cli(db, "export", "-o", str(out)).exit_code == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [e["seq"] for e in lines] == list(range(1, len(lines) + 1))
    assert lines[0]["prev_hash"] == "0" * 64
    assert all(b["prev_hash"] == a["hash"] for a, b in zip(lines, lines[1:], strict=False))
    assert {e["action"] for e in lines} >= {"admin_change", "request_create", "file_add"}


def test_edited_event_is_named(service, db):
    fill(service)
    with service.factory() as s, s.begin():
        s.execute(text("UPDATE audit_event SET actor = 'mallory' WHERE seq = 3"))
    found = problems(service)
    assert [(p.seq, p.kind) for p in found] == [(3, "edited")]
    r = cli(db, "verify")
    assert r.exit_code == 1 and "event 3" in r.output


def test_edited_and_rehashed_event_is_named(service):
    """An attacker who also recomputes the edited event's hash breaks the next link."""
    from tre.audit import event_hash

    fill(service)
    with service.factory() as s, s.begin():
        ev = s.query(AuditEvent).filter_by(seq=2).one()
        ev.details = '{"i":99}'
        ev.hash = event_hash(
            ev.seq, ev.ts, ev.actor, ev.action, ev.target, ev.details, ev.prev_hash
        )
    found = problems(service)
    assert (3, "edited") in [(p.seq, p.kind) for p in found]


def test_removed_event_is_named(service, db):
    fill(service)
    with service.factory() as s, s.begin():
        s.execute(text("DELETE FROM audit_event WHERE seq = 4"))
    assert [(p.seq, p.kind) for p in problems(service)] == [(4, "removed")]
    r = cli(db, "verify")
    assert r.exit_code == 1 and "event 4" in r.output and "missing" in r.output


def test_removed_last_event_is_named(service):
    fill(service)
    with service.factory() as s, s.begin():
        s.execute(text("DELETE FROM audit_event WHERE seq = 6"))
    assert [(p.seq, p.kind) for p in problems(service)] == [(6, "removed")]


def test_reordered_events_are_named(service, db):
    fill(service)
    with service.factory() as s, s.begin():
        # swap the positions of events 2 and 3
        s.execute(text("UPDATE audit_event SET seq = -2 WHERE seq = 2"))
        s.execute(text("UPDATE audit_event SET seq = 2 WHERE seq = 3"))
        s.execute(text("UPDATE audit_event SET seq = 3 WHERE seq = -2"))
    kinds = {(p.seq, p.kind) for p in problems(service)}
    assert ("reordered" in {k for _, k in kinds}) and {2, 3} <= {s for s, _ in kinds}
    r = cli(db, "verify")
    assert r.exit_code == 1 and "reordered" in r.output


def test_every_workflow_action_is_an_event(service):
    alice, c1, c2 = service.who("alice"), service.who("checker1"), service.who("checker2")
    rid = service.create_request(alice, "wilms-outcomes", [FileSpec("outputs/table.csv")])
    fid = service.view(alice, rid)["files"][0]["id"]
    service.comment(alice, rid, "context note", "public")
    service.submit(alice, rid)
    service.vote(c1, rid, fid, "approve")
    service.vote(c2, rid, fid, "approve")
    service.download(alice, rid, fid)
    with service.factory() as s:
        actions = [json.loads(x)["action"] for x in export_events(s)]
    for expected in (
        "request_create",
        "file_add",
        "comment",
        "vote",
        "state_change",
        "release",
        "download",
    ):
        assert expected in actions
    # submit, first vote, reviews complete, approve, release: one event per transition
    assert actions.count("state_change") == 5


def test_failed_action_leaves_no_event(service):
    alice = service.who("alice")
    with service.factory() as s:
        before = len(list(export_events(s)))
    with pytest.raises(Exception):  # noqa: B017
        service.create_request(alice, "wilms-outcomes", [FileSpec("../x")])
    with service.factory() as s:
        assert len(list(export_events(s))) == before


def test_events_of_a_transaction_are_chained_at_commit_and_dropped_on_rollback(service):
    from tre.audit import AuditHead

    with service.factory() as s, s.begin():
        first = record_event(s, "admin", "admin_change", "x:1", {})
        second = record_event(s, "admin", "admin_change", "x:2", {})
        assert first.seq is None  # queued: the chain's head is not touched yet
    assert (first.seq, second.seq) == (1, 2) and second.prev_hash == first.hash
    with pytest.raises(RuntimeError), service.factory() as s, s.begin():
        record_event(s, "admin", "admin_change", "x:lost", {})
        raise RuntimeError("the action fails")
    with service.factory() as s, s.begin():
        record_event(s, "admin", "admin_change", "x:3", {})
    with service.factory() as s:
        events = [(e.seq, e.target) for e in s.query(AuditEvent).order_by(AuditEvent.seq)]
        assert events == [(1, "x:1"), (2, "x:2"), (3, "x:3")]
        assert s.get(AuditHead, 1).seq == 3
        assert verify_chain(s) == []


@pytest.mark.postgres
@pytest.mark.parametrize("db", ["postgres"], indirect=True)  # row locks: PostgreSQL only
def test_head_is_not_locked_while_an_action_is_in_progress(service, db):
    """A writer that has recorded its event but not committed yet does not block the others:
    the head is locked only at commit (a second transaction can lock it meanwhile)."""
    assert db.schema is not None
    with service.factory() as s, s.begin():
        record_event(s, "admin", "admin_change", "x:slow", {})
        s.flush()
        with service.engine.connect() as other:
            other.execute(text("SET lock_timeout = '2s'"))
            other.execute(text("SELECT seq FROM audit_head WHERE id = 1 FOR UPDATE NOWAIT"))
            other.rollback()
    with service.factory() as s:
        assert [e.target for e in s.query(AuditEvent)] == ["x:slow"]
        assert verify_chain(s) == []


@pytest.mark.postgres
@pytest.mark.parametrize("db", ["postgres"], indirect=True)  # the atomic append: PostgreSQL
def test_append_that_loses_a_race_chains_again_on_the_new_head(service, db, monkeypatch):
    """Another writer appends between this writer's read of the head and its write: the write
    (head moved only if unchanged, events inserted only if it moved) does nothing, and the
    events are chained again after the other writer's: one chain, no gap, no fork."""
    from tre import audit

    real_chain, raced = audit._chain, []

    def chain_then_race(pending, seq, prev):
        real_chain(pending, seq, prev)
        if not raced:
            raced.append(seq)
            with service.factory() as other, other.begin():  # commits before our write
                record_event(other, "admin", "admin_change", "x:racer", {})

    monkeypatch.setattr(audit, "_chain", chain_then_race)
    with service.factory() as s, s.begin():
        first = record_event(s, "admin", "admin_change", "x:slow-1", {})
        second = record_event(s, "admin", "admin_change", "x:slow-2", {})
    assert raced == [0]
    assert (first.seq, second.seq) == (2, 3)
    with service.factory() as s:
        events = [(e.seq, e.target) for e in s.query(AuditEvent).order_by(AuditEvent.seq)]
        assert events == [(1, "x:racer"), (2, "x:slow-1"), (3, "x:slow-2")]
        assert verify_chain(s) == []


@pytest.mark.postgres
@pytest.mark.parametrize("db", ["postgres"], indirect=True)
def test_appends_of_the_same_size_reuse_one_compiled_statement(service, db):
    """Every vote appends events: the append is compiled once per number of events, not per
    append (with the events as literal VALUES it was compiled every time, ~1 ms of CPU each)."""
    from sqlalchemy import event

    compiled: dict[int, set[int]] = {}

    def seen(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("WITH") and "audit_event" in statement:
            compiled.setdefault(len(parameters), set()).add(id(context.compiled))

    engine = service.factory.kw["bind"]
    event.listen(engine, "before_cursor_execute", seen)
    try:
        for n in (1, 2, 1, 2, 1):
            with service.factory() as s, s.begin():
                for i in range(n):
                    record_event(s, "admin", "admin_change", f"x:{n}-{i}", {"i": i})
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    # 5 + 8 parameters per event: one compiled statement for each size, reused
    assert sorted(compiled) == [13, 21] and all(len(ids) == 1 for ids in compiled.values())
    with service.factory() as s:
        assert verify_chain(s) == []

"""The append-only, hash-chained audit log (stored in the airlock database).

Every action in the TRE (submit, vote, comment, state change, release, download, admin change)
is one ``AuditEvent``. Each event stores the hash of the previous event and its own hash over
(sequence number, time, actor, action, target, details, previous hash), so editing, removing or
reordering any past event breaks the chain and ``verify_chain`` names the event concerned.

A one-row ``audit_head`` table holds the sequence number and hash of the newest event. Appending
locks that row (``SELECT ... FOR UPDATE`` on PostgreSQL; SQLite serialises writers), so concurrent
writers never fork the chain, and removing the newest events is detected too.

Every writer of the TRE serialises on that one row, so it is locked as briefly as possible:
``record_event`` only queues the event in the session, and when the transaction commits, after
the action's own rows are flushed, one hook locks the head, chains the queued events (sequence
numbers, times and hashes are assigned there), writes them and moves the head; the commit follows
at once. The event still commits or rolls back with the action it records.

On PostgreSQL the hook reads the head without locking it, chains the events on it, and writes
them with one statement that moves the head only if it is still the one read and inserts the
events only if it moved (a data-modifying CTE); a writer that lost a race chains again on the
new head. The head row is then locked from that one statement to the commit, instead of across
three statements, each of which had to wait for the interpreter lock of a busy service before
the next could be sent. Elsewhere (SQLite serialises writers anyway) the head is locked with
``SELECT ... FOR UPDATE`` and the events written after it.

Public API for other areas: ``record_event(session, actor, action, target, details)`` (inside the
caller's transaction, so the event commits or rolls back with the action it records) and
``verify_chain(session) -> list[Problem]``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from sqlalchemy import (
    Insert,
    Integer,
    String,
    Text,
    bindparam,
    event,
    exists,
    insert,
    select,
    union_all,
    update,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, SessionTransaction, mapped_column

GENESIS_HASH = "0" * 64
_PENDING = "tre.audit.pending"  # key in Session.info: events waiting for the commit


class AuditBase(DeclarativeBase):
    pass


class AuditEvent(AuditBase):
    __tablename__ = "audit_event"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    seq: Mapped[int] = mapped_column(Integer, unique=True, nullable=False)
    ts: Mapped[str] = mapped_column(String(40), nullable=False)
    actor: Mapped[str] = mapped_column(String(128), nullable=False)
    action: Mapped[str] = mapped_column(String(64), nullable=False, index=True)
    target: Mapped[str] = mapped_column(String(512), nullable=False, index=True)
    # canonical JSON text (sorted keys): hashing must not depend on a backend's JSON type
    details: Mapped[str] = mapped_column(Text, nullable=False, default="{}")
    prev_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    hash: Mapped[str] = mapped_column(String(64), nullable=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "ts": self.ts,
            "actor": self.actor,
            "action": self.action,
            "target": self.target,
            "details": json.loads(self.details),
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }


class AuditHead(AuditBase):
    """Sequence number and hash of the newest event (one row, id 1, created by the migration)."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, nullable=False)
    hash: Mapped[str] = mapped_column(String(64), nullable=False)


@dataclass(frozen=True)
class Problem:
    seq: int | None
    kind: str  # edited | removed | reordered | head
    message: str

    def __str__(self) -> str:
        where = f"event {self.seq}" if self.seq is not None else "log"
        return f"{where}: {self.kind}: {self.message}"


def canonical_json(details: dict[str, Any]) -> str:
    return json.dumps(details, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def event_hash(
    seq: int, ts: str, actor: str, action: str, target: str, details: str, prev_hash: str
) -> str:
    body = json.dumps([seq, ts, actor, action, target, details, prev_hash], ensure_ascii=False)
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def _head(session: Session, lock: bool) -> AuditHead:
    # populate_existing: the row as the database has it now, not an older copy in the session
    stmt = select(AuditHead).where(AuditHead.id == 1).execution_options(populate_existing=True)
    if lock:
        stmt = stmt.with_for_update()
    head = session.execute(stmt).scalar_one_or_none()
    if head is None:
        raise RuntimeError("the audit log is not initialised: run `airlock db upgrade`")
    return head


def record_event(
    session: Session,
    actor: str,
    action: str,
    target: str,
    details: dict[str, Any] | None = None,
) -> AuditEvent:
    """Append one event to the caller's transaction (committed with the action it records).

    The event is chained and written when the transaction commits (see the module docstring);
    until then its ``seq``, ``ts`` and hashes are unset.
    """
    body = canonical_json(details or {})
    ev = AuditEvent(actor=actor, action=action, target=target, details=body)
    session.info.setdefault(_PENDING, []).append(ev)
    return ev


def _chain(pending: list[AuditEvent], seq: int, prev: str) -> None:
    """Give the queued events their sequence numbers, times and hashes after (seq, prev)."""
    for ev in pending:
        seq += 1
        ev.seq = seq
        ev.ts = dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")
        ev.prev_hash = prev
        ev.hash = prev = event_hash(seq, ev.ts, ev.actor, ev.action, ev.target, ev.details, prev)


_EVENT_COLUMNS = ("seq", "ts", "actor", "action", "target", "details", "prev_hash", "hash")
_MAX_APPEND_ATTEMPTS = 1000  # each lost race means another writer appended: progress is made


_HEAD_NOW = select(AuditHead.__table__.c.seq, AuditHead.__table__.c.hash).where(
    AuditHead.__table__.c.id == 1
)


@lru_cache(maxsize=64)
def _append_statement(count: int) -> Insert:
    """The conditional append of ``count`` events, built once per count.

    Built from bound parameters only, so SQLAlchemy compiles it once: with the events as a
    literal ``VALUES`` list it was compiled again on every append (about 1 ms of CPU each,
    holding the interpreter lock that the service's other threads wait for)."""
    head_t, event_t = AuditHead.__table__, AuditEvent.__table__
    moved = (
        update(head_t)
        .where(
            head_t.c.id == 1,
            head_t.c.seq == bindparam("old_seq"),
            head_t.c.hash == bindparam("old_hash"),
        )
        .values(seq=bindparam("new_seq"), hash=bindparam("new_hash"))
        .returning(head_t.c.id)
        .cte("moved")
    )
    rows = [
        select(
            *(
                bindparam(f"{name}_{i}", type_=event_t.c[name].type).label(name)
                for name in _EVENT_COLUMNS
            )
        )
        for i in range(count)
    ]
    queued = (union_all(*rows) if count > 1 else rows[0]).subquery("queued")
    return (
        insert(event_t)
        .from_select(_EVENT_COLUMNS, select(queued).where(exists(select(moved.c.id))))
        .add_cte(moved)
        .returning(event_t.c.seq)
    )


def _append_atomically(session: Session, pending: list[AuditEvent]) -> None:
    """PostgreSQL: chain on the head as read, then move the head and insert the events in one
    statement that does neither unless the head was still the one read (see the docstring)."""
    conn = session.connection()
    statement = _append_statement(len(pending))
    for _ in range(_MAX_APPEND_ATTEMPTS):
        head = conn.execute(_HEAD_NOW).first()
        if head is None:
            raise RuntimeError("the audit log is not initialised: run `airlock db upgrade`")
        _chain(pending, head.seq, head.hash)
        params: dict[str, Any] = {
            "old_seq": head.seq,
            "old_hash": head.hash,
            "new_seq": pending[-1].seq,
            "new_hash": pending[-1].hash,
        }
        for i, ev in enumerate(pending):
            params.update({f"{name}_{i}": getattr(ev, name) for name in _EVENT_COLUMNS})
        written = conn.execute(statement, params).all()
        if len(written) == len(pending):
            return
        if written:  # cannot happen: the insert is all or nothing
            raise RuntimeError("the audit log append wrote part of its events")
    raise RuntimeError("the audit log head kept moving: could not append")


@event.listens_for(Session, "before_commit")
def _chain_pending(session: Session) -> None:
    pending: list[AuditEvent] = session.info.pop(_PENDING, [])
    if not pending:
        return
    session.flush()  # the action's rows first (and their errors), before the head is locked
    if session.get_bind().dialect.name == "postgresql":
        _append_atomically(session, pending)
        return
    head = _head(session, lock=True)
    _chain(pending, head.seq, head.hash)
    session.add_all(pending)
    head.seq, head.hash = pending[-1].seq, pending[-1].hash
    session.flush()


@event.listens_for(Session, "after_transaction_end")
def _drop_pending(session: Session, transaction: SessionTransaction) -> None:
    # committed: already written; rolled back or closed: the events go with the action
    if transaction.parent is None:
        session.info.pop(_PENDING, None)


def iter_events(session: Session) -> Iterator[AuditEvent]:
    yield from session.execute(select(AuditEvent).order_by(AuditEvent.seq)).scalars()


def verify_chain(session: Session) -> list[Problem]:
    """Every edited, removed or reordered event, named by its sequence number (empty = intact)."""
    problems: list[Problem] = []
    events = list(iter_events(session))
    by_hash = {e.hash: e.seq for e in events}
    expected_seq, prev = 1, GENESIS_HASH
    for ev in events:
        recomputed = event_hash(
            ev.seq, ev.ts, ev.actor, ev.action, ev.target, ev.details, ev.prev_hash
        )
        removed_here = ev.seq > expected_seq
        if removed_here:
            missing = (
                str(expected_seq) if ev.seq == expected_seq + 1 else f"{expected_seq}..{ev.seq - 1}"
            )
            problems.append(Problem(expected_seq, "removed", f"event(s) {missing} are missing"))
        if ev.prev_hash != prev and not removed_here:
            follows = by_hash.get(ev.prev_hash)
            if follows is not None and follows != ev.seq - 1:
                problems.append(
                    Problem(
                        ev.seq,
                        "reordered",
                        f"event {ev.seq} was chained after event {follows}, not {ev.seq - 1}",
                    )
                )
            else:
                problems.append(
                    Problem(
                        ev.seq,
                        "edited",
                        f"event {ev.seq} does not chain to event {ev.seq - 1}: one of them"
                        " was altered and re-hashed",
                    )
                )
        if recomputed != ev.hash:
            problems.append(
                Problem(ev.seq, "edited", f"event {ev.seq} ({ev.action}) does not match its hash")
            )
        expected_seq, prev = ev.seq + 1, ev.hash
    head = session.execute(select(AuditHead).where(AuditHead.id == 1)).scalar_one_or_none()
    last_seq = events[-1].seq if events else 0
    if head is None:
        problems.append(Problem(None, "head", "the audit head record is missing"))
    elif head.seq != last_seq or head.hash != prev:
        problems.append(
            Problem(
                last_seq + 1 if head.seq > last_seq else None,
                "removed" if head.seq > last_seq else "head",
                f"the log ends at event {last_seq} but its head records event {head.seq}",
            )
        )
    return problems


def export_events(session: Session) -> Iterator[str]:
    """The log as JSON lines, oldest first."""
    for ev in iter_events(session):
        yield json.dumps(ev.as_dict(), sort_keys=True, ensure_ascii=False)

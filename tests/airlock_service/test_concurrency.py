# ruff: noqa: B023 - race() runs the lambdas before the loop variables change
"""Concurrent votes (real threads, one connection each) keep the invariants: row locks on the
request and the unique (file, reviewer, round) constraint. Runs on PostgreSQL and SQLite."""

from __future__ import annotations

import threading

import pytest

from airlock.service.core import Conflict, FileSpec
from airlock.workflow import TransitionError
from tre.audit import export_events, verify_chain


def race(calls):
    """Run the callables at the same moment; return their results or exceptions."""
    barrier = threading.Barrier(len(calls))
    results: list = [None] * len(calls)

    def run(i, fn):
        barrier.wait()
        try:
            results[i] = fn()
        except Exception as exc:  # noqa: BLE001
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def submitted(service):
    alice = service.who("alice")
    rid = service.create_request(alice, "wilms-outcomes", [FileSpec("outputs/table.csv")])
    service.submit(alice, rid)
    return rid, service.view(alice, rid)["files"][0]["id"]


ROUNDS = 4


def test_two_checkers_at_once_release_exactly_once(service):
    for _ in range(ROUNDS):
        rid, fid = submitted(service)
        c1, c2 = service.who("checker1"), service.who("checker2")
        out = race(
            [
                lambda: service.vote(c1, rid, fid, "approve"),
                lambda: service.vote(c2, rid, fid, "approve"),
            ]
        )
        assert not [r for r in out if isinstance(r, Exception)], out
        assert "released" in out
        with service.factory() as s:
            events = [e for e in export_events(s) if rid in e]
        assert sum('"action": "release"' in e for e in events) == 1
    with service.factory() as s:
        assert verify_chain(s) == []


def test_same_checker_twice_at_once_counts_once(service):
    for _ in range(ROUNDS):
        rid, fid = submitted(service)
        c1 = service.who("checker1")
        out = race([lambda r=rid, f=fid: service.vote(c1, r, f, "approve")] * 2)
        assert sum(isinstance(r, Conflict) for r in out) == 1, out
        view = service.view(c1, rid)
        assert view["files"][0]["vote_count"] == 1
        assert view["state"] == "partially_reviewed"


def test_three_checkers_racing_give_exactly_two_votes(service):
    for _ in range(ROUNDS):
        rid, fid = submitted(service)
        who = [service.who(c) for c in ("checker1", "checker2", "checker3")]
        out = race(
            [lambda w=w, r=rid, f=fid: service.vote(w, r, f, "request_changes", "x") for w in who]
        )
        ok = [r for r in out if not isinstance(r, Exception)]
        assert len(ok) == 2, out
        assert all(isinstance(r, (Conflict, TransitionError)) for r in out if r not in ok)
        assert service.view(who[0], rid)["state"] == "reviewed"
    with service.factory() as s:
        assert verify_chain(s) == []


@pytest.mark.parametrize("n", [8])
def test_parallel_appends_never_fork_the_chain(service, n):
    from tre.audit import record_event

    def append(i):
        with service.factory() as s, s.begin():
            record_event(s, "admin", "admin_change", f"x:{i}", {})

    race([lambda i=i: append(i) for i in range(n)])
    with service.factory() as s:
        assert verify_chain(s) == []
        assert len(list(export_events(s))) == n

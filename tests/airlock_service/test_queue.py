"""The checker queue (column queries) agrees with the rules computed on the full ORM objects,
on SQLite and PostgreSQL, across withdrawn files, returned-and-resubmitted rounds, partial
votes, releases, authors and project members."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import selectinload

from airlock import permissions as perm
from airlock.service.core import FileSpec
from airlock.service.models import ReleaseRequest
from airlock.workflow import State


def reference_queue(service, who: perm.Who) -> dict[str, list[dict[str, Any]]]:
    """The queue as it was computed before (every request loaded with files and votes)."""
    out: dict[str, list[dict[str, Any]]] = {"waiting": [], "in_progress": [], "done": []}
    with service.factory() as session:
        rows = session.execute(
            select(ReleaseRequest)
            .options(selectinload(ReleaseRequest.files), selectinload(ReleaseRequest.votes))
            .where(ReleaseRequest.state != State.PENDING)
            .order_by(ReleaseRequest.updated_at.desc())
        ).scalars()
        for req in rows:
            if not perm.is_eligible_checker(who, req):
                continue
            active = req.active_files()
            mine = {v.file_id for v in req.votes if v.reviewer == who.name and v.round == req.round}
            full = {
                f.id
                for f in active
                if len(
                    {v.reviewer for v in req.votes if v.file_id == f.id and v.round == req.round}
                )
                >= 2
            }
            summary = {
                "id": req.id,
                "state": req.state,
                "round": req.round,
                "file_count": len(active),
                # votes are cast only while a request is in review: elsewhere nothing is to vote
                "files_to_vote": len([f for f in active if f.id not in mine and f.id not in full])
                if req.state in (State.SUBMITTED, State.PARTIALLY_REVIEWED)
                else 0,
            }
            if req.state in (State.SUBMITTED, State.PARTIALLY_REVIEWED):
                key = "waiting" if summary["files_to_vote"] else "in_progress"
            elif req.state in (State.REVIEWED, State.APPROVED):
                key = "in_progress"
            else:
                key = "done"
            out[key].append(summary)
    return out


def _short(queue: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    keys = ("id", "state", "round", "file_count", "files_to_vote")
    return {k: [{x: s[x] for x in keys} for s in v] for k, v in queue.items()}


def test_queue_matches_the_rules_on_full_objects(service):
    alice, carol = service.who("alice"), service.who("carol")
    c1, c2, c3 = (service.who(c) for c in ("checker1", "checker2", "checker3"))
    two = [FileSpec("outputs/table.csv", "a"), FileSpec("outputs/small.csv", "b")]

    def new(author, project="wilms-outcomes", files=two, submit=True):
        rid = service.create_request(author, project, list(files))
        if submit:
            service.submit(author, rid)
        return rid, [f["id"] for f in service.view(author, rid)["files"]]

    new(alice, submit=False)  # pending: in nobody's queue
    new(alice)  # untouched
    rid, (f1, _f2) = new(alice)
    service.vote(
        c1, rid, f1, "approve", justification="reviewed by hand"
    )  # one of two files half-reviewed by checker1
    rid, (f1, f2) = new(alice)
    service.vote(c1, rid, f1, "approve", justification="reviewed by hand")
    service.vote(c2, rid, f1, "approve", justification="reviewed by hand")  # f1 full, f2 open
    rid, (f1, f2) = new(alice)
    for c in (c1, c2):
        service.vote(c, rid, f1, "approve", justification="reviewed by hand")
        service.vote(c, rid, f2, "approve", justification="reviewed by hand")  # released
    rid, (f1, f2) = new(alice)
    for c in (c1, c2):
        service.vote(c, rid, f1, "request_changes", comment="round the counts")
        service.vote(c, rid, f2, "approve", justification="reviewed by hand")
    service.decide(c1, rid, "return", "please round")
    service.add_file(alice, rid, FileSpec("notes.txt", "c"))
    service.submit(alice, rid)  # round 2: last round's votes no longer count
    service.vote(c2, rid, f2, "approve", justification="reviewed by hand")
    rid, (f1, f2) = new(alice, submit=False)
    service.withdraw_file(alice, rid, f2)  # a withdrawn file is not to vote on
    service.submit(alice, rid)
    rid, (f1, _f2) = new(carol, "leukaemia-incidence")  # checker3 is a member: not theirs
    service.vote(c1, rid, f1, "approve", justification="reviewed by hand")
    rid = service.create_request(alice, "wilms-outcomes", [FileSpec("outputs/table.csv")])
    service.submit(alice, rid)
    service.withdraw(alice, rid)  # withdrawn request: done

    for who in (c1, c2, c3, service.who("admin"), alice):
        expected = reference_queue(service, who)
        got = service.queue(who)
        assert _short(got) == expected, who.name
        if who.is_checker:
            assert sum(len(v) for v in got.values()) >= 6
        # the page's form: the latest requests of each list only, all of them counted
        for limit in (0, 1, 2, None):
            cut, totals = service.queue_with_totals(who, limit=limit)
            assert _short(cut) == {k: v[:limit] for k, v in expected.items()}, (who.name, limit)
            assert totals == {k: len(v) for k, v in expected.items()}, (who.name, limit)
    # the summaries carry the same fields as the request list
    listed = {r["id"]: r for r in service.list_requests(c1)}
    for rows in service.queue(c1).values():
        for row in rows:
            assert {k: v for k, v in row.items() if k != "files_to_vote"} == {
                k: v for k, v in listed[row["id"]].items() if k != "latest_comment"
            }


def test_queue_page_lists_the_latest_of_each_list_and_counts_all(service, monkeypatch):
    """The page lists the most recent requests of each list (finished ones grow forever, open
    ones with the checkers' backlog) but counts all of them; the API returns all."""
    import asyncio
    import base64
    import json
    import re

    import httpx
    import itsdangerous

    from airlock.service import app as app_module
    from airlock.service.auth import Identity

    class Tokens:
        async def identify(self, token: str) -> Identity:
            return Identity(name=token)

    monkeypatch.setattr(app_module, "QUEUE_PAGE_ROWS", 2)
    alice = service.who("alice")
    for _ in range(3):
        rid = service.create_request(alice, "wilms-outcomes", [FileSpec("outputs/table.csv")])
        service.submit(alice, rid)
        service.withdraw(alice, rid)  # done
    for _ in range(4):
        rid = service.create_request(alice, "wilms-outcomes", [FileSpec("outputs/table.csv")])
        service.submit(alice, rid)  # waiting
    web = app_module.create_app(service, Tokens(), session_secret="k" * 32)
    session = base64.b64encode(json.dumps({"token": "checker1", "csrf": "c"}).encode())
    cookie = itsdangerous.TimestampSigner("k" * 32).sign(session).decode()

    async def fetch() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=web),
            base_url="http://airlock",
            cookies={"airlock-session": cookie},
        ) as http:
            page = await http.get("/services/airlock/queue")
            api = await http.get(
                "/services/airlock/api/queue", headers={"Authorization": "token checker1"}
            )
            return page, api

    page, api = asyncio.run(fetch())
    assert page.status_code == 200
    assert re.search(r'id="count-done">3<', page.text)
    assert re.search(r'id="count-waiting">4<', page.text)
    done = page.text.split('id="queue-done"')[1]
    assert done.count("<tr><td>") == 2 and "2 most recently updated of 3" in page.text
    waiting = page.text.split('id="queue-waiting"')[1].split("</table>")[0]
    assert waiting.count("<tr><td>") == 2 and "2 most recently updated of 4" in page.text
    assert len(api.json()["done"]) == 3 and len(api.json()["waiting"]) == 4

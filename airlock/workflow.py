"""Release-request states and transitions, as data.

``TRANSITIONS`` is the single source of truth: the service only changes a request's state through
``next_state`` (which refuses anything not in the table), every transition is recorded as one
audit event by the caller, and the state diagram in ``docs/airlock.md`` is generated from this
table by ``airlock workflow diagram --write`` (a test fails when the document is stale).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path


class State(StrEnum):
    PENDING = "pending"
    SUBMITTED = "submitted"
    PARTIALLY_REVIEWED = "partially_reviewed"
    REVIEWED = "reviewed"
    APPROVED = "approved"
    RELEASED = "released"
    RETURNED = "returned"
    REJECTED = "rejected"
    WITHDRAWN = "withdrawn"


class Actor(StrEnum):
    AUTHOR = "author"
    CHECKER = "checker"
    SYSTEM = "system"  # follows automatically from votes


class Action(StrEnum):
    SUBMIT = "submit"
    RESUBMIT = "resubmit"
    FIRST_VOTE = "first_vote"
    REVIEWS_COMPLETE = "reviews_complete"
    APPROVE = "approve"
    RETURN = "return"
    REJECT = "reject"
    RELEASE = "release"
    WITHDRAW = "withdraw"


@dataclass(frozen=True)
class Transition:
    action: Action
    sources: tuple[State, ...]
    target: State
    actor: Actor
    description: str


TRANSITIONS: tuple[Transition, ...] = (
    Transition(Action.SUBMIT, (State.PENDING,), State.SUBMITTED, Actor.AUTHOR, "author submits"),
    Transition(
        Action.RESUBMIT,
        (State.RETURNED,),
        State.SUBMITTED,
        Actor.AUTHOR,
        "author resubmits after changes; a new review round starts",
    ),
    Transition(
        Action.FIRST_VOTE,
        (State.SUBMITTED,),
        State.PARTIALLY_REVIEWED,
        Actor.SYSTEM,
        "the first vote of the round is cast",
    ),
    Transition(
        Action.REVIEWS_COMPLETE,
        (State.PARTIALLY_REVIEWED,),
        State.REVIEWED,
        Actor.SYSTEM,
        "every file has votes from two distinct checkers",
    ),
    Transition(
        Action.APPROVE,
        (State.REVIEWED,),
        State.APPROVED,
        Actor.SYSTEM,
        "both votes on every file are approve",
    ),
    Transition(
        Action.RETURN,
        (State.REVIEWED,),
        State.RETURNED,
        Actor.CHECKER,
        "a checker returns the request to its author for changes",
    ),
    Transition(
        Action.REJECT,
        (State.REVIEWED,),
        State.REJECTED,
        Actor.CHECKER,
        "a checker rejects the request; nothing is released",
    ),
    Transition(
        Action.RELEASE,
        (State.APPROVED,),
        State.RELEASED,
        Actor.SYSTEM,
        "snapshots copied to the released store and verified",
    ),
    Transition(
        Action.WITHDRAW,
        (
            State.PENDING,
            State.SUBMITTED,
            State.PARTIALLY_REVIEWED,
            State.REVIEWED,
            State.RETURNED,
        ),
        State.WITHDRAWN,
        Actor.AUTHOR,
        "author withdraws the request",
    ),
)

FINAL_STATES = frozenset({State.RELEASED, State.REJECTED, State.WITHDRAWN})
# States in which checkers may vote, and in which authors may edit files.
REVIEWABLE_STATES = frozenset({State.SUBMITTED, State.PARTIALLY_REVIEWED})
EDITABLE_STATES = frozenset({State.PENDING, State.RETURNED})


class TransitionError(ValueError):
    """The action is not allowed from the request's current state."""


def transition_for(state: State | str, action: Action | str) -> Transition:
    state, action = State(state), Action(action)
    for t in TRANSITIONS:
        if t.action == action and state in t.sources:
            return t
    allowed = sorted({t.action.value for t in TRANSITIONS if state in t.sources})
    raise TransitionError(
        f"cannot {action.value} a request that is {state.value}"
        f" (allowed: {', '.join(allowed) or 'nothing, it is final'})"
    )


def can_transition(state: State | str, action: Action | str) -> bool:
    try:
        transition_for(state, action)
    except TransitionError:
        return False
    return True


def next_state(state: State | str, action: Action | str) -> State:
    return transition_for(state, action).target


def mermaid_diagram() -> str:
    """The state diagram (Mermaid), generated from ``TRANSITIONS``."""
    lines = ["stateDiagram-v2", "    [*] --> pending: author creates"]
    for t in TRANSITIONS:
        for source in t.sources:
            lines.append(f"    {source.value} --> {t.target.value}: {t.action.value} ({t.actor})")
    for final in sorted(FINAL_STATES):
        lines.append(f"    {final.value} --> [*]")
    return "\n".join(lines)


def transitions_table() -> str:
    rows = ["| action | from | to | by | meaning |", "|---|---|---|---|---|"]
    for t in TRANSITIONS:
        sources = ", ".join(s.value for s in t.sources)
        rows.append(
            f"| {t.action.value} | {sources} | {t.target.value} | {t.actor.value}"
            f" | {t.description} |"
        )
    return "\n".join(rows)


BEGIN_MARK = "<!-- BEGIN GENERATED: airlock workflow diagram -->"
END_MARK = "<!-- END GENERATED: airlock workflow diagram -->"


def generated_block() -> str:
    return (
        f"{BEGIN_MARK}\n```mermaid\n{mermaid_diagram()}\n```\n\n{transitions_table()}\n{END_MARK}"
    )


def render_doc(text: str) -> str:
    """``text`` with the generated block replaced (or appended if it has none)."""
    pattern = re.compile(re.escape(BEGIN_MARK) + r".*?" + re.escape(END_MARK), re.S)
    if pattern.search(text):
        return pattern.sub(lambda _m: generated_block(), text)
    return text.rstrip("\n") + "\n\n" + generated_block() + "\n"


def doc_is_current(doc: Path) -> bool:
    text = doc.read_text(encoding="utf-8") if doc.exists() else ""
    return render_doc(text) == text

"""Text, markdown and logs: every number that could be a count is shown to the checker in context.

Numbers that are obviously not counts are set aside with the reason: years in a date context
("diagnosed in 2015", "2010-2014"), dates and times, version strings, section and figure numbers,
and p-values. A four-digit number without a year context stays a possible count. A count next to
a word for people ("3 children", "n = 4") below ``policy.min_cell_count`` fails; every other
possible count, percentage or decimal gives ``review`` with a snippet around it.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import Any

from airlock.checks.findings import Finding, Status
from airlock.policy import Policy

SNIPPET = 40  # characters each side of a number in a finding
MAX_NUMBERS = 20_000  # a resource guard: more numbers than this is a data dump, not prose
_LISTED = 50

# a comma inside a number only as a thousands separator: "2,3,4" is three numbers
_NUMBER = re.compile(
    r"(?<![\w.])[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?%?(?![\w])"
)
_DATE = re.compile(
    r"\b\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?)?"
    r"|\b\d{1,2}[/.]\d{1,2}[/.]\d{2,4}\b|\b\d{1,2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?\b"
)
_VERSION = re.compile(r"\bv?\d+\.\d+\.\d+(?:[.\-+\w]*)?|\bv\d+(?:\.\d+)?\b", re.IGNORECASE)
_REFERENCE = re.compile(
    r"\b(?:table|figure|fig\.?|section|chapter|step|page|line|cell|model|version|appendix|"
    r"supplementary|item|question|icd-?o-?3?|iccc-?3?|group)\s*$",
    re.IGNORECASE,
)
_YEAR_BEFORE = re.compile(
    r"\b(?:in|since|from|until|till|to|by|during|year|years|between|and|of|before|after|"
    r"circa|c\.|jan\w*|feb\w*|mar\w*|apr\w*|may|jun\w*|jul\w*|aug\w*|sep\w*|oct\w*|nov\w*|"
    r"dec\w*|–|-)\s*$",
    re.IGNORECASE,
)
_PVALUE = re.compile(r"\bp\s*(?:-value)?\s*[=<>≤≥]\s*$", re.IGNORECASE)
_PEOPLE = re.compile(
    r"^\s*(?:children|child|patients?|cases?|subjects?|people|persons?|individuals?|girls?|"
    r"boys?|deaths?|relapses?|events?|survivors?|participants?|records?|tumou?rs?|infants?|"
    r"adolescents?|families|siblings?|died|deceased|were|had|relapsed|survived|progressed|"
    r"recovered|developed|received|underwent|presented)\b",
    re.IGNORECASE,
)
# a count shown as a fraction beside its percentage: "33.3% (2/6)", "2/6 (33.3%)", "2 of 6 (33%)"
_FRACTION_BEFORE = re.compile(
    r"\d\s*%\s*\(\s*(?:\d+\s*(?:/|of|out of)\s*)?$|\b\d+\s*(?:/|of|out of)\s*$", re.IGNORECASE
)
_FRACTION_AFTER = re.compile(
    r"^\s*(?:(?:/|of|out of)\s*\d+\s*)?\(\s*\d+(?:\.\d+)?\s*%", re.IGNORECASE
)
# counts written as words, which the number pattern does not see: "three children"
_WORD_NUMBERS = {
    w: n
    for n, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
}
_WORD_COUNT = re.compile(
    r"\b(?:(a single|single|a lone|lone)|(" + "|".join(_WORD_NUMBERS) + r"))\b", re.IGNORECASE
)
_ADJECTIVES = re.compile(
    r"^(?:\s+(?:more|other|further|additional|young|older|younger|female|male|[a-z]+-year-old))*",
    re.IGNORECASE,
)
_PER_SUBJECT = re.compile(r"^\s+(?:per|each|at a time|or more)\b", re.IGNORECASE)
_ONLY = re.compile(r"\b(?:only|just|exactly|merely|but)\s+$", re.IGNORECASE)
_SINGULAR_EVENT = re.compile(
    r"^\s+(?:\w+\s+){0,3}(?:was|is|had|has|died|relapsed|survived|developed|received|underwent|"
    r"presented|remained)\b",
    re.IGNORECASE,
)
_N_EQUALS = re.compile(r"\b[nN]\s*[=:]\s*$")
_SECTION = re.compile(r"^\s*(?:#+\s*)?$")


@dataclass(frozen=True)
class NumberInText:
    value: str
    start: int
    line: int
    kind: str  # count | small_count | zero_count | percentage | decimal
    snippet: str


def _snippet(text: str, start: int, end: int) -> str:
    a, b = max(0, start - SNIPPET), min(len(text), end + SNIPPET)
    return ("…" if a else "") + text[a:b].replace("\n", " ") + ("…" if b < len(text) else "")


def _masked(text: str) -> str:
    """``text`` with dates, times and versions blanked out (same length: offsets hold)."""

    def blank(m: re.Match[str]) -> str:
        return " " * (m.end() - m.start())

    return _VERSION.sub(blank, _DATE.sub(blank, text))


def numbers_in_text(text: str, policy: Policy, limit: int | None = None) -> list[NumberInText]:
    """Every number in ``text`` that could disclose something, classified (the first ``limit``
    numbers of the text when a limit is given)."""
    plain = _masked(text)
    found: list[NumberInText] = []
    line_starts = [0] + [m.end() for m in re.finditer("\n", text)]
    for seen, m in enumerate(_NUMBER.finditer(plain)):
        if limit is not None and seen >= limit:
            break
        raw = m.group(0)
        start, end = m.start(), m.end()
        line = bisect.bisect_right(line_starts, start) - 1
        before = plain[max(0, start - 30) : start]
        after = plain[end : end + 30]
        line_before = plain[line_starts[line] : start]
        number = raw.rstrip("%").replace(",", "").lstrip("+")
        if _REFERENCE.search(before) or _PVALUE.search(before):
            continue
        if _SECTION.match(line_before) and re.match(r"^[.)]\s", after):
            continue  # "1. Introduction", a numbered list item
        is_int = re.fullmatch(r"-?\d+", number) is not None
        if is_int and len(number) == 4 and 1900 <= int(number) <= 2100:
            # a year when the words around say so; "2015 children" stays a count
            if _YEAR_BEFORE.search(before) and not _PEOPLE.match(after):
                continue
            if re.match(r"^\s*[-–/]\s*\d{2,4}\b", after):
                continue  # a range of years: 2010-2014, 2010/11
        if raw.endswith("%"):
            kind = "percentage"
        elif not is_int:
            kind = "decimal"
        else:
            kind = "count"
            n = abs(int(number))
            about_people = (
                _PEOPLE.match(after)
                or _N_EQUALS.search(before)
                or _FRACTION_BEFORE.search(before)
                or _FRACTION_AFTER.match(after)
            )
            if about_people and 0 < n < policy.min_cell_count:
                kind = "small_count"
            elif about_people and n == 0 and policy.zeros_disclosive:
                kind = "zero_count"
        found.append(
            NumberInText(raw, start, line + 1, kind, _snippet(text, start, end)),
        )
    return found + _counts_in_words(text, plain, line_starts, policy)


def _counts_in_words(
    text: str, plain: str, line_starts: list[int], policy: Policy
) -> list[NumberInText]:
    """Counts of people written as words ("three children", "a single patient"): only those
    followed by a word for people are findings (a bare "one" is usually not a count)."""
    found = []
    for m in _WORD_COUNT.finditer(plain):
        n = 1 if m.group(1) else _WORD_NUMBERS[m.group(2).lower()]
        rest = plain[m.end() : m.end() + 80]
        skipped = _ADJECTIVES.match(rest)
        rest = rest[skipped.end() if skipped else 0 :]
        people = _PEOPLE.match(rest)
        if not people or _PER_SUBJECT.match(rest[people.end() :]):
            continue  # "one record per child" describes the data, it counts nobody
        if n == 1 and not (
            _ONLY.search(plain[max(0, m.start() - 20) : m.start()])
            or _SINGULAR_EVENT.match(rest[people.end() :])
        ):
            continue  # "one patient may have several tumours": a count only when it says so
        if 0 < n < policy.min_cell_count:
            kind = "small_count"
        elif n == 0 and policy.zeros_disclosive:
            kind = "zero_count"
        else:
            continue
        line = bisect.bisect_right(line_starts, m.start()) - 1
        found.append(
            NumberInText(m.group(0), m.start(), line + 1, kind, _snippet(text, m.start(), m.end()))
        )
    return found


def check_text(text: str, policy: Policy, location: dict[str, Any] | None = None) -> list[Finding]:
    """Findings for the numbers in a text: small counts fail, other possible counts review."""
    location = location or {}
    numbers = numbers_in_text(text, policy, limit=MAX_NUMBERS)
    findings: list[Finding] = []
    total = sum(1 for _ in _NUMBER.finditer(_masked(text)))
    if total > MAX_NUMBERS:
        findings.append(
            Finding(
                rule="text.too_many_numbers",
                status=Status.FAIL,
                message=f"{total} numbers: a text with more than {MAX_NUMBERS} numbers is data, "
                f"not prose (only the first {MAX_NUMBERS} were classified)",
                cells=[dict(location)] if location else [],
                evidence={"numbers": total, "classified": MAX_NUMBERS},
            )
        )

    def cells(items: list[NumberInText]) -> list[dict[str, Any]]:
        return [
            {**location, "line": n.line, "value": n.value, "context": n.snippet}
            for n in items[:_LISTED]
        ]

    small = [n for n in numbers if n.kind == "small_count"]
    if small:
        findings.append(
            Finding(
                rule="text.small_count",
                status=Status.FAIL,
                message=f"{len(small)} count(s) of people below {policy.min_cell_count} in the "
                "text",
                cells=cells(small),
                evidence={"numbers": len(small), "min_cell_count": policy.min_cell_count},
            )
        )
    zeros = [n for n in numbers if n.kind == "zero_count"]
    rest = [n for n in numbers if n.kind not in {"small_count"}]
    if zeros:
        rest = [n for n in rest if n.kind != "zero_count"]
        findings.append(
            Finding(
                rule="text.zero_count",
                status=Status.REVIEW,
                message=f"{len(zeros)} zero count(s) of people in the text: structural or not?",
                cells=cells(zeros),
                evidence={"numbers": len(zeros)},
            )
        )
    if rest:
        findings.append(
            Finding(
                rule="text.numbers",
                status=Status.REVIEW,
                message=f"{len(rest)} number(s) in the text could be counts or statistics; "
                "check each in its context",
                cells=cells(rest),
                evidence={
                    "numbers": len(rest),
                    "by_kind": {
                        k: sum(1 for n in rest if n.kind == k)
                        for k in sorted({n.kind for n in rest})
                    },
                },
            )
        )
    return findings

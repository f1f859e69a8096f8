"""Row-level data and leaks of the pooled data itself.

Four rules, all ``fail`` with the offending rows counted and located (0-based data-row
indexes, header excluded, as in the table rules):

- ``leak.identifier``: a value equal to a pseudonymous id of the extract (``patient_id``,
  ``tumour_id``), in any column of a table or any word of a text;
- ``leak.row_match``: export rows whose values, on the columns they share with an extract table,
  match fewer than ``policy.k_anonymity`` extract records (one match: the row IS a record);
- ``leak.qi_match``: the same on the quasi-identifiers alone (``policy.quasi_identifiers``
  present in both), so that a row is caught even when its other columns were altered;
- ``leak.k_anonymity``: a row-level table whose quasi-identifier combinations occur fewer than
  ``policy.k_anonymity`` times in the export itself (no extract needed).

The extract is opened READ-ONLY with DuckDB and the export registered as an Arrow table, so the
joins run inside DuckDB and stay fast on extracts of tens of millions of rows.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import duckdb
import polars as pl

from airlock.checks.cells import INVISIBLE as INVISIBLE_CHARACTERS
from airlock.checks.findings import Finding, Status
from airlock.checks.layout import COUNT_WORDS, words

if TYPE_CHECKING:
    from airlock.policy import Policy


class LeakContext(Protocol):
    """What the leak rules need of a check's context (``airlock.checks.context.CheckContext``
    has it): the policy, and the project's extract when it is known."""

    policy: Policy
    extract: ExtractIndex | None


# Columns of the pooled data model that hold pseudonymous identifiers.
ID_COLUMNS = ("patient_id", "tumour_id")
# Column names that say "this row is one subject/record".
_ROW_ID_NAMES = {"id", "patient_id", "tumour_id", "subject_id", "person_id", "record_id"}
_NOT_ROW_IDS = {"site_id", "study_id", "load_batch", "source_dataset"}
_ROWS_LISTED = 20
_NUMERIC_TYPES = ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "FLOAT", "DOUBLE")
_NUMERIC_TYPES += ("UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT")
_MIN_ID_CHARS = 6  # a pseudonym shorter than this would not be a pseudonym
_WORD = re.compile(r"[A-Za-z0-9_\-]{6,}")
# Comparing the join of several tables costs a join of the tables: only below this many rows.
CHAIN_MAX_ROWS = 2_000_000


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class ExtractIndex:
    """A project's extract (DuckDB file) opened read-only, and what the leak rules need of it."""

    def __init__(self, path: Path | str, memory_limit: str = "1GB") -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"extract {self.path} does not exist")
        self._con = duckdb.connect(
            str(self.path), read_only=True, config={"memory_limit": memory_limit}
        )
        self._lock = threading.Lock()
        self._few: dict[tuple[str, tuple[str, ...]], bool] = {}
        self.id_shapes: dict[tuple[str, str], tuple[int, bool]] = {}
        rows = self._con.execute(
            "SELECT table_name, column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = 'main' ORDER BY table_name, ordinal_position"
        ).fetchall()
        self.tables: dict[str, dict[str, str]] = {}
        for table, column, dtype in rows:
            self.tables.setdefault(table, {})[column] = dtype.upper()
        # (table, column, is_text) for every identifier, read from one table only: the table
        # named after it when there is one (patient_id from patient), as the others repeat it
        self.id_columns = []
        for name in ID_COLUMNS:
            holders = [(t, c) for t in self.tables for c in self.tables[t] if c.lower() == name]
            if holders:
                stem = name.removesuffix("_id")
                table, column = next((h for h in holders if h[0].lower() == stem), holders[0])
                is_text = not self.tables[table][column].startswith(_NUMERIC_TYPES)
                self.id_columns.append((table, column, is_text))
        self.rows = {
            t: int(n)
            for t, n in self._con.execute(
                "SELECT table_name, estimated_size FROM duckdb_tables() WHERE schema_name = 'main'"
            ).fetchall()
        }

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> ExtractIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def cursor(self) -> duckdb.DuckDBPyConnection:
        with self._lock:
            return self._con.cursor()


def _rows_cells(rows: list[int], columns: list[str]) -> list[dict[str, Any]]:
    return [{"row": r, "columns": columns} for r in rows[:_ROWS_LISTED]]


def _as_text_frame(df: pl.DataFrame) -> pl.DataFrame:
    return df.select([pl.col(c).cast(pl.String, strict=False) for c in df.columns])


_IN_LIST_MAX = 5000


def _ids_among(
    cur: duckdb.DuckDBPyConnection, table: str, column: str, candidates: pl.Series
) -> set[str]:
    """The candidates that are ids in ``table.column``. A few thousand candidates go in as a
    constant IN list, which DuckDB checks against each row group's min/max before reading it
    (ids with a structure, such as a prefix, then skip most of the column); more go through a
    semi-join that hashes the candidates and streams the id column."""
    if len(candidates) <= _IN_LIST_MAX:
        literals = ", ".join("'" + v.replace("'", "''") + "'" for v in candidates.to_list())
        sql = (
            f"SELECT DISTINCT {_quote(column)} FROM {_quote(table)} "
            f"WHERE {_quote(column)} IN ({literals})"
        )
        return {r[0] for r in cur.execute(sql).fetchall()}
    cur.register("__id_candidates", pl.DataFrame({"value": candidates}).to_arrow())
    sql = (
        f"SELECT DISTINCT x.{_quote(column)} FROM {_quote(table)} x "
        f"SEMI JOIN __id_candidates c ON x.{_quote(column)} = c.value"
    )
    return {r[0] for r in cur.execute(sql).fetchall()}


def find_identifiers(df: pl.DataFrame, extract: ExtractIndex) -> Finding | None:
    """Values equal to an extract id. Text ids are looked for in every column; numeric ids only
    in a column of the same name (else every small count would 'match' patient 12)."""
    if not extract.id_columns or df.height == 0 or df.width == 0:
        return None
    # positional column names: the export's own names ("value", "col", "__row"...) must not
    # collide with the long format's columns (a table with a "value" column was unreadable)
    text = _as_text_frame(df)
    text.columns = [str(i) for i in range(text.width)]
    text = text.with_row_index("__row", offset=0)
    long = text.unpivot(index="__row", variable_name="col", value_name="value").drop_nulls()
    long = long.with_columns(
        pl.col("col").cast(pl.Int64).replace_strict(dict(enumerate(df.columns))),
        pl.col("value").str.strip_chars(),
    )
    lower_names = {c.lower(): c for c in df.columns}
    candidates = (
        long.get_column("value").filter(long.get_column("value").str.len_chars() >= _MIN_ID_CHARS)
    ).unique()
    found: set[str] = set()
    hits: set[tuple[int, str]] = set()
    cur = extract.cursor()
    try:
        cur.register("__export_values", long.to_arrow())
        for table, column, is_text in extract.id_columns:
            if is_text and len(candidates):
                found |= _ids_among(cur, table, column, candidates)
            elif not is_text and column.lower() in lower_names:
                sql = (
                    f"SELECT DISTINCT v.__row, v.col FROM {_quote(table)} x JOIN "
                    f"(SELECT __row, col, TRY_CAST(value AS DOUBLE) AS value FROM __export_values"
                    f" WHERE lower(col) = '{column.lower()}') v ON x.{_quote(column)} = v.value"
                )
                hits.update(cur.execute(sql).fetchall())
    finally:
        cur.close()
    if found:
        matched = long.filter(pl.col("value").is_in(list(found)))
        hits.update(zip(matched.get_column("__row"), matched.get_column("col"), strict=True))
    if not hits:
        return None
    rows = sorted({r for r, _ in hits})
    cols = sorted({c for _, c in hits})
    return Finding(
        rule="leak.identifier",
        status=Status.FAIL,
        message=f"{len(rows)} row(s) contain pseudonymous patient/tumour ids of the extract "
        f"(columns {', '.join(cols)}): identifiers never leave the TRE",
        cells=[{"row": r, "column": c} for r, c in sorted(hits)[:_ROWS_LISTED]],
        evidence={"rows": len(rows), "values": len(hits), "columns": cols},
    )


INVISIBLE = re.compile(INVISIBLE_CHARACTERS)
# An id fragment: this many hex characters (64 bits) still single out a child among billions.
FRAGMENT_CHARS = 16
# Extract ids are cut into windows of FRAGMENT_CHARS starting every _WINDOW_STEP characters (and
# the last FRAGMENT_CHARS): any prefix or suffix of 16 characters or more, and any piece of 23
# or more, contains one.
_WINDOW_STEP = 8
_MAX_FRAGMENTS = 1_000_000  # a resource guard: more hex windows than this is a hex dump
# hex digits, possibly grouped by dashes, colons or dots (a UUID, a MAC-like 'ab:cd:...')
_HEX_GROUPED = re.compile(r"[0-9a-fA-F](?:[0-9a-fA-F]|[-:.](?=[0-9a-fA-F]))*")
# what separates cells on a line (CSV, TSV, pipes, quotes, spaces): packed away so that an id
# split across adjacent cells is whole again
_CELL_SEPARATORS = re.compile(r"[\s,;|\"'`&]+")
_BASE64_WORD = re.compile(r"[A-Za-z0-9+/_-]{16,}={0,2}")
_BASE32_WORD = re.compile(r"[A-Z2-7]{16,}={0,6}")


def _decoded_words(text: str) -> list[str]:
    """Short base64/base32 words decoded (long ones are ``encoded.blob``): as text when they
    decode to text, else as the hex of their bytes."""
    import base64
    import binascii

    out: list[str] = []
    for pattern, decode in ((_BASE64_WORD, "b64"), (_BASE32_WORD, "b32")):
        for m in pattern.finditer(text):
            word = m.group(0).rstrip("=")
            if sum(bool(re.search(c, word)) for c in ("[A-Z]", "[a-z]", "[0-9]")) < 2:
                continue  # a number or a word, not an encoding
            try:
                if decode == "b32":
                    blob = base64.b32decode(word + "=" * (-len(word) % 8))
                elif "-" in word or "_" in word:
                    blob = base64.urlsafe_b64decode(word + "=" * (-len(word) % 4))
                else:
                    blob = base64.b64decode(word + "=" * (-len(word) % 4))
            except (binascii.Error, ValueError):
                continue
            if len(blob) < FRAGMENT_CHARS // 2:
                continue
            try:
                out.append(blob.decode("ascii"))
            except UnicodeDecodeError:
                out.append(blob.hex())
    return out


def id_fragments(text: str) -> set[str]:
    """Every lower-case window of FRAGMENT_CHARS hex characters an id could hide in: hex runs
    (separators removed), read forwards and backwards, also with each line's cells packed
    together, and in short base64/base32 words decoded. A run needs a letter a-f (a run of
    digits is a number, not a hex id)."""
    text = INVISIBLE.sub("", text)
    sources = [text, _CELL_SEPARATORS.sub("", text.replace("\n", "\u0000"))]
    sources += _decoded_words(text)
    windows: set[str] = set()
    for source in sources:
        for m in _HEX_GROUPED.finditer(source):
            run = re.sub(r"[-:.]", "", m.group(0)).lower()
            if len(run) < FRAGMENT_CHARS or not re.search("[a-f]", run):
                continue
            for value in (run, run[::-1]):
                windows.update(
                    value[i : i + FRAGMENT_CHARS] for i in range(len(value) - FRAGMENT_CHARS + 1)
                )
            if len(windows) > _MAX_FRAGMENTS:
                raise ValueError(
                    f"more than {_MAX_FRAGMENTS} hex fragments: a hex dump, not an output"
                )
    return windows


def _ids_with_fragments(
    cur: duckdb.DuckDBPyConnection,
    table: str,
    column: str,
    fragments: set[str],
    extract_shapes: dict[tuple[str, str], tuple[int, bool]],
) -> set[str]:
    """Ids of ``table.column`` one of whose windows (every _WINDOW_STEP characters, and the
    last FRAGMENT_CHARS) is among ``fragments``."""
    col = _quote(column)
    key = (table, column)
    if key not in extract_shapes:
        # the longest id, and whether all ids are lower case (the pseudonyms are): computed
        # once per extract, so that the probes below need no lower() per id
        longest, lowered = cur.execute(
            f"SELECT max(length({col})), bool_and({col} = lower({col})) FROM {_quote(table)}"
        ).fetchall()[0]
        extract_shapes[key] = (longest or 0, bool(lowered))
    longest, lowered = extract_shapes[key]
    if longest < FRAGMENT_CHARS:
        return set()
    cur.register("__id_fragments", pl.DataFrame({"v": sorted(fragments)}).to_arrow())
    case = "{}" if lowered else "lower({})"
    probes = [case.format(f"right({col}, {FRAGMENT_CHARS})")] + [
        case.format(f"substr({col}, {start + 1}, {FRAGMENT_CHARS})")
        for start in range(0, longest - FRAGMENT_CHARS + 1, _WINDOW_STEP)
    ]
    # one hash semi-join per window position: DuckDB plans an OR of IN-subqueries as a
    # nested loop, several times slower on millions of ids
    sql = " UNION ".join(
        f"SELECT {col} FROM {_quote(table)} SEMI JOIN __id_fragments f ON {p} = f.v" for p in probes
    )
    return {r[0] for r in cur.execute(sql).fetchall()}


def find_identifiers_in_text(text: str, extract: ExtractIndex) -> Finding | None:
    """Ids of the extract in a text (a log, a notebook's JSON, the XML of a workbook): whole
    words in any case, and hex ids however transformed (upper case, dashes, prefixes, split
    across cells, truncated to 16 characters, reversed, in short base64/base32)."""
    if not any(is_text for _, _, is_text in extract.id_columns):
        return None
    plain = INVISIBLE.sub("", text)
    words = set(_WORD.findall(plain))
    words |= {w.lower() for w in words} | {w.upper() for w in words}
    try:
        fragments = id_fragments(plain)
    except ValueError as exc:  # too many hex strings to search: nobody can review them either
        return Finding(
            rule="leak.identifier",
            status=Status.FAIL,
            message=f"{exc}: the file cannot be searched for disguised ids of the extract; "
            "remove the hex strings (hashes, ids) from the output",
            evidence={"fragments": _MAX_FRAGMENTS},
        )
    found: set[str] = set()
    transformed: set[str] = set()
    cur = extract.cursor()
    try:
        for table, column, is_text in extract.id_columns:
            if not is_text:
                continue
            if words:
                found |= _ids_among(cur, table, column, pl.Series(sorted(words), dtype=pl.String))
            if fragments:
                hits = _ids_with_fragments(cur, table, column, fragments, extract.id_shapes)
                transformed |= hits - found
    finally:
        cur.close()
    if not found and not transformed:
        return None
    cells = []
    for word in sorted(found | transformed)[:_ROWS_LISTED]:
        pos = plain.lower().find(word.lower())
        cell: dict[str, Any] = {"value": word[:4] + "…"}
        if pos >= 0:
            cell["line"] = plain.count("\n", 0, pos) + 1
        else:
            cell["transformed"] = True
        cells.append(cell)
    how = f" ({len(transformed)} disguised: case, separators, pieces, reversed or encoded)"
    return Finding(
        rule="leak.identifier",
        status=Status.FAIL,
        message=f"{len(found | transformed)} pseudonymous id(s) of the extract appear in the "
        f"file{how if transformed else ''}: identifiers never leave the TRE",
        cells=cells,
        evidence={"identifiers": len(found | transformed), "disguised": len(transformed)},
    )


def _few_groups(extract: ExtractIndex, table: str, columns: list[str]) -> bool:
    """Whether these columns repeat a lot in the table (judged on a 2% block sample): then
    counting every combination first is cheaper than joining every extract row to the export."""
    key = (table, tuple(columns))
    if key not in extract._few:
        cols = ", ".join(_quote(c) for c in columns)
        cur = extract.cursor()
        try:
            sampled, distinct = cur.execute(
                f"WITH s AS (SELECT {cols} FROM {_quote(table)} USING SAMPLE 2 PERCENT (system)) "
                f"SELECT (SELECT count(*) FROM s), (SELECT count(*) FROM (SELECT DISTINCT {cols} "
                "FROM s))"
            ).fetchall()[0]
        finally:
            cur.close()
        extract._few[key] = distinct <= 0.5 * max(sampled, 1)
    return extract._few[key]


# (export column, extract table alias, extract column)
_Pair = tuple[str, str, str]


def _match_rows(
    df: pl.DataFrame,
    extract: ExtractIndex,
    tables: list[tuple[str, str | None]],
    pairs: list[_Pair],
    k: int,
) -> list[tuple[int, int]]:
    """(export row, matching extract records) for the rows that match fewer than k records.

    ``tables`` is a chain [(table, None), (table2, id column linking it to the chain), ...];
    the records are the rows of the chain's join. ``pairs`` name the columns compared. Values are
    normalised on the export side only (the extract side stays a plain column, so the join
    probes millions of extract rows cheaply): numbers as numbers, text case-insensitively.
    """
    aliases = {table: f"x{i}" for i, (table, _) in enumerate(tables)}
    sel, conds, agg_conds = [], [], []
    for i, (mine, table, theirs) in enumerate(pairs):
        alias, ref, agg_ref = f"c{i}", f"{aliases[table]}.{_quote(theirs)}", f"a.k{i}"
        dtype = extract.tables[table][theirs]
        if dtype.startswith(_NUMERIC_TYPES):
            sel.append(f"TRY_CAST(TRIM(CAST({_quote(mine)} AS VARCHAR)) AS DOUBLE) AS {alias}")
            compare = "{} = m.{}"
        elif dtype == "VARCHAR":
            sel.append(f"lower(trim(CAST({_quote(mine)} AS VARCHAR))) AS {alias}")
            compare = "lower({}) = m.{}"
        else:
            sel.append(f"TRIM(CAST({_quote(mine)} AS VARCHAR)) AS {alias}")
            compare = "CAST({} AS VARCHAR) = m.{}"
        conds.append(compare.format(ref, alias))
        agg_conds.append(compare.format(agg_ref, alias))
    names = [f"c{i}" for i in range(len(pairs))]
    not_null = " AND ".join(f"{a} IS NOT NULL" for a in names)
    first, _ = tables[0]
    source = f"{_quote(first)} {aliases[first]}"
    for i, (table, link) in enumerate(tables[1:], start=1):
        prev = next(t for t, _ in tables[:i] if link in extract.tables[t])
        source += (
            f" JOIN {_quote(table)} {aliases[table]} ON "
            f"{aliases[table]}.{_quote(link)} = {aliases[prev]}.{_quote(link)}"
        )
    m_cols = ", ".join("m." + a for a in names)
    if len(tables) == 1 and _few_groups(extract, first, [p[2] for p in pairs]):
        # few distinct combinations in the extract: counting them all first is cheaper than
        # joining every extract row to the export
        keys = ", ".join(f"x0.{_quote(p[2])} AS k{i}" for i, p in enumerate(pairs))
        hits = (
            f"SELECT {m_cols}, a.n FROM (SELECT {keys}, count(*) AS n FROM {source} "
            f"GROUP BY ALL) a JOIN m ON {' AND '.join(agg_conds)}"
        )
    else:
        hits = f"SELECT {m_cols}, count(*) AS n FROM {source} JOIN m ON {' AND '.join(conds)} "
        hits += "GROUP BY ALL"
    row = "__row"
    while row in df.columns:  # an export column of that name must not hide the row number
        row += "_"
    sql = f"""
        WITH e AS (SELECT {row} AS __row, {", ".join(sel)} FROM __export_rows),
        m AS (SELECT DISTINCT {", ".join(names)} FROM e WHERE {not_null}),
        hits AS ({hits})
        SELECT e.__row, sum(hits.n) AS n FROM e JOIN hits USING ({", ".join(names)})
        GROUP BY e.__row HAVING sum(hits.n) < {int(k)} ORDER BY e.__row
    """
    cur = extract.cursor()
    try:
        cur.register("__export_rows", df.with_row_index(row, offset=0).to_arrow())
        return [(int(r), int(n)) for r, n in cur.execute(sql).fetchall()]
    finally:
        cur.close()


def _comparisons(
    df: pl.DataFrame, extract: ExtractIndex
) -> list[tuple[list[tuple[str, str | None]], list[_Pair]]]:
    """What to compare: each extract table on the columns it shares with the export, and the
    join of the tables linked by an id column (a patient table and a tumour table, say) on the
    columns they share together, each export column compared once."""
    mine = {c.lower(): c for c in df.columns}
    per_table: dict[str, list[_Pair]] = {}
    for table, columns in extract.tables.items():
        pairs = [
            (mine[c.lower()], table, c)
            for c in columns
            if c.lower() in mine and c.lower() not in ID_COLUMNS
        ]
        if pairs:
            per_table[table] = pairs
    out: list[tuple[list[tuple[str, str | None]], list[_Pair]]] = [
        ([(t, None)], pairs) for t, pairs in per_table.items()
    ]
    ranked = sorted(per_table, key=lambda t: -len(per_table[t]))
    if len(ranked) >= 2:
        chain: list[tuple[str, str | None]] = [(ranked[0], None)]
        used = {p[0] for p in per_table[ranked[0]]}
        pairs = list(per_table[ranked[0]])
        for table in ranked[1:4]:
            new = [p for p in per_table[table] if p[0] not in used]
            link = next(
                (
                    c
                    for c in extract.tables[table]
                    if c.lower() in ID_COLUMNS and any(c in extract.tables[t] for t, _ in chain)
                ),
                None,
            )
            if new and link:
                chain.append((table, link))
                pairs += new
                used.update(p[0] for p in new)
        if len(chain) >= 2 and sum(extract.rows.get(t, 0) for t, _ in chain) <= CHAIN_MAX_ROWS:
            out.append((chain, pairs))
    return out


def find_row_matches(df: pl.DataFrame, extract: ExtractIndex, policy: Any) -> list[Finding]:
    """Rows singling out fewer than k extract records, on shared columns and on shared QIs."""
    if df.height == 0:
        return []
    qis = {q.lower() for q in policy.quasi_identifiers}
    results: dict[str, tuple[set[int], list[str], int]] = {}
    for tables, shared in _comparisons(df, extract):
        qi_shared = [p for p in shared if p[2].lower() in qis]
        for rule, pairs in (("leak.row_match", shared), ("leak.qi_match", qi_shared)):
            if len(pairs) < 2 or (rule == "leak.qi_match" and len(qi_shared) == len(shared)):
                continue
            matched = _match_rows(df, extract, tables, pairs, policy.k_anonymity)
            if matched:
                rows, cols, unique = results.get(rule, (set(), [], 0))
                rows.update(r for r, _ in matched)
                cols = cols + [f"{t}.{c}" for _, t, c in pairs if f"{t}.{c}" not in cols]
                unique = max(unique, sum(1 for _, n in matched if n == 1))
                results[rule] = (rows, cols, unique)
    findings = []
    for rule, (rows, cols, unique) in results.items():
        what = "the columns they share" if rule == "leak.row_match" else "quasi-identifiers"
        findings.append(
            Finding(
                rule=rule,
                status=Status.FAIL,
                message=f"{len(rows)} row(s) match fewer than {policy.k_anonymity} records of "
                f"the project's extract on {what} ({', '.join(cols)}); {unique} match exactly "
                "one record: this is row-level data from the extract",
                cells=_rows_cells(sorted(rows), cols),
                evidence={"rows": len(rows), "unique_matches": unique, "columns": cols},
            )
        )
    return findings


_STAT_NAME = re.compile(
    r"(^|_)(n|count|counts|freq|frequency|total|number|num|sum|mean|avg|average|median|sd|std|"
    r"se|min|max|pct|percent|percentage|prop|proportion|rate|ratio|hr|or|rr|estimate|coef|"
    r"p|pvalue|ci|lower|upper|q\d+|iqr|value|n_\w+)($|_)",
    re.IGNORECASE,
)


# a column named by a value (a pivoted year, "0-4", "<1") holds counts, not groups
_VALUE_HEADER = re.compile(r"^[\d\s.,<>=+\-–]+$")


def quasi_identifiers_in(df: pl.DataFrame, policy: Any) -> list[str]:
    qis = {q.lower() for q in policy.quasi_identifiers}
    return [c for c in df.columns if c.lower() in qis]


def is_row_level(df: pl.DataFrame, policy: Any) -> bool:
    """Whether a table looks like one row per subject rather than an aggregate (heuristic).

    Row-level when: a column is an id with (nearly) distinct values; or the quasi-identifier and
    text columns do not form a key (a group-by output always does); or they do, but nothing in
    the table is a number beside them (a list of records, nothing aggregated).
    """
    if df.height < 2:
        return False
    for c in df.columns:
        low = c.lower()
        if low in _ROW_ID_NAMES or (low.endswith("_id") and low not in _NOT_ROW_IDS):
            if df.get_column(c).n_unique() >= 0.9 * df.height:
                return True
    qis = quasi_identifiers_in(df, policy)
    if not qis:
        return False
    schema = df.schema
    # the grouping columns of an aggregate: quasi-identifiers, text, and integers not named
    # like a statistic (a year, an age band number)
    groups = [
        c
        for c, dtype in schema.items()
        if dtype == pl.String
        or (
            dtype.is_integer()
            and not _STAT_NAME.search(c)
            and not _VALUE_HEADER.match(c)
            and not set(words(c)) & COUNT_WORDS  # 'cases', 'patients': counts, not groups
        )
    ]
    key = list(dict.fromkeys(qis + groups))
    if df.select(key).n_unique() < df.height:
        return True
    others = [c for c in df.columns if c not in key]
    numeric_others = [c for c in others if schema[c].is_numeric()]
    return not numeric_others and not any(_STAT_NAME.search(c) for c in df.columns)


def find_small_classes(df: pl.DataFrame, policy: Any) -> Finding | None:
    """Row-level records whose quasi-identifier combination occurs fewer than k times."""
    qis = quasi_identifiers_in(df, policy)
    if not qis or not is_row_level(df, policy):
        return None
    sizes = (
        df.select(qis)
        .with_row_index("__row", offset=0)
        .with_columns(pl.len().over(qis).alias("__k"))
        .filter(pl.col("__k") < policy.k_anonymity)
    )
    if sizes.height == 0:
        return None
    rows = sizes.get_column("__row").to_list()
    smallest = int(sizes.get_column("__k").min())
    return Finding(
        rule="leak.k_anonymity",
        status=Status.FAIL,
        message=f"row-level records: {len(rows)} row(s) have a combination of quasi-identifiers "
        f"({', '.join(qis)}) shared by fewer than {policy.k_anonymity} rows (smallest: "
        f"{smallest}); such rows can single out a child",
        cells=_rows_cells(rows, qis),
        evidence={"rows": len(rows), "smallest_class": smallest, "quasi_identifiers": qis},
    )


def check_rows(df: pl.DataFrame, ctx: LeakContext) -> list[Finding]:
    """Every leak rule on one table (the extract rules only when the extract is known)."""
    findings: list[Finding] = []
    small = find_small_classes(df, ctx.policy)
    if small:
        findings.append(small)
    if ctx.extract is not None:
        ident = find_identifiers(df, ctx.extract)
        if ident:
            findings.append(ident)
        findings += find_row_matches(df, ctx.extract, ctx.policy)
    return findings

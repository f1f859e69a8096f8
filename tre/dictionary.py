"""The core data dictionary (``policies/dictionary.yaml``) and vectorised validation against it.

``load_dictionary`` parses and cross-checks the YAML (pydantic), ``harmonise_and_validate``
maps one delivered table onto the dictionary (site spellings -> code lists, ICD-O-3 forms ->
morphology/behaviour/topography, text -> typed values) and checks every row, and
``validate_batch`` adds the cross-table rules. Everything is polars expressions over whole
columns: no per-row Python, so a million rows validate in about a second.

Bad input never raises half-way: a table-level problem (a missing required column, an unknown
column) raises ``DeliveryError`` before anything is done; row-level problems come back as an
``errors`` frame (row, column, value, rule, message) next to the ``valid`` rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import polars as pl
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tre import iccc3

DICTIONARY_FILE = Path(__file__).resolve().parent.parent / "policies" / "dictionary.yaml"
ROW = "_row"
ERROR_SCHEMA = {
    "row": pl.Int64,
    "column": pl.String,
    "value": pl.String,
    "rule": pl.String,
    "message": pl.String,
}

ColumnType = Literal["string", "int", "code", "icdo3_morphology", "icdo3_topography"]


class DictionaryError(ValueError):
    """The dictionary file is invalid; the message names each problem."""


class DeliveryError(ValueError):
    """A delivered table cannot be validated at all (e.g. a required column is missing)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Harmonise(_Strict):
    regex: str
    behaviour_column: str | None = None
    template: str | None = None


class ColumnSpec(_Strict):
    name: str = ""
    type: ColumnType
    required: bool = False
    delivered: bool = True
    identifier: bool = False
    unique: bool = False
    codes: list[str] | None = None
    synonyms: dict[str, list[str]] = Field(default_factory=dict)
    min: int | None = None
    max: int | None = None
    harmonise: Harmonise | None = None
    source: str | None = None
    description: str = ""
    store_as: Literal["string", "int"] | None = None

    @model_validator(mode="after")
    def _check(self) -> ColumnSpec:
        if self.type == "code" and not self.codes:
            raise ValueError("a code column needs a non-empty 'codes' list")
        for target in self.synonyms:
            if target not in (self.codes or []):
                raise ValueError(f"synonyms target {target!r} is not one of the codes")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("min is greater than max")
        return self

    def code_map(self) -> dict[str, str]:
        """Lower-cased spelling -> canonical code, for every code and synonym."""
        mapping = {c.lower(): c for c in self.codes or []}
        for target, spellings in self.synonyms.items():
            for s in spellings:
                key = str(s).strip().lower()
                if key in mapping and mapping[key] != target:
                    raise ValueError(f"spelling {s!r} maps to both {mapping[key]!r} and {target!r}")
                mapping[key] = target
        return mapping


class TableSpec(_Strict):
    name: str = ""
    description: str = ""
    columns: dict[str, ColumnSpec]
    unique_together: list[str] | None = None
    stage_values: dict[str, list[str]] | None = None


class RuleSpec(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)
    id: str
    kind: Literal[
        "iccc3_classifiable",
        "stage_in_system",
        "only_if",
        "foreign_key",
        "not_before",
        "year_matches_age",
        "not_after",
    ]
    table: str

    def get(self, key: str, default: Any = None) -> Any:  # noqa: ANN401 - YAML scalar
        return (self.model_extra or {}).get(key, default)


class DataDictionary(_Strict):
    version: str
    max_age_days: int
    provenance: list[str]
    tables: dict[str, TableSpec]
    rules: list[RuleSpec] = Field(default_factory=list)

    def table(self, table: str) -> TableSpec:
        try:
            return self.tables[table]
        except KeyError:
            raise KeyError(
                f"unknown table {table!r}; tables are {', '.join(self.tables)}"
            ) from None

    def delivered_columns(self, table: str) -> list[str]:
        """Columns a site delivers for this table (with its local ids)."""
        return [n for n, c in self.table(table).columns.items() if c.delivered]

    def required_columns(self, table: str) -> list[str]:
        """Delivered columns that must be present and non-empty."""
        return [n for n, c in self.table(table).columns.items() if c.delivered and c.required]

    def identifier_columns(self, table: str) -> list[str]:
        """Columns holding site-local ids, which the pooled store holds pseudonymised."""
        return [n for n, c in self.table(table).columns.items() if c.identifier]

    def pooled_columns(self, table: str) -> list[str]:
        """Columns of the pooled table: dictionary columns, then provenance."""
        cols = list(self.table(table).columns)
        return cols + [p for p in self.provenance if p not in cols]

    def rules_for(self, table: str) -> list[RuleSpec]:
        return [r for r in self.rules if r.table == table]


# fields each rule kind needs, and may have
RULE_FIELDS: dict[str, tuple[set[str], set[str]]] = {
    "iccc3_classifiable": (set(), set()),
    "stage_in_system": (set(), set()),
    "only_if": ({"column", "when_column", "when_values"}, set()),
    "foreign_key": ({"column", "ref_table", "ref_column"}, set()),
    "not_before": (
        {"column", "key", "ref_table", "ref_key", "ref_column"},
        {"aggregate", "tolerance_days"},
    ),
    "year_matches_age": (
        {"column", "age_column", "key", "ref_table", "ref_key", "ref_column"},
        set(),
    ),
    "not_after": (
        {"column", "key", "ref_table", "ref_key", "ref_column"},
        {"aggregate", "tolerance_days", "via_table", "via_key", "via_to"},
    ),
}


def _cross_check(d: DataDictionary) -> list[str]:
    problems = []
    ids = [r.id for r in d.rules]
    for dup in sorted({i for i in ids if ids.count(i) > 1}):
        problems.append(f"rule {dup}: declared more than once")
    for r in d.rules:
        needed, optional = RULE_FIELDS[r.kind]
        given = set(r.model_extra or {})
        if needed - given:
            problems.append(f"rule {r.id}: {r.kind} needs {', '.join(sorted(needed - given))}")
        if given - needed - optional:
            problems.append(
                f"rule {r.id}: unknown field(s) {', '.join(sorted(given - needed - optional))}"
            )
        if r.get("aggregate", "min") not in ("min", "max"):
            problems.append(f"rule {r.id}: aggregate must be min or max")
        if r.table not in d.tables:
            problems.append(f"rule {r.id}: unknown table {r.table!r}")
            continue
        cols = d.tables[r.table].columns
        for key in ("column", "when_column", "key", "age_column"):
            name = r.get(key)
            if name is not None and name not in cols:
                problems.append(f"rule {r.id}: {key} {name!r} is not a column of {r.table}")
        via = r.get("via_table")
        if via is not None:
            if via not in d.tables:
                problems.append(f"rule {r.id}: unknown via_table {via!r}")
            else:
                for key in ("via_key", "via_to"):
                    if r.get(key) not in d.tables[via].columns:
                        problems.append(f"rule {r.id}: {key} is not a column of {via}")
        ref = r.get("ref_table")
        if ref is not None:
            if ref not in d.tables:
                problems.append(f"rule {r.id}: unknown ref_table {ref!r}")
            else:
                for key in ("ref_column", "ref_key"):
                    name = r.get(key)
                    if name is not None and name not in d.tables[ref].columns:
                        problems.append(f"rule {r.id}: {key} {name!r} is not a column of {ref}")
    for t in d.tables.values():
        for c in t.unique_together or []:
            if c not in t.columns:
                problems.append(f"table {t.name}: unique_together column {c!r} is unknown")
        for c in t.columns.values():
            try:
                c.code_map()
            except ValueError as exc:
                problems.append(f"{t.name}.{c.name}: {exc}")
            if c.harmonise and c.harmonise.behaviour_column:
                if c.harmonise.behaviour_column not in t.columns:
                    problems.append(f"{t.name}.{c.name}: unknown behaviour_column")
    return problems


_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_dictionary(path: Path = DICTIONARY_FILE) -> DataDictionary:
    """Load and check the data dictionary; raise DictionaryError naming each problem."""
    try:
        # libyaml's safe loader when present: same safe subset, ~10x less CPU per ingest
        raw = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_YAML_LOADER)  # noqa: S506
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise DictionaryError(f"{path}: cannot read: {exc}") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("tables"), dict):
        raise DictionaryError(f"{path}: must be a mapping with a 'tables' mapping")
    for tname, t in raw["tables"].items():
        if isinstance(t, dict):
            t["name"] = tname
            for cname, c in (t.get("columns") or {}).items():
                if isinstance(c, dict):
                    c["name"] = cname
    try:
        d = DataDictionary.model_validate(raw)
    except ValidationError as exc:
        msgs = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise DictionaryError(f"{path}:\n" + "\n".join(msgs)) from exc
    problems = _cross_check(d)
    if problems:
        raise DictionaryError(f"{path}:\n" + "\n".join(problems))
    return d


@dataclass
class ValidationResult:
    """``valid``: harmonised, typed rows without any error, with ``_row`` (1-based source row).

    ``errors``: one row per problem (row, column, value, rule, message).
    ``harmonised``: every row, harmonised (invalid values null), with ``_row``; used by the
    cross-table rules.
    """

    table: str
    valid: pl.DataFrame
    errors: pl.DataFrame
    harmonised: pl.DataFrame = field(repr=False)

    @property
    def ok(self) -> bool:
        return self.errors.height == 0

    @property
    def error_rows(self) -> set[int]:
        return set(self.errors["row"].to_list())


def _orig(name: str) -> str:
    return f"__orig_{name}"


def _present(name: str) -> str:
    return f"__present_{name}"


def _int(name: str) -> str:
    return f"__int_{name}"


def _as_text(name: str) -> pl.Expr:
    """The delivered value as stripped text, empty -> null."""
    s = pl.col(_orig(name)).cast(pl.String).str.strip_chars()
    return pl.when(s == "").then(None).otherwise(s)


def _as_int(name: str, dtype: pl.DataType) -> pl.Expr:
    if dtype.is_integer():
        return pl.col(_orig(name)).cast(pl.Int64)
    # text or float: accept '12', ' 12 ', '12.0'; reject '12.5', 'abc'
    f = (
        _as_text(name).cast(pl.Float64, strict=False)
        if not dtype.is_float()
        else pl.col(_orig(name))
    )
    return pl.when(f == f.floor()).then(f).otherwise(None).cast(pl.Int64, strict=False)


@dataclass
class _Check:
    column: str
    rule: str
    mask: pl.Expr  # true = this row breaks the rule
    message: str
    value: pl.Expr | None = None  # what to report; default: the delivered value


def _column_checks(
    spec: ColumnSpec, dtype: pl.DataType
) -> tuple[list[tuple[str, pl.Expr]], list[_Check]]:
    """Harmonising expressions (name, expr) and the checks for one delivered column."""
    n = spec.name
    present = pl.col(_present(n))
    exprs: list[tuple[str, pl.Expr]] = [(_present(n), _as_text(n).is_not_null())]
    checks: list[_Check] = []
    if spec.type == "string":
        exprs.append((n, _as_text(n)))
    elif spec.type == "int":
        exprs.append((n, _as_int(n, dtype)))
        checks.append(
            _Check(n, "type", present & pl.col(n).is_null(), f"{n} must be a whole number")
        )
    elif spec.type == "code":
        mapping = spec.code_map()
        h = (
            _as_text(n)
            .str.to_lowercase()
            .replace_strict(mapping, default=None, return_dtype=pl.String)
        )
        exprs.append((n, h))
        shown = ", ".join(spec.codes or [])
        checks.append(
            _Check(n, "code_list", present & pl.col(n).is_null(), f"{n} must be one of: {shown}")
        )
    elif spec.type == "icdo3_morphology":
        assert spec.harmonise is not None
        parts = _as_text(n).str.to_uppercase().str.extract_groups(spec.harmonise.regex)
        exprs.append((n, parts.struct.field("1").cast(pl.Int64, strict=False)))
        exprs.append((f"__beh_from_{n}", parts.struct.field("2")))
        checks.append(
            _Check(
                n,
                "format",
                present & pl.col(n).is_null(),
                f"{n} must be an ICD-O-3 morphology such as 8960 or 8960/3",
            )
        )
    elif spec.type == "icdo3_topography":
        assert spec.harmonise is not None and spec.harmonise.template is not None
        parts = _as_text(n).str.to_uppercase().str.extract_groups(spec.harmonise.regex)
        pieces: list[pl.Expr] = []
        template = spec.harmonise.template
        # template like 'C{1}.{2}': literal text and numbered regex groups
        for lit, grp in re.findall(r"([^{]*)(?:\{(\d+)\})?", template):
            if lit:
                pieces.append(pl.lit(lit))
            if grp:
                pieces.append(parts.struct.field(grp))
        exprs.append((n, pl.concat_str(pieces)))
        exprs.append((_int(n), iccc3.topography_to_int(pl.concat_str(pieces))))
        checks.append(
            _Check(
                n,
                "format",
                present & pl.col(n).is_null(),
                f"{n} must be an ICD-O-3 topography such as C64.9",
            )
        )
    if spec.required:
        checks.append(_Check(n, "required", ~present, f"{n} is required"))
    if spec.min is not None or spec.max is not None:
        v = pl.col(n)
        if spec.type == "icdo3_topography":
            v = pl.col(_int(n))
        lo = spec.min if spec.min is not None else -(2**62)
        hi = spec.max if spec.max is not None else 2**62
        checks.append(
            _Check(
                n,
                "range",
                v.is_not_null() & ~v.is_between(lo, hi),
                f"{n} must be between {spec.min} and {spec.max}",
            )
        )
    if spec.unique:
        checks.append(
            _Check(
                n,
                "duplicate",
                pl.col(n).is_not_null() & pl.col(_repeat([n])),
                f"{n} appears more than once (the first occurrence is kept)",
            )
        )
    return exprs, checks


def _lookup_rows(values: pl.Series, lookup: pl.DataFrame) -> pl.DataFrame:
    """The ``lookup`` row of each value (``lookup``: one row per distinct value, key column
    first), in the order of ``values``, without the key column.

    Joined on a 64-bit hash of the value when the distinct values' hashes are distinct (then
    the hash identifies the value exactly): an integer join costs less than a string join, and
    joining only the key (then ``hstack``) avoids copying the whole wide table once per column.
    """
    key = lookup.columns[0]
    hashes = lookup.get_column(key).hash()
    if hashes.n_unique() == lookup.height:
        right = lookup.drop(key).with_columns(hashes.alias("__h"))
        left = values.hash().alias("__h").to_frame()
        return left.join(right, on="__h", how="left", maintain_order="left").drop("__h")
    left = values.alias(key).to_frame()
    return left.join(lookup, on=key, how="left", maintain_order="left", nulls_equal=True).drop(key)


def _repeat(key: list[str]) -> str:
    return "__repeat_" + "_".join(key)


def _repeats(frame: pl.DataFrame, key: list[str]) -> pl.Series:
    """For each row, whether an earlier row has the same values of ``key`` (what
    ``~is_first_distinct()`` says), found through a 64-bit hash of the values.

    Only rows whose hash recurs are compared by their values: a row whose hash is unique has a
    unique key, and every earlier row with the same key has the same hash, so a hash collision
    cannot change the answer. Hashing costs a fraction of a distinct-test on strings or structs
    (measured per 1.66 M-row batch: see docs/benchmarks.md).
    """
    hashes = frame.get_column(key[0]).hash() if len(key) == 1 else frame.select(key).hash_rows()
    out = pl.repeat(False, frame.height, dtype=pl.Boolean, eager=True)
    if hashes.n_unique() == frame.height:  # the usual case: no key recurs
        return out
    idx = hashes.is_duplicated().arg_true()
    values = pl.col(key[0]) if len(key) == 1 else pl.struct(key)
    later = frame.select(key).gather(idx).select(~values.is_first_distinct()).to_series()
    return out.scatter(idx, later)


def _join_one_per_key(child: pl.DataFrame, ref: pl.DataFrame, key: str) -> pl.DataFrame:
    """``child.join(ref, on=key)`` (null keys match nothing), for a ``ref`` with one row per key.

    Joined on a 64-bit hash of the key when the reference keys' hashes are distinct: an
    integer join costs about half a string join. Every joined row is then checked to carry the
    same non-null key on both sides (a child key whose hash equals another reference key's
    would not); if one does not, the join is done again on the keys themselves.
    """
    ref_hash = ref.get_column(key).hash()
    if child.schema[key] == ref.schema[key] and ref_hash.n_unique() == ref.height:
        joined = child.with_columns(child.get_column(key).hash().alias("__h")).join(
            ref.rename({key: "__ref_key"}).with_columns(ref_hash.alias("__h")),
            on="__h",
            how="inner",
        )
        if joined.select((pl.col(key) == pl.col("__ref_key")).fill_null(False).all()).item():
            return joined.drop("__h", "__ref_key")
    return child.join(ref, on=key, how="inner")


def _empty_errors() -> pl.DataFrame:
    return pl.DataFrame(schema=ERROR_SCHEMA)


def _collect_errors(frame: pl.DataFrame, checks: list[_Check]) -> pl.DataFrame:
    """Evaluate all masks in one pass, then gather only the offending rows of each check."""
    if not checks or frame.height == 0:
        return _empty_errors()
    flags = [f"__err{i}" for i in range(len(checks))]
    # one pass computes every mask; only rows with some error go on to the per-check gathers
    masked = frame.with_columns(
        [c.mask.fill_null(False).alias(f) for f, c in zip(flags, checks, strict=True)]
    ).filter(pl.any_horizontal(flags))
    parts = []
    for i, c in enumerate(checks):
        hit = masked.filter(pl.col(f"__err{i}"))
        if hit.height == 0:
            continue
        value = (
            c.value
            if c.value is not None
            else (
                pl.col(_orig(c.column)).cast(pl.String)
                if _orig(c.column) in hit.columns
                else pl.col(c.column).cast(pl.String)
            )
        )
        parts.append(
            hit.select(
                pl.col(ROW).cast(pl.Int64).alias("row"),
                pl.lit(c.column).alias("column"),
                value.alias("value"),
                pl.lit(c.rule).alias("rule"),
                pl.lit(c.message).alias("message"),
            )
        )
    return pl.concat(parts) if parts else _empty_errors()


def _finish(
    table: str, spec: TableSpec, harmonised: pl.DataFrame, errors: pl.DataFrame
) -> ValidationResult:
    if errors.height == 0:
        return ValidationResult(table=table, valid=harmonised, errors=errors, harmonised=harmonised)
    errors = errors.sort(["row", "column", "rule"])
    bad = errors.select(pl.col("row").unique())
    valid = harmonised.join(bad, left_on=ROW, right_on="row", how="anti", maintain_order="left")
    return ValidationResult(table=table, valid=valid, errors=errors, harmonised=harmonised)


def harmonise_and_validate(
    dictionary: DataDictionary, table: str, df: pl.DataFrame
) -> ValidationResult:
    """Harmonise one delivered table and check its per-table rules (see module docstring).

    Raises DeliveryError when a required column is missing or an unknown column is delivered
    (an unexpected column may hold identifying data that must not enter the pool).
    """
    spec = dictionary.table(table)
    delivered = dictionary.delivered_columns(table)
    given = [c for c in df.columns if c != ROW]
    # a behaviour column may be left out when the morphology carries it ('8960/3')
    derivable = {
        c.harmonise.behaviour_column
        for c in spec.columns.values()
        if c.harmonise and c.harmonise.behaviour_column and c.name in given
    }
    missing = [
        c for c in dictionary.required_columns(table) if c not in given and c not in derivable
    ]
    pooled = set(dictionary.pooled_columns(table))
    derived = [c for c in given if c not in delivered and c in pooled]
    unknown = [c for c in given if c not in delivered and c not in pooled]
    if missing or unknown or derived:
        parts = []
        if missing:
            parts.append(f"missing required column(s): {', '.join(missing)}")
        if unknown:
            parts.append(f"unknown column(s): {', '.join(unknown)}")
        if derived:
            parts.append(f"column(s) {', '.join(derived)} are set by the pool, not delivered")
        raise DeliveryError(f"{table}: " + "; ".join(parts))
    if ROW in df.columns and not df.schema[ROW].is_integer():
        raise DeliveryError(f"{table}: column {ROW} must hold integer source row numbers")

    nested = [
        c for c in given if df.schema[c].is_nested() or df.schema[c] in (pl.Binary, pl.Object)
    ]
    if nested:
        raise DeliveryError(
            f"{table}: column(s) {', '.join(nested)} hold nested or binary values, "
            "not text or numbers"
        )
    row = pl.col(ROW) if ROW in df.columns else pl.int_range(1, pl.len() + 1, dtype=pl.Int64)
    work = df.select(
        [row.cast(pl.Int64).alias(ROW)]
        + [
            (pl.col(c) if c in df.columns else pl.lit(None, dtype=pl.String)).alias(_orig(c))
            for c in delivered
        ]
    )
    exprs: list[pl.Expr] = []
    checks: list[_Check] = []
    for name in delivered:
        col = spec.columns[name]
        e, c = _column_checks(col, work.schema[_orig(name)])
        checks += c
        if not col.identifier and work.schema[_orig(name)] == pl.String:
            # Text columns other than ids repeat few distinct values: harmonise each distinct
            # value once (regexes, code maps) and join the answers back onto the rows.
            o = _orig(name)
            lookup = work.select(pl.col(o).unique()).with_columns(x.alias(a) for a, x in e)
            work = work.hstack(_lookup_rows(work.get_column(o), lookup))
        else:
            exprs += [x.alias(alias) for alias, x in e]
    work = work.with_columns(exprs)
    # Behaviour given inside the morphology ('8960/3') fills or must agree with the column.
    for name in delivered:
        col = spec.columns[name]
        if col.harmonise and col.harmonise.behaviour_column:
            beh = col.harmonise.behaviour_column
            from_morph = pl.col(f"__beh_from_{name}")
            checks.append(
                _Check(
                    beh,
                    "behaviour_conflict",
                    from_morph.is_not_null()
                    & pl.col(beh).is_not_null()
                    & (pl.col(beh).cast(pl.String) != from_morph),
                    f"{beh} disagrees with the behaviour written in {name}",
                )
            )
    work = _harmonise_behaviour(spec, work)
    work = work.with_columns(
        pl.col(n).cast(pl.Int64)
        for n in delivered
        if spec.columns[n].store_as == "int" and spec.columns[n].type == "code"
    )
    # unique keys over several columns
    if spec.unique_together:
        key = spec.unique_together
        checks.append(
            _Check(
                key[0],
                "duplicate",
                pl.all_horizontal([pl.col(k).is_not_null() for k in key]) & pl.col(_repeat(key)),
                f"({', '.join(key)}) appears more than once (the first occurrence is kept)",
            )
        )
    work, rule_checks = _table_rules(dictionary, table, work)
    keys = [[n] for n in delivered if spec.columns[n].unique] + [spec.unique_together or []]
    work = work.with_columns(_repeats(work, k).alias(_repeat(k)) for k in keys if k)
    errors = _collect_errors(work, checks + rule_checks)
    out_cols = [ROW] + [c for c in spec.columns if c in work.columns]
    return _finish(table, spec, work.select(out_cols), errors)


def _harmonise_behaviour(spec: TableSpec, work: pl.DataFrame) -> pl.DataFrame:
    for name, col in spec.columns.items():
        if (
            col.harmonise
            and col.harmonise.behaviour_column
            and f"__beh_from_{name}" in work.columns
        ):
            beh = col.harmonise.behaviour_column
            bspec = spec.columns[beh]
            from_morph = pl.col(f"__beh_from_{name}")
            codes = set(bspec.codes or [])
            fill = pl.when(from_morph.is_in(list(codes))).then(from_morph).otherwise(None)
            work = work.with_columns(
                pl.coalesce(pl.col(beh).cast(pl.String), fill).alias(beh),
                # a behaviour only given inside the morphology satisfies 'required'
                pl.coalesce(_as_text(beh), from_morph).alias(_orig(beh)),
                (pl.col(_present(beh)) | from_morph.is_not_null()).alias(_present(beh)),
            )
    return work


def _table_rules(
    dictionary: DataDictionary, table: str, work: pl.DataFrame
) -> tuple[pl.DataFrame, list[_Check]]:
    spec = dictionary.table(table)
    checks: list[_Check] = []
    for r in dictionary.rules_for(table):
        if r.kind == "iccc3_classifiable":
            work = iccc3.recode(
                work, "icdo3_morphology", "icdo3_behaviour", "icdo3_topography", extended=True
            )
            known = (
                pl.col("icdo3_morphology").is_between(
                    spec.columns["icdo3_morphology"].min or 0,
                    spec.columns["icdo3_morphology"].max or 9999,
                )
                & pl.col("icdo3_behaviour").is_not_null()
                & pl.col("icdo3_topography").is_not_null()
            )
            checks.append(
                _Check(
                    "icdo3_morphology",
                    r.id,
                    known & pl.col("iccc3_subgroup").is_null(),
                    "morphology/behaviour/topography has no ICCC-3 group (not a childhood "
                    "cancer the pool accepts, or a miscoded site)",
                    value=pl.concat_str(
                        [
                            pl.col("icdo3_morphology").cast(pl.String),
                            pl.lit("/"),
                            pl.col("icdo3_behaviour").cast(pl.String),
                            pl.lit(" "),
                            pl.col("icdo3_topography"),
                        ]
                    ),
                )
            )
        elif r.kind == "stage_in_system":
            values = spec.stage_values or {}
            pairs = pl.DataFrame(
                [(s, v.upper(), v) for s, vs in values.items() for v in vs],
                schema={
                    "stage_system": pl.String,
                    "__stage_ok": pl.String,
                    "__stage_canonical": pl.String,
                },
                orient="row",
            )
            work = work.with_columns(pl.col("stage").str.to_uppercase().alias("__stage_up"))
            ok = work.select("stage_system", "__stage_up").join(
                pairs,
                left_on=["stage_system", "__stage_up"],
                right_on=["stage_system", "__stage_ok"],
                how="left",
                maintain_order="left",
                coalesce=False,
            )
            # a valid stage is stored as the dictionary spells it ('iii' -> 'III', '4s' -> '4S')
            work = work.with_columns(
                ok["__stage_ok"].is_not_null().alias("__stage_valid"),
                pl.coalesce(ok["__stage_canonical"], pl.col("stage")).alias("stage"),
            )
            checks.append(
                _Check(
                    "stage",
                    r.id,
                    pl.col("stage").is_not_null()
                    & pl.col("stage_system").is_not_null()
                    & ~pl.col("__stage_valid"),
                    "stage is not a value of the given stage_system",
                )
            )
            checks.append(
                _Check(
                    "stage",
                    r.id,
                    pl.col("stage").is_not_null() & pl.col("stage_system").is_null(),
                    "stage given without stage_system",
                )
            )
        elif r.kind == "only_if":
            c, w = r.get("column"), r.get("when_column")
            checks.append(
                _Check(
                    c,
                    r.id,
                    pl.col(c).is_not_null()
                    & ~pl.col(w).is_in(r.get("when_values")).fill_null(False),
                    f"{c} is only allowed when {w} is {', '.join(r.get('when_values'))}",
                )
            )
    return work, checks


def validate_batch(
    dictionary: DataDictionary, tables: dict[str, pl.DataFrame]
) -> dict[str, ValidationResult]:
    """Per-table and cross-table checks for one site's delivery; a table not delivered is empty.

    Cross-table rules compare against reference rows that passed their own checks, so one bad
    row is reported once, where it is, and not again in every row that refers to it.
    """
    unknown = [t for t in tables if t not in dictionary.tables]
    if unknown:
        raise DeliveryError(f"unknown table(s): {', '.join(unknown)}")
    results: dict[str, ValidationResult] = {}
    for name in dictionary.tables:
        df = tables.get(name)
        if df is None:
            df = pl.DataFrame(schema={c: pl.String for c in dictionary.delivered_columns(name)})
        results[name] = harmonise_and_validate(dictionary, name, df)
    # rows already known bad, per table (narrow frames: joins below carry only what they need)
    bad_rows = {n: r.errors.select(pl.col("row").unique()) for n, r in results.items()}
    extra: dict[str, list[pl.DataFrame]] = {n: [] for n in dictionary.tables}
    # foreign keys first: a row without its parent is no reference for the rules after it
    # phases: rows found bad in one phase are no reference for the next (an orphan tumour is
    # no diagnosis to compare events with; a last contact before diagnosis is no bound)
    phases = [("foreign_key",), ("not_before", "year_matches_age"), ("not_after",)]
    cross = [(k, r) for k, kinds in enumerate(phases) for r in dictionary.rules if r.kind in kinds]
    ref_cache: dict[tuple, pl.DataFrame] = {}
    for i, (phase, r) in enumerate(cross):
        if i > 0 and phase != cross[i - 1][0]:
            ref_cache.clear()
            for n, parts in extra.items():
                if parts:
                    bad_rows[n] = pl.concat(
                        [bad_rows[n], *[p.select("row") for p in parts]]
                    ).unique()
        ref_table = r.get("ref_table")
        if r.kind == "not_after":
            hit, c, value, msg = _not_after(dictionary, r, results, bad_rows, ref_cache)
        elif r.kind == "foreign_key":
            c, rc = r.get("column"), r.get("ref_column")
            keys = results[ref_table].harmonised.select(pl.col(rc).alias(c)).drop_nulls()
            child = results[r.table].harmonised.select(ROW, c)
            hit = child.filter(pl.col(c).is_not_null()).join(keys, on=c, how="anti")
            msg = f"{c} does not exist in {ref_table}.{rc}"
            value = pl.col(c)
        else:
            key, ref_key, rc = r.get("key"), r.get("ref_key"), r.get("ref_column")
            c = r.get("column")
            aggregate = r.get("aggregate", "min")
            agg = {"min": pl.min, "max": pl.max}[aggregate]
            cache_key = (ref_table, ref_key, rc, aggregate)
            if cache_key not in ref_cache:  # treatment and event share the tumour reference
                ref = (
                    results[ref_table]
                    .harmonised.select(ROW, ref_key, rc)
                    .join(bad_rows[ref_table], left_on=ROW, right_on="row", how="anti")
                    .filter(pl.col(ref_key).is_not_null() & pl.col(rc).is_not_null())
                )
                if dictionary.table(ref_table).columns[ref_key].unique:
                    # duplicates are already bad rows: one reference row per key, no grouping
                    ref_cache[cache_key] = ref.select(ref_key, pl.col(rc).alias("__ref"))
                else:
                    ref_cache[cache_key] = ref.group_by(ref_key).agg(agg(rc).alias("__ref"))
            ref = ref_cache[cache_key].rename({ref_key: key})
            needed = [ROW, key, c] + ([r.get("age_column")] if r.get("age_column") else [])
            child = results[r.table].harmonised.select(list(dict.fromkeys(needed)))
            joined = _join_one_per_key(child, ref, key)
            if r.kind == "not_before":
                tol = int(r.get("tolerance_days", 0))
                hit = joined.filter(pl.col(c) < pl.col("__ref") - tol)
                msg = f"{c} is before {ref_table}.{rc}"
                if tol:
                    msg += f" by more than {tol} days"
                value = pl.concat_str(
                    [pl.col(c).cast(pl.String), pl.lit(" < "), pl.col("__ref").cast(pl.String)]
                )
            else:  # year_matches_age: ref_column is a year, column a year, age_column days
                age = pl.col(r.get("age_column")) / 365.25
                diff = pl.col(c) - pl.col("__ref")
                hit = joined.filter(
                    pl.col(c).is_not_null()
                    & pl.col(r.get("age_column")).is_not_null()
                    & ((diff < age - 1) | (diff > age + 1))
                )
                msg = f"{c} minus {ref_table}.{rc} does not agree with {r.get('age_column')}"
                value = pl.concat_str(
                    [pl.col(c).cast(pl.String), pl.lit(" - "), pl.col("__ref").cast(pl.String)]
                )
        if hit.height:
            extra[r.table].append(
                hit.select(
                    pl.col(ROW).cast(pl.Int64).alias("row"),
                    pl.lit(c).alias("column"),
                    value.cast(pl.String).alias("value"),
                    pl.lit(r.id).alias("rule"),
                    pl.lit(msg).alias("message"),
                )
            )
    for name, parts in extra.items():
        if parts:
            res = results[name]
            errors = pl.concat([res.errors, *parts])
            results[name] = _finish(name, dictionary.table(name), res.harmonised, errors)
    return results


def _valid_part(
    results: dict[str, ValidationResult], bad_rows: dict[str, pl.DataFrame], table: str, cols: list
) -> pl.DataFrame:
    return (
        results[table]
        .harmonised.select(ROW, *cols)
        .join(bad_rows[table], left_on=ROW, right_on="row", how="anti")
        .drop_nulls(cols)
    )


def _not_after(
    dictionary: DataDictionary,
    r: RuleSpec,
    results: dict[str, ValidationResult],
    bad_rows: dict[str, pl.DataFrame],
    cache: dict[tuple, pl.DataFrame],
) -> tuple[pl.DataFrame, str, pl.Expr, str]:
    """Rows whose value is after the reference (e.g. an event after the last contact), with an
    optional hop through a ``via_table`` (event -> tumour -> patient)."""
    c, key, tol = r.get("column"), r.get("key"), int(r.get("tolerance_days", 0))
    ref_table, ref_key, rc = r.get("ref_table"), r.get("ref_key"), r.get("ref_column")
    aggregate = r.get("aggregate", "max")
    via_table, via_key, via_to = r.get("via_table"), r.get("via_key"), r.get("via_to")
    cache_key = ("not_after", ref_table, ref_key, rc, aggregate, via_table, via_key, via_to)
    if cache_key not in cache:  # the event and treatment rules share one bound per tumour
        ref = _valid_part(results, bad_rows, ref_table, [ref_key, rc])
        if dictionary.table(ref_table).columns[ref_key].unique:
            ref = ref.select(ref_key, pl.col(rc).alias("__ref"))
        else:
            agg = {"min": pl.min, "max": pl.max}[aggregate]
            ref = ref.group_by(ref_key).agg(agg(rc).alias("__ref"))
        if via_table:
            via = _valid_part(results, bad_rows, via_table, [via_key, via_to])
            ref = _join_one_per_key(
                via.select(via_key, pl.col(via_to).alias(ref_key)), ref, ref_key
            )
            ref = ref.select(pl.col(via_key).alias("__link"), "__ref")
        else:
            ref = ref.select(pl.col(ref_key).alias("__link"), "__ref")
        cache[cache_key] = ref
    child = results[r.table].harmonised.select(ROW, pl.col(key).alias("__link"), c)
    hit = _join_one_per_key(child, cache[cache_key], "__link").filter(
        pl.col(c) > pl.col("__ref") + tol
    )
    value = pl.concat_str(
        [pl.col(c).cast(pl.String), pl.lit(" > "), pl.col("__ref").cast(pl.String)]
    )
    return hit, c, value, f"{c} is after {ref_table}.{rc}"


def errors_of(results: dict[str, ValidationResult]) -> pl.DataFrame:
    """All errors of a batch in one frame, with a ``table`` column first."""
    parts = [r.errors.select(pl.lit(t).alias("table"), pl.all()) for t, r in results.items()]
    return (
        pl.concat(parts) if parts else _empty_errors().select(pl.lit("").alias("table"), pl.all())
    )

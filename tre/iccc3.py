"""ICD-O-3 -> ICCC-3 recoder (main groups and subgroups).

The classification itself is data: ``policies/iccc3/recode.csv``, one row per line of the SEER
"Site/histology recode based on ICCC-3 based on ICD-O-3, Main Classification Table" (recodes
011-122), with morphology codes/ranges, topography ranges and the behaviours a row applies to.
Loading expands it into (morphology, behaviour, topography interval) rules and refuses a table
in which two rows claim the same code combination, so the recode is a function.

Recoding is a vectorised equi-join on (morphology, behaviour) followed by a topography interval
filter (polars), never a per-row Python loop: it handles millions of rows per second.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import polars as pl

RECODE_FILE = Path(__file__).resolve().parent.parent / "policies" / "iccc3" / "recode.csv"
EXTENDED_FILE = RECODE_FILE.with_name("extended.csv")
MAIN_GROUPS = ("I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX", "X", "XI", "XII")

_MORPH_ITEM = re.compile(r"^(\d{4})(?:-(\d{4}))?$")
_TOPO_ITEM = re.compile(r"^C(\d{3})(?:-C(\d{3}))?$")


class RecodeTableError(ValueError):
    """The recode table is malformed or ambiguous; the message names the line."""


@dataclass(frozen=True)
class RecodeTable:
    rules: pl.DataFrame  # morphology, behaviour, topo_lo, topo_hi, recode, group, subgroup, label
    subgroups: pl.DataFrame  # recode, group, subgroup, label (one row per subgroup)


def topography_to_int(expr: pl.Expr) -> pl.Expr:
    """'C64.9' / 'C649' / 'c64.9' -> 649; anything else -> null."""
    digits = (
        expr.cast(pl.String)
        .str.strip_chars()
        .str.to_uppercase()
        .str.extract(r"^C(\d{2})\.?(\d)$", 0)
        .str.replace_all(r"[^0-9]", "")
    )
    return digits.cast(pl.Int32, strict=False)


def _parse_items(
    text: str, pattern: re.Pattern[str], what: str, line: int
) -> list[tuple[int, int]]:
    items = []
    for token in text.split():
        m = pattern.match(token)
        if not m:
            raise RecodeTableError(f"line {line}: {token!r} is not a valid {what} item")
        lo = int(m.group(1))
        hi = int(m.group(2) or m.group(1))
        if hi < lo:
            raise RecodeTableError(f"line {line}: {what} range {token!r} is reversed")
        items.append((lo, hi))
    if not items:
        raise RecodeTableError(f"line {line}: no {what} given")
    return items


def load_recode_table(path: Path = RECODE_FILE) -> RecodeTable:
    """Parse and check the recode table; raise RecodeTableError naming the offending line."""
    raw = pl.read_csv(path, infer_schema=False)
    expected = ["recode", "group", "subgroup", "label", "morphology", "topography", "behaviour"]
    if raw.columns != expected:
        raise RecodeTableError(f"{path}: columns must be {expected}, found {raw.columns}")
    rows: list[dict] = []
    for line, rec in enumerate(raw.iter_rows(named=True), start=2):  # small table: loop is fine
        if rec["group"] not in MAIN_GROUPS or not str(rec["subgroup"]).startswith(rec["group"]):
            raise RecodeTableError(
                f"line {line}: bad group/subgroup {rec['group']}/{rec['subgroup']}"
            )
        behaviours = [int(b) for b in str(rec["behaviour"]).split()]
        if not behaviours or any(b not in (0, 1, 2, 3) for b in behaviours):
            raise RecodeTableError(f"line {line}: behaviour must list codes among 0 1 2 3")
        morph = _parse_items(rec["morphology"], _MORPH_ITEM, "morphology", line)
        topo = _parse_items(rec["topography"], _TOPO_ITEM, "topography", line)
        for mlo, mhi in morph:
            for m in range(mlo, mhi + 1):
                for b in behaviours:
                    for tlo, thi in topo:
                        rows.append(
                            {
                                "morphology": m,
                                "behaviour": b,
                                "topo_lo": tlo,
                                "topo_hi": thi,
                                "recode": rec["recode"],
                                "group": rec["group"],
                                "subgroup": rec["subgroup"],
                                "label": rec["label"],
                                "line": line,
                            }
                        )
    rules = pl.DataFrame(
        rows,
        schema={
            "morphology": pl.Int32,
            "behaviour": pl.Int8,
            "topo_lo": pl.Int32,
            "topo_hi": pl.Int32,
            "recode": pl.String,
            "group": pl.String,
            "subgroup": pl.String,
            "label": pl.String,
            "line": pl.Int32,
        },
    )
    # Ambiguity check: two rules for the same morphology/behaviour whose topography intervals
    # overlap would make the recode depend on row order.
    pairs = rules.join(rules, on=["morphology", "behaviour"], suffix="_b").filter(
        (pl.col("line") < pl.col("line_b"))
        & (pl.col("topo_lo") <= pl.col("topo_hi_b"))
        & (pl.col("topo_lo_b") <= pl.col("topo_hi"))
    )
    if pairs.height:
        p = pairs.row(0, named=True)
        raise RecodeTableError(
            f"lines {p['line']} and {p['line_b']} both classify morphology {p['morphology']}/"
            f"{p['behaviour']} at overlapping topographies"
        )
    subgroups = raw.select("recode", "group", "subgroup", "label").unique(
        subset="subgroup", keep="first", maintain_order=True
    )
    if subgroups.select(pl.col("recode").n_unique()).item() != subgroups.height:
        raise RecodeTableError("each subgroup must have exactly one recode")
    return RecodeTable(rules=rules.drop("line"), subgroups=subgroups)


def load_extended_table(path: Path = EXTENDED_FILE, main: Path = RECODE_FILE) -> pl.DataFrame:
    """Divisions of the Extended Classification within main subgroups (e.g. IIIc.1).

    A division applies to tumours the main table puts in its subgroup, by morphology and
    topography. Refuses unknown subgroups, divisions not named after their subgroup and
    overlapping divisions.
    """
    raw = pl.read_csv(path, infer_schema=False)
    expected = ["subgroup", "division", "label", "morphology", "topography"]
    if raw.columns != expected:
        raise RecodeTableError(f"{path}: columns must be {expected}, found {raw.columns}")
    known = set(_cached_table(Path(main)).subgroups["subgroup"])
    rows = []
    for line, rec in enumerate(raw.iter_rows(named=True), start=2):  # small table
        if rec["subgroup"] not in known:
            raise RecodeTableError(f"line {line}: unknown subgroup {rec['subgroup']!r}")
        if not str(rec["division"]).startswith(rec["subgroup"] + "."):
            raise RecodeTableError(f"line {line}: division must be <subgroup>.<n>")
        for mlo, mhi in _parse_items(rec["morphology"], _MORPH_ITEM, "morphology", line):
            for tlo, thi in _parse_items(rec["topography"], _TOPO_ITEM, "topography", line):
                rows.append((rec["subgroup"], mlo, mhi, tlo, thi, rec["division"], line))
    rules = pl.DataFrame(
        rows,
        schema={
            "subgroup": pl.String,
            "m_lo": pl.Int32,
            "m_hi": pl.Int32,
            "topo_lo": pl.Int32,
            "topo_hi": pl.Int32,
            "division": pl.String,
            "line": pl.Int32,
        },
        orient="row",
    )
    pairs = rules.join(rules, on="subgroup", suffix="_b").filter(
        (pl.col("line") < pl.col("line_b"))
        & (pl.col("m_lo") <= pl.col("m_hi_b"))
        & (pl.col("m_lo_b") <= pl.col("m_hi"))
        & (pl.col("topo_lo") <= pl.col("topo_hi_b"))
        & (pl.col("topo_lo_b") <= pl.col("topo_hi"))
    )
    if pairs.height:
        p = pairs.row(0, named=True)
        raise RecodeTableError(f"lines {p['line']} and {p['line_b']} overlap in {p['subgroup']}")
    return rules.drop("line")


@lru_cache(maxsize=4)
def _cached_table(path: Path) -> RecodeTable:
    return load_recode_table(path)


@lru_cache(maxsize=4)
def _cached_extended(path: Path, main: Path) -> pl.DataFrame:
    return load_extended_table(path, main)


def recode(
    df: pl.DataFrame,
    morphology_col: str = "icdo3_morphology",
    behaviour_col: str = "icdo3_behaviour",
    topography_col: str = "icdo3_topography",
    *,
    extended: bool = False,
    table_path: Path = RECODE_FILE,
    extended_path: Path = EXTENDED_FILE,
) -> pl.DataFrame:
    """Return ``df`` with ``iccc3_group`` and ``iccc3_subgroup`` added (null if unclassifiable).

    Morphology is the 4-digit histology (int or string), behaviour the ICD-O-3 behaviour digit,
    topography 'C64.9' or 'C649'. Row order and all other columns are preserved. With
    ``extended=True`` also ``iccc3_division`` (Extended Classification; a subgroup without
    divisions is its own division).
    """
    rules = _cached_table(Path(table_path)).rules
    m, b, t = "_iccc3_m", "_iccc3_b", "_iccc3_t"
    keys = df.select(
        pl.col(morphology_col).cast(pl.Int32, strict=False).alias(m),
        pl.col(behaviour_col).cast(pl.Int8, strict=False).alias(b),
        pl.col(topography_col).cast(pl.String).alias(t),
    )
    # Classify each distinct (morphology, behaviour, topography) once (a few thousand at most),
    # then equi-join the answer back onto every row: much faster than interval-joining each row.
    distinct = keys.unique()
    classified = (
        distinct.with_columns(topography_to_int(pl.col(t)).alias("_topo"))
        .join(rules, left_on=[m, b], right_on=["morphology", "behaviour"], how="inner")
        .filter(pl.col("_topo").is_between(pl.col("topo_lo"), pl.col("topo_hi")))
        .select(
            m,
            b,
            t,
            "_topo",
            pl.col("group").alias("iccc3_group"),
            pl.col("subgroup").alias("iccc3_subgroup"),
        )
    )
    added = ["iccc3_group", "iccc3_subgroup"]
    if extended:
        ext = _cached_extended(Path(extended_path), Path(table_path))
        divided = classified.join(
            ext, left_on="iccc3_subgroup", right_on="subgroup", how="inner"
        ).filter(
            pl.col(m).is_between(pl.col("m_lo"), pl.col("m_hi"))
            & pl.col("_topo").is_between(pl.col("topo_lo"), pl.col("topo_hi"))
        )
        has_divisions = ext["subgroup"].unique().to_list()
        classified = classified.join(
            divided.select(m, b, t, "division"), on=[m, b, t], how="left"
        ).with_columns(
            pl.when(pl.col("iccc3_subgroup").is_in(has_divisions))
            .then(pl.col("division"))
            .otherwise(pl.col("iccc3_subgroup"))
            .alias("iccc3_division")
        )
        added.append("iccc3_division")
    out = df.drop(["iccc3_group", "iccc3_subgroup", "iccc3_division"], strict=False)
    joined = keys.join(
        classified.select(m, b, t, *added), on=[m, b, t], how="left", maintain_order="left"
    )
    return out.with_columns(joined[c] for c in added)


def subgroup_labels(table_path: Path = RECODE_FILE) -> dict[str, str]:
    """Subgroup code ('VIa') -> label, in table order."""
    t = _cached_table(Path(table_path)).subgroups
    return dict(zip(t["subgroup"], t["label"], strict=True))

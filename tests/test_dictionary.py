"""Data dictionary: loading, harmonisation of site spellings, per-table and cross-table rules."""

from __future__ import annotations

import random

import polars as pl
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from tre.dictionary import (
    DICTIONARY_FILE,
    DeliveryError,
    DictionaryError,
    load_dictionary,
    validate_batch,
)
from tre.dictionary import harmonise_and_validate as hv
from tre.registry import CORE_TABLES


@pytest.fixture(scope="module")
def d():
    return load_dictionary()


def patient(**cols):
    base = {"patient_id": ["P1", "P2"], "sex": ["Male", "Female"], "birth_year": ["2010", "2012"]}
    base.update(cols)
    return pl.DataFrame(base)


def tumour(**cols):
    base = {
        "tumour_id": ["T1", "T2"],
        "patient_id": ["P1", "P2"],
        "diagnosis_year": ["2014", "2015"],
        "age_at_diagnosis_days": ["1500", "1100"],
        "icdo3_morphology": ["8960", "9836"],
        "icdo3_behaviour": ["3", "3"],
        "icdo3_topography": ["C64.9", "C42.1"],
    }
    base.update(cols)
    return pl.DataFrame(base)


def rules_of(result, row):
    return set(result.errors.filter(pl.col("row") == row)["rule"])


def test_tables_and_columns(d):
    assert tuple(d.tables) == CORE_TABLES
    assert "iccc3_group" not in d.delivered_columns("tumour")
    pooled = d.pooled_columns("tumour")
    assert {"iccc3_group", "iccc3_subgroup", "site_id", "load_batch", "source_dataset"} <= set(
        pooled
    )
    assert "country" in d.pooled_columns("patient")
    assert "country" not in d.delivered_columns("patient")
    assert d.identifier_columns("treatment") == ["tumour_id"]
    # no calendar date below year precision anywhere: ages are days, dates are years
    for t in d.tables.values():
        for name in t.columns:
            assert "date" not in name
            if name.startswith("age_"):
                assert name.endswith("_days")


def test_harmonises_site_spellings(d):
    df = pl.DataFrame(
        {
            "patient_id": [" A ", "B", "C", "D", "E", "F"],
            "sex": ["M", "1", "girl", " FEMALE ", "w", "Not reported"],
            "birth_year": ["2010", "2011.0", " 2012 ", "2013", "2014", "2015"],
        }
    )
    r = hv(d, "patient", df)
    assert r.ok, r.errors
    assert r.valid["sex"].to_list() == [
        "Male",
        "Male",
        "Female",
        "Female",
        "Female",
        "Not Reported",
    ]
    assert r.valid["patient_id"].to_list() == ["A", "B", "C", "D", "E", "F"]
    assert r.valid["birth_year"].dtype == pl.Int64
    assert r.valid["_row"].to_list() == [1, 2, 3, 4, 5, 6]


def test_icdo3_forms(d):
    df = tumour(
        tumour_id=["T1", "T2", "T3", "T4"],
        patient_id=["P1"] * 4,
        diagnosis_year=["2014"] * 4,
        age_at_diagnosis_days=["1500"] * 4,
        icdo3_morphology=["8960/3", "89603", "M8960/3", "8960"],
        icdo3_behaviour=[None, None, "3", "malignant"],
        icdo3_topography=["C64.9", "C649", "c64.9", " C64.9"],
    )
    r = hv(d, "tumour", df)
    assert r.ok, r.errors
    assert r.valid["icdo3_morphology"].to_list() == [8960] * 4
    assert r.valid["icdo3_behaviour"].to_list() == [3] * 4
    assert r.valid["icdo3_topography"].to_list() == ["C64.9"] * 4
    assert r.valid["iccc3_subgroup"].to_list() == ["VIa"] * 4
    assert r.valid["iccc3_division"].to_list() == ["VIa.1"] * 4


def test_behaviour_column_may_be_omitted_when_the_morphology_carries_it(d):
    df = tumour(icdo3_morphology=["89603", "9836/3"]).drop("icdo3_behaviour")
    r = hv(d, "tumour", df)
    assert r.ok, r.errors
    assert r.valid["icdo3_behaviour"].to_list() == [3, 3]
    # but without a behaviour anywhere the row is incomplete
    r = hv(d, "tumour", tumour(icdo3_morphology=["8960", "9836/3"]).drop("icdo3_behaviour"))
    assert rules_of(r, 1) == {"required"}
    assert r.valid["_row"].to_list() == [2]


def test_behaviour_conflict(d):
    r = hv(d, "tumour", tumour(icdo3_morphology=["8960/3", "9836/3"], icdo3_behaviour=["1", "3"]))
    assert "behaviour_conflict" in rules_of(r, 1)
    assert r.valid["_row"].to_list() == [2]


@pytest.mark.parametrize(
    "column, value, rule",
    [
        ("sex", "X", "code_list"),
        ("sex", "", "required"),
        ("sex", None, "required"),
        ("birth_year", "1850", "range"),
        ("birth_year", "20x0", "type"),
        ("birth_year", "2010.5", "type"),
        ("patient_id", "  ", "required"),
    ],
)
def test_patient_row_errors(d, column, value, rule):
    first = {"patient_id": "P1", "sex": "Male", "birth_year": "2010"}[column]
    df = patient(**{column: [first, value]})
    r = hv(d, "patient", df)
    assert rules_of(r, 2) == {rule}, r.errors
    assert rules_of(r, 1) == set()
    assert r.valid["_row"].to_list() == [1]
    err = r.errors.row(0, named=True)
    assert err["column"] == column and err["message"]


@pytest.mark.parametrize(
    "column, value, rule",
    [
        ("icdo3_morphology", "9999/3", "range"),
        ("icdo3_morphology", "89x0", "format"),
        ("icdo3_topography", "C99.9", "range"),
        ("icdo3_topography", "kidney", "format"),
        ("age_at_diagnosis_days", "-1", "range"),
        ("age_at_diagnosis_days", "7305", "range"),
        ("icdo3_behaviour", "6", "code_list"),
    ],
)
def test_tumour_row_errors(d, column, value, rule):
    df = tumour(**{column: [tumour()[column][0], value]})
    r = hv(d, "tumour", df)
    assert rule in rules_of(r, 2), r.errors
    assert rules_of(r, 1) == set()


def test_unclassifiable_tumour_and_stage_rules(d):
    df = tumour(
        tumour_id=["T1", "T2", "T3", "T4", "T5"],
        patient_id=["P1"] * 5,
        diagnosis_year=["2014"] * 5,
        age_at_diagnosis_days=["1500"] * 5,
        icdo3_morphology=["9380", "9380", "8960", "8960", "8960"],
        icdo3_behaviour=["3"] * 5,
        icdo3_topography=["C34.1", "C72.3", "C64.9", "C64.9", "C64.9"],
        stage_system=[None, None, "NWTS", "INRGSS", None],
        stage=[None, None, "iii", "III", "II"],
    )
    r = hv(d, "tumour", df)
    assert rules_of(r, 1) == {"iccc3_classifiable"}
    assert rules_of(r, 2) == set()
    assert rules_of(r, 3) == set()  # NWTS spelled as a synonym, stage case-insensitive
    assert rules_of(r, 4) == {"stage_in_system"}
    assert rules_of(r, 5) == {"stage_in_system"}  # stage without a system
    assert r.valid["stage_system"].to_list() == [None, "COG/NWTS"]
    assert r.valid["stage"].to_list() == [None, "III"]  # stored as the dictionary spells it


def test_duplicates_flag_the_later_occurrence(d):
    r = hv(d, "patient", patient(patient_id=["P1", "P1"]))
    assert rules_of(r, 1) == set() and rules_of(r, 2) == {"duplicate"}
    t = pl.DataFrame(
        {
            "tumour_id": ["T1", "T1", "T1"],
            "modality": ["chemo", "Chemotherapy", "Surgery"],
            "age_at_start_days": ["100", "100", "100"],
        }
    )
    r = hv(d, "treatment", t)
    assert r.error_rows == {2}


def test_cause_of_death_only_for_the_dead(d):
    f = pl.DataFrame(
        {
            "patient_id": ["P1", "P2"],
            "vital_status": ["D", "A"],
            "age_at_last_contact_days": ["2000", "2000"],
            "cause_of_death": ["tumour", "Disease"],
        }
    )
    r = hv(d, "followup", f)
    assert r.error_rows == {2}
    assert r.valid["cause_of_death"].to_list() == ["Disease"]


def test_delivery_errors_change_nothing(d):
    with pytest.raises(DeliveryError, match="missing required column.*icdo3_topography"):
        hv(d, "tumour", tumour().drop("icdo3_topography"))
    with pytest.raises(DeliveryError, match="unknown column.*name"):
        hv(d, "patient", patient().with_columns(pl.lit("Alice").alias("name")))
    with pytest.raises(DeliveryError, match="iccc3_group are set by the pool"):
        hv(d, "tumour", tumour().with_columns(pl.lit("VI").alias("iccc3_group")))
    with pytest.raises(DeliveryError, match="_row"):
        hv(d, "patient", patient().with_columns(pl.lit("x").alias("_row")))
    with pytest.raises(DeliveryError, match="unknown table"):
        validate_batch(d, {"patients": patient()})
    with pytest.raises(KeyError):
        d.delivered_columns("nope")


def test_typed_input_validates_like_text(d):
    typed = pl.DataFrame(
        {
            "tumour_id": ["T1", "T2"],
            "patient_id": ["P1", "P2"],
            "diagnosis_year": [2014, 2015],
            "age_at_diagnosis_days": [1500, -4],
            "icdo3_morphology": [8960, 9836],
            "icdo3_behaviour": [3, 3],
            "icdo3_topography": ["C64.9", "C42.1"],
        }
    )
    r = hv(d, "tumour", typed)
    assert r.error_rows == {2}
    assert r.valid["age_at_diagnosis_days"].to_list() == [1500]


def test_cross_table_rules(d):
    pat = patient(
        patient_id=["P1", "P2", "P3"], sex=["M", "F", "M"], birth_year=["2010", "2010", "1999"]
    )
    tum = tumour(
        tumour_id=["T1", "T2", "T3", "T4"],
        patient_id=["P1", "P2", "P9", "P3"],
        diagnosis_year=["2014", "2013", "2014", "2014"],
        age_at_diagnosis_days=["1500", "1100", "1000", "1000"],
        icdo3_morphology=["8960"] * 4,
        icdo3_behaviour=["3"] * 4,
        icdo3_topography=["C64.9"] * 4,
    )
    trt = pl.DataFrame(
        {
            "tumour_id": ["T1", "T1", "T2", "TX"],
            "modality": ["Surgery", "Chemotherapy", "Surgery", "Surgery"],
            "age_at_start_days": ["1469", "1468", "1100", "10"],  # 31 days before is allowed
        }
    )
    ev = pl.DataFrame(
        {
            "tumour_id": ["T1", "T2", "T3"],
            "event_type": ["Relapse", "Relapse", "Relapse"],
            "age_at_event_days": ["1499", "1100", "10"],
        }
    )
    fu = pl.DataFrame(
        {
            "patient_id": ["P1", "P2", "P7"],
            "vital_status": ["Alive", "Alive", "Alive"],
            "age_at_last_contact_days": ["3000", "1099", "3000"],
        }
    )
    res = validate_batch(
        d, {"patient": pat, "tumour": tum, "treatment": trt, "event": ev, "followup": fu}
    )
    assert res["tumour"].errors.select("row", "rule").sort("row").rows() == [
        (3, "tumour_patient_exists"),
        (4, "diagnosis_after_birth_year"),  # born 1999, diagnosed 2014 at under 3 years
    ]
    assert res["treatment"].errors.select("row", "rule").sort("row").rows() == [
        (2, "treatment_after_diagnosis"),
        (4, "treatment_tumour_exists"),
    ]
    # the event on T3 is not judged against an invalid tumour: one problem, reported once
    assert res["event"].errors.select("row", "rule").rows() == [(1, "event_after_diagnosis")]
    assert res["followup"].errors.select("row", "rule").sort("row").rows() == [
        (2, "last_contact_after_diagnosis"),
        (3, "followup_patient_exists"),
    ]
    assert res["patient"].ok
    assert res["event"].valid["_row"].to_list() == [2, 3]


def test_missing_tables_are_empty(d):
    res = validate_batch(d, {"patient": patient()})
    assert set(res) == set(CORE_TABLES)
    assert res["patient"].valid.height == 2
    assert res["tumour"].valid.height == 0 and res["tumour"].ok


@settings(max_examples=60, deadline=None)
@given(st.one_of(st.integers(-10_000, 30_000), st.text(max_size=6)))
def test_age_is_valid_exactly_when_a_whole_number_in_range(d, value):
    t = pl.DataFrame(
        {"tumour_id": ["T1"], "event_type": ["Relapse"], "age_at_event_days": [str(value)]}
    )
    r = hv(d, "event", t)
    text = str(value).strip()
    try:
        number = float(text)
        whole = number == int(number)
    except (ValueError, OverflowError):
        whole = False
    expected_ok = bool(text) and whole and 0 <= float(text) <= d.max_age_days
    assert r.ok == expected_ok, (value, r.errors)


def _broken(tmp_path, edit):
    raw = yaml.safe_load(DICTIONARY_FILE.read_text())
    edit(raw)
    p = tmp_path / "dictionary.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            lambda r: r["tables"]["patient"]["columns"]["sex"]["synonyms"].update({"Alien": ["x"]}),
            "synonyms target",
        ),
        (
            lambda r: r["rules"].append(
                {
                    "id": "x",
                    "kind": "foreign_key",
                    "table": "tumour",
                    "column": "nope",
                    "ref_table": "patient",
                    "ref_column": "patient_id",
                }
            ),
            "not a column",
        ),
        (lambda r: r["tables"]["patient"]["columns"]["sex"].update({"type": "date"}), "type"),
        (
            lambda r: r["tables"]["patient"]["columns"]["sex"]["synonyms"]["Male"].append("f"),
            "maps to both",
        ),
        (lambda r: r.pop("tables"), "tables"),
        (
            lambda r: r["rules"].append(
                {
                    "id": "y",
                    "kind": "foreign_key",
                    "table": "tumour",
                    "colum": "patient_id",
                    "ref_table": "patient",
                    "ref_column": "patient_id",
                }
            ),
            "needs column",
        ),
        (lambda r: r["rules"].append(dict(r["rules"][0])), "more than once"),
        (
            lambda r: r["rules"].append(
                {
                    "id": "z",
                    "kind": "not_before",
                    "table": "event",
                    "column": "age_at_event_days",
                    "key": "tumour_id",
                    "ref_table": "tumour",
                    "ref_key": "tumour_id",
                    "ref_column": "age_at_diagnosis_days",
                    "aggregate": "mean",
                }
            ),
            "aggregate",
        ),
    ],
)
def test_bad_dictionary_is_refused(tmp_path, edit, match):
    with pytest.raises(DictionaryError, match=match):
        load_dictionary(_broken(tmp_path, edit))


def test_nested_columns_are_refused(d):
    df = patient().with_columns(pl.Series("sex", [["M"], ["F"]]))
    with pytest.raises(DeliveryError, match="nested"):
        hv(d, "patient", df)


_cell = st.one_of(
    st.none(),
    st.text(max_size=8),
    st.sampled_from(["8960/3", "C64.9", "M", "Dead", "1", "-3", "2010", "1e9", "NaN", " "]),
)


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_any_text_delivery_is_validated_without_crashing(d, data):
    """Hostile cell values never crash validation; every row is either valid or has an error."""
    n = data.draw(st.integers(0, 6))
    tables = {
        t: pl.DataFrame(
            {c: data.draw(st.lists(_cell, min_size=n, max_size=n)) for c in d.delivered_columns(t)},
            schema={c: pl.String for c in d.delivered_columns(t)},
        )
        for t in d.tables
    }
    res = validate_batch(d, tables)
    for r in res.values():
        valid = set(r.valid["_row"].to_list())
        assert valid.isdisjoint(r.error_rows)
        assert valid | r.error_rows == set(range(1, n + 1))
        assert r.errors.columns == ["row", "column", "value", "rule", "message"]


def test_nothing_after_the_last_contact(d):
    pat = patient()
    tum = tumour()
    fu = pl.DataFrame(
        {
            "patient_id": ["P1", "P2"],
            "vital_status": ["Dead", "Alive"],
            "age_at_last_contact_days": ["2000", "1000"],  # P2's is before diagnosis: no bound
            "cause_of_death": ["Disease", None],
        }
    )
    ev = pl.DataFrame(
        {
            "tumour_id": ["T1", "T1", "T2"],
            "event_type": ["Relapse", "Death", "Relapse"],
            "age_at_event_days": ["1800", "2001", "5000"],
        }
    )
    trt = pl.DataFrame(
        {
            "tumour_id": ["T1", "T1"],
            "modality": ["Surgery", "Radiotherapy"],
            "age_at_start_days": ["2000", "2100"],
        }
    )
    res = validate_batch(
        d, {"patient": pat, "tumour": tum, "treatment": trt, "event": ev, "followup": fu}
    )
    assert res["event"].errors.select("row", "rule").rows() == [(2, "event_not_after_last_contact")]
    assert res["treatment"].errors.select("row", "rule").rows() == [
        (2, "treatment_not_after_last_contact")
    ]
    assert res["followup"].errors.select("row", "rule").rows() == [
        (2, "last_contact_after_diagnosis")
    ]


@pytest.mark.parametrize("collide", [False, True])
def test_distinct_value_lookup_gives_each_row_its_own_values_answer(monkeypatch, collide):
    """Harmonised text values are computed once per distinct value and joined back on a hash
    of the value; when two values share a hash (forced here) the join falls back to strings."""
    import polars as pl

    from tre.dictionary import _lookup_rows

    values = pl.Series("v", ["b", None, "a", "b", "", "ü", None, "a"] * 50)
    lookup = values.unique().to_frame().with_columns(pl.col("v").str.to_uppercase().alias("up"))
    if collide:
        monkeypatch.setattr(pl.Series, "hash", lambda s, *a, **k: pl.Series([0] * len(s)))
    got = _lookup_rows(values, lookup)
    assert got.columns == ["up"]
    assert got["up"].to_list() == [None if v is None else v.upper() for v in values]


@pytest.mark.parametrize("hashing", ["real", "constant", "by_length"])
def test_repeats_agree_with_first_distinct_whatever_the_hashes(monkeypatch, hashing):
    """Duplicate keys are found through 64-bit hashes; forced hash collisions (every value one
    hash, or every value of a length one hash) must not change which rows are repeats."""
    import polars as pl

    from tre.dictionary import _repeats

    rng = random.Random(5)
    ids = [rng.choice(["a", "b", "ab", "ba", "abc", "", None]) for _ in range(400)]
    nums = [rng.choice([1, 2, None]) for _ in range(400)]
    frame = pl.DataFrame({"id": ids, "n": nums}, schema={"id": pl.String, "n": pl.Int64})
    expected_one = frame.select(~pl.col("id").is_first_distinct()).to_series()
    expected_two = frame.select(~pl.struct("id", "n").is_first_distinct()).to_series()
    if hashing == "constant":
        monkeypatch.setattr(pl.Series, "hash", lambda s, *a, **k: pl.Series([0] * len(s)))
        monkeypatch.setattr(pl.DataFrame, "hash_rows", lambda f, *a, **k: pl.Series([0] * len(f)))
    elif hashing == "by_length":
        monkeypatch.setattr(
            pl.Series,
            "hash",
            lambda s, *a, **k: s.cast(pl.String).str.len_bytes().fill_null(99).cast(pl.UInt64),
        )
        monkeypatch.setattr(
            pl.DataFrame,
            "hash_rows",
            lambda f, *a, **k: f.get_column("id").str.len_bytes().fill_null(99).cast(pl.UInt64),
        )
    assert _repeats(frame, ["id"]).to_list() == expected_one.to_list()
    assert _repeats(frame, ["id", "n"]).to_list() == expected_two.to_list()
    unique = frame.with_row_index("i")
    assert not _repeats(unique, ["i"]).any()
    assert _repeats(frame.clear(), ["id"]).len() == 0


@pytest.mark.parametrize("hashing", ["real", "constant", "by_length"])
def test_join_on_key_hashes_equals_the_string_join(monkeypatch, hashing):
    """Cross-table rules join child rows to one reference row per key through 64-bit hashes;
    forced collisions (a child key sharing a reference key's hash, null keys) must give the
    rows of the plain string join."""
    import polars as pl

    from tre.dictionary import _join_one_per_key

    child = pl.DataFrame(
        {"_row": list(range(8)), "k": ["a", "bb", "zz", None, "ccc", "a", "q", "bb"]}
    )
    ref = pl.DataFrame({"k": ["a", "bb", "ccc", "dddd"], "__ref": [1, 2, 3, 4]})
    expected = child.join(ref, on="k", how="inner").sort("_row")
    if hashing == "constant":
        monkeypatch.setattr(pl.Series, "hash", lambda s, *a, **k: pl.Series([0] * len(s)))
    elif hashing == "by_length":  # "zz" and "q" collide with "bb" and "a"; null with nothing
        monkeypatch.setattr(
            pl.Series,
            "hash",
            lambda s, *a, **k: s.cast(pl.String).str.len_bytes().fill_null(99).cast(pl.UInt64),
        )
    got = _join_one_per_key(child, ref, "k").sort("_row")
    assert got.columns == expected.columns
    assert got.rows() == expected.rows()
    # a null reference key matches no null child key, as in the string join
    with_null = pl.concat([ref, pl.DataFrame({"k": [None], "__ref": [9]})])
    want = child.join(with_null, on="k", how="inner").sort("_row").rows()
    assert _join_one_per_key(child, with_null, "k").sort("_row").rows() == want

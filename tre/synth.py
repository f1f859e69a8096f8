"""Synthetic multi-site childhood-cancer deliveries (``tre data generate``).

Each site gets the five core tables as that site would deliver them: its own local ids, its own
spellings of the codes (a "dialect": 'M'/'F', '1'/'2', '8960/3', '89603', 'C649', ...), CSV or
Parquet per its ``file_format`` in ``policies/sites/``. The population is calibrated by data in
``policies/iccc3/`` (ICCC-3 shares, age shapes, sex ratios, stage systems, treatments and 5-year
survival per subgroup); every value is drawn with numpy in whole-column operations, so a million
patients take seconds. The same seed gives byte-identical files.

``--defects RATE`` corrupts a share of rows with realistic data-quality defects and writes
``defects.csv`` naming each corrupted (site, table, row) and the rule that must catch it; a
defect is only placed where exactly that one rule can see it (e.g. an event dated before a
diagnosis only on a tumour that is itself clean), so tests can demand that ingest finds
exactly the manifest.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl
import yaml

from tre.iccc3 import recode
from tre.registry import load_registry
from tre.settings import REPO_ROOT

PROFILE_FILE = REPO_ROOT / "policies" / "iccc3" / "synthetic_profile.yaml"
SHARES_FILE = REPO_ROOT / "policies" / "iccc3" / "expected_shares.csv"
REAL_SITES = frozenset({"us-nwts"})  # delivered from real data (tre.nwtco), never synthesised
TABLES = ("patient", "tumour", "treatment", "event", "followup")
MODALITIES = ("Chemotherapy", "Surgery", "Radiotherapy", "Stem-cell transplant", "Immunotherapy")
# days from diagnosis to the start of each modality: uniform [lo, hi)
MODALITY_START = {
    "Chemotherapy": (0, 15),
    "Surgery": (0, 120),
    "Radiotherapy": (30, 200),
    "Stem-cell transplant": (120, 365),
    "Immunotherapy": (150, 400),
}
DIAGNOSIS_YEARS = (2000, 2020)
DATA_CUTOFF = np.datetime64("2025-06-30")
LOSS_TO_FOLLOWUP_PER_YEAR = 0.02
LATE_DEATH_AFTER_5Y = 0.03
SUBSEQUENT_MALIGNANCY = 0.015
YEAR = 365.25

# How each site spells the codes. Every spelling is a synonym declared in policies/dictionary.yaml
# (a test checks that a clean delivery in every dialect validates without a single error).
DIALECTS: list[dict] = [
    {"name": "canonical", "morphology": "plain", "topography": "dotted"},
    {
        "name": "numeric",
        "morphology": "combined",  # '89603', no behaviour column
        "topography": "compact",  # 'C649'
        "sex": {"Male": "1", "Female": "2"},
        "vital_status": {"Alive": "1", "Dead": "2"},
        "laterality": {"Left": "2", "Right": "1", "Bilateral": "4", "Not applicable": "0"},
        "basis_of_diagnosis": {
            "Histology of a primary tumour": "7",
            "Cytology": "5",
            "Clinical investigation": "2",
            "Specific tumour markers": "4",
            "Unknown": "9",
        },
        "modality": {
            "Chemotherapy": "chemo",
            "Surgery": "surg",
            "Radiotherapy": "rt",
            "Stem-cell transplant": "hsct",
            "Immunotherapy": "immuno",
        },
        "event_type": {"Relapse": "recurrence", "Death": "died", "Subsequent malignancy": "smn"},
    },
    {
        "name": "letters",
        "morphology": "slash",  # '8960/3' and a behaviour column
        "topography": "dotted",
        "sex": {"Male": "M", "Female": "F"},
        "vital_status": {"Alive": "A", "Dead": "D"},
        "laterality": {"Left": "L", "Right": "R", "Bilateral": "B"},
        "stage_system": {"COG/NWTS": "NWTS", "Modified Chang": "Chang", "St Jude": "Murphy"},
        "cause_of_death": {"Disease": "tumour", "Treatment-related": "toxicity"},
    },
]


@dataclass(frozen=True)
class SitePlan:
    id: str
    file_format: str
    source_type: str
    country: str
    dialect: str
    template: str  # the declared site this one copies (itself unless N exceeds declared sites)
    patients: int


def plan_sites(n_sites: int, n_patients: int, policies_dir: Path) -> list[SitePlan]:
    """Declared synthetic sites in id order; beyond them, copies named '<template>-<k>'."""
    if n_sites < 1:
        raise ValueError("--sites must be at least 1")
    if n_patients < n_sites:
        raise ValueError("--patients must be at least --sites (one child per site)")
    declared = [s for s in load_registry(policies_dir).sites.values() if s.id not in REAL_SITES]
    if not declared:
        raise ValueError(f"no synthetic sites declared in {policies_dir / 'sites'}")
    declared.sort(key=lambda s: s.id)
    base, extra = divmod(n_patients, n_sites)
    plans = []
    for i in range(n_sites):
        t = declared[i % len(declared)]
        rnd = i // len(declared)
        plans.append(
            SitePlan(
                id=t.id if rnd == 0 else f"{t.id}-{rnd + 1}",
                file_format=t.file_format,
                source_type=t.source_type,
                country=t.country,
                dialect=DIALECTS[i % len(DIALECTS)]["name"],
                template=t.id,
                patients=base + (1 if i < extra else 0),
            )
        )
    return plans


@dataclass(frozen=True)
class Profile:
    subgroups: list[str]
    groups: list[str]
    probs: np.ndarray  # share of each subgroup
    ages: np.ndarray  # [S, 4]
    male: np.ndarray
    surv5: np.ndarray
    diag_morph: np.ndarray  # flattened diagnoses
    diag_beh: np.ndarray
    diag_topo: np.ndarray
    diag_offset: np.ndarray  # [S] start in the flattened arrays
    diag_cum: np.ndarray  # [S, K] cumulative weights (padded with 1)
    stage_system: list[str | None]
    stage_values: list[list[str]]
    stage_cum: np.ndarray  # [S, V]
    stage_risk: np.ndarray  # [S, V] relative risk of each stage value (1 where not given)
    stage_mean_risk: np.ndarray  # [S] expected relative risk, to keep survival calibrated
    unfav_share: float
    unfav_risk: float
    treat_p: np.ndarray  # [S, len(MODALITIES)]
    protocols: list[list[str]]
    progression_event: list[str]


def _cum(rows: list[list[float]]) -> np.ndarray:
    width = max(1, max(len(r) for r in rows))
    out = np.ones((len(rows), width))
    for i, r in enumerate(rows):
        if r:
            c = np.cumsum(np.asarray(r, dtype=float))
            out[i, : len(r)] = c / c[-1]
    return out


def load_profile(path: Path = PROFILE_FILE, shares_path: Path = SHARES_FILE) -> Profile:
    raw = yaml.safe_load(path.read_text())
    defaults = raw.get("defaults", {})
    subs = raw["subgroups"]
    names = list(subs)
    diag_rows = []
    for sg, s in subs.items():
        for d, topo, w in s["diagnoses"]:
            m, b = str(d).split("/")
            diag_rows.append((sg, int(m), int(b), topo, float(w)))
    diag = pl.DataFrame(diag_rows, schema=["sg", "m", "b", "t", "w"], orient="row")
    coded = recode(diag, "m", "b", "t")
    wrong = coded.filter(pl.col("iccc3_subgroup").ne_missing(pl.col("sg")))
    if wrong.height:
        raise ValueError(f"{path}: diagnoses that do not recode to their subgroup: {wrong.rows()}")
    group_of = dict(zip(coded["sg"], coded["iccc3_group"], strict=False))
    shares = dict(pl.read_csv(shares_path).select("group", "expected_share").iter_rows())
    group_w: dict[str, float] = {}
    for sg in names:
        group_w[group_of[sg]] = group_w.get(group_of[sg], 0.0) + float(subs[sg]["weight"])
    probs = np.array(
        [shares[group_of[sg]] * subs[sg]["weight"] / group_w[group_of[sg]] for sg in names]
    )
    probs = probs / probs.sum()
    offsets, cums = [], []
    for sg in names:
        offsets.append(sum(len(subs[x]["diagnoses"]) for x in names[: names.index(sg)]))
        cums.append([float(w) for *_, w in subs[sg]["diagnoses"]])
    stage_sys, stage_vals, stage_w, stage_r = [], [], [], []
    treat = np.zeros((len(names), len(MODALITIES)))
    for i, sg in enumerate(names):
        st = subs[sg].get("stage")
        stage_sys.append(st["system"] if st else None)
        stage_vals.append(list(st["values"]) if st else [])
        stage_w.append([float(v) for v in st["values"].values()] if st else [])
        risk = [float(x) for x in st.get("risk", [])] if st else []
        if st and risk and len(risk) != len(st["values"]):
            raise ValueError(f"{path}: {sg}: stage risk needs one value per stage value")
        stage_r.append(risk or [1.0] * len(stage_w[-1]))
        for m, p in (subs[sg].get("treatment") or defaults["treatment"]).items():
            treat[i, MODALITIES.index(m)] = p
    return Profile(
        subgroups=names,
        groups=[group_of[sg] for sg in names],
        probs=probs,
        ages=np.array([subs[sg]["ages"] for sg in names], dtype=float),
        male=np.array([subs[sg].get("male", defaults["male"]) for sg in names]),
        surv5=np.array([subs[sg]["surv5"] for sg in names]),
        diag_morph=diag["m"].to_numpy(),
        diag_beh=diag["b"].to_numpy(),
        diag_topo=diag["t"].to_numpy(),
        diag_offset=np.array(offsets),
        diag_cum=_cum(cums),
        stage_system=stage_sys,
        stage_values=stage_vals,
        stage_cum=_cum(stage_w),
        stage_risk=_pad(stage_r),
        stage_mean_risk=np.array(
            [
                float(np.dot(w, r) / sum(w)) if w else 1.0
                for w, r in zip(stage_w, stage_r, strict=True)
            ]
        ),
        unfav_share=float(raw.get("unfavourable_histology_share", 0.0)),
        unfav_risk=float(raw.get("unfavourable_histology_risk", 1.0)),
        treat_p=treat,
        protocols=[subs[sg].get("protocols", []) for sg in names],
        progression_event=[
            subs[sg].get("progression_event", defaults["progression_event"]) for sg in names
        ],
    )


def _pad(rows: list[list[float]]) -> np.ndarray:
    width = max(1, max(len(r) for r in rows))
    out = np.ones((len(rows), width))
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def _pick(rng: np.random.Generator, cum: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """For each row, draw a category from the row's cumulative distribution ``cum[idx]``."""
    u = rng.random(len(idx))
    k = (u[:, None] >= cum[idx]).sum(axis=1)
    return np.minimum(k, cum.shape[1] - 1)


def _single_year_cum(ages: np.ndarray) -> np.ndarray:
    """Cumulative weights of each single year of age 0-14, per subgroup.

    The profile gives shares of the bands <1, 1-4, 5-9, 10-14. Densities are interpolated
    linearly between band midpoints (so incidence changes smoothly across band edges, e.g. ALL
    peaks at 2-4 rather than being flat over 1-4), then rescaled so every band keeps its share.
    """
    edges = [(0, 1), (1, 5), (5, 10), (10, 15)]
    mids = np.array([(a + b) / 2 for a, b in edges])
    years = np.arange(15) + 0.5
    shares = ages / ages.sum(axis=1, keepdims=True)
    dens = shares / np.array([b - a for a, b in edges])
    w = np.stack([np.interp(years, mids, d) for d in dens])
    for k, (a, b) in enumerate(edges):
        total = w[:, a:b].sum(axis=1, keepdims=True)
        w[:, a:b] = np.where(total > 0, w[:, a:b] / np.maximum(total, 1e-12), 0) * shares[:, [k]]
    cum = np.cumsum(w, axis=1)
    return cum / cum[:, -1:]


def _years(days: np.ndarray) -> np.ndarray:
    return days.astype("datetime64[D]").astype("datetime64[Y]").astype(np.int64) + 1970


def _gather(values: list, idx: np.ndarray, dtype: pl.DataType = pl.String) -> pl.Series:
    return pl.Series(values, dtype=dtype).gather(idx)


def _id_series(prefix: str, numbers: np.ndarray, width: int) -> pl.Series:
    return (
        pl.DataFrame({"n": numbers.astype(np.int64)})
        .select(pl.concat_str([pl.lit(prefix), pl.col("n").cast(pl.String).str.zfill(width)]))
        .to_series()
    )


@dataclass
class SiteTables:
    frames: dict[str, pl.DataFrame]
    # numeric truth used by the defect injector (same row order as the frames)
    tumour_dx_age: np.ndarray
    treatment_tumour: np.ndarray  # tumour row index of each treatment row
    event_tumour: np.ndarray
    followup_patient: np.ndarray  # = arange: followup row i is patient i
    last_contact_age: np.ndarray  # per patient


def simulate_site(rng: np.random.Generator, site: SitePlan, profile: Profile) -> SiteTables:
    """The clean delivery of one site (canonical codes, before the dialect is applied)."""
    n = site.patients
    sg = rng.choice(len(profile.subgroups), size=n, p=profile.probs)
    year_of_age = _pick(rng, _single_year_cum(profile.ages), sg)
    age_dx = np.floor((year_of_age + rng.random(n)) * YEAR).astype(np.int64)
    male = rng.random(n) < profile.male[sg]
    d = profile.diag_offset[sg] + _pick(rng, profile.diag_cum, sg)
    y0 = np.datetime64(f"{DIAGNOSIS_YEARS[0]}-01-01").astype(np.int64)
    y1 = np.datetime64(f"{DIAGNOSIS_YEARS[1] + 1}-01-01").astype(np.int64)
    dx_day = y0 + np.floor(rng.random(n) * (y1 - y0)).astype(np.int64)
    birth_day = dx_day - age_dx

    # stage and (for Wilms tumours) histology come first: they modify the risk of dying
    has_stage = np.array([s is not None for s in profile.stage_system])[sg]
    stage_k = _pick(rng, profile.stage_cum, sg)
    wilms = profile.diag_morph[d] == 8960
    unfavourable = wilms & (rng.random(n) < profile.unfav_share)
    hist_mean = 1 - profile.unfav_share + profile.unfav_share * profile.unfav_risk
    risk = np.where(has_stage, profile.stage_risk[sg, stage_k] / profile.stage_mean_risk[sg], 1.0)
    risk *= np.where(wilms, np.where(unfavourable, profile.unfav_risk, 1.0) / hist_mean, 1.0)

    # outcome: death within 5 years with probability (1 - surv5) x relative risk, a few late
    # deaths after; the rescaled risks keep each subgroup's 5-year survival as declared
    u = rng.random(n)
    early = u < np.minimum((1 - profile.surv5[sg]) * risk, 0.97)
    late = (~early) & (rng.random(n) < LATE_DEATH_AFTER_5Y)
    death_t = np.full(n, np.inf)
    death_t[early] = 5 * YEAR * rng.beta(1.3, 2.6, early.sum())
    death_t[late] = YEAR * (5 + 15 * rng.random(late.sum()))
    death_t = np.maximum(death_t, 1)
    admin = (DATA_CUTOFF.astype(np.int64) - dx_day).astype(float)
    ltfu = rng.exponential(YEAR / LOSS_TO_FOLLOWUP_PER_YEAR, n)
    censor = np.maximum(np.minimum(admin, ltfu), 1)
    dead = death_t <= censor
    follow = np.floor(np.where(dead, death_t, censor)).astype(np.int64)
    last_age = age_dx + follow

    # relapse / progression: most deaths follow one, some survivors are salvaged after one
    rel_dead = dead & (rng.random(n) < 0.75)
    rel_surv = (~dead) & (rng.random(n) < np.minimum(0.5 * (1 - profile.surv5[sg]) * risk, 0.9))
    rel_t = np.full(n, -1.0)
    rel_t[rel_dead] = follow[rel_dead] * (0.3 + 0.55 * rng.random(rel_dead.sum()))
    rel_t[rel_surv] = YEAR * (0.2 + 2.8 * rng.random(rel_surv.sum()))
    relapse = (rel_t >= 0) & (rel_t < follow)
    smn_t = YEAR * (3 + 17 * rng.random(n))
    smn = (~dead) & (rng.random(n) < SUBSEQUENT_MALIGNANCY) & (smn_t < follow)

    # ids: site-local, not in diagnosis order
    prefix = site.id.replace("-", "").upper()[:6]
    pat_ids = _id_series(f"{prefix}-P", rng.permutation(n) + 1, 8)
    tum_ids = _id_series(f"{prefix}-T", rng.permutation(n) + 1, 8)

    # stage values as text
    all_vals = sorted({v for vs in profile.stage_values for v in vs})
    val_idx = np.array(
        [
            [all_vals.index(v) for v in vs] + [0] * (profile.stage_cum.shape[1] - len(vs))
            for vs in profile.stage_values
        ]
    )
    systems = [s or "" for s in profile.stage_system]
    stage_system = _gather(systems, sg).set(pl.Series(~has_stage), None)
    stage = _gather(all_vals, val_idx[sg, stage_k]).set(pl.Series(~has_stage), None)

    topo = profile.diag_topo[d]
    topo_s = pl.Series(topo)
    paired = topo_s.str.contains(r"^C(64|69|56|62|40|74)\.").to_numpy()
    bilateral_p = np.where(topo_s.str.starts_with("C69").to_numpy(), 0.3, 0.04)
    lat_u = rng.random(n)
    laterality = np.where(
        ~paired,
        "Not applicable",
        np.where(lat_u < bilateral_p, "Bilateral", np.where(lat_u < 0.52, "Left", "Right")),
    )
    leuk = np.array([g == "I" for g in profile.groups])[sg]
    b_u = rng.random(n)
    basis = np.where(
        leuk,
        np.where(b_u < 0.6, "Cytology", "Histology of a primary tumour"),
        np.where(
            b_u < 0.92,
            "Histology of a primary tumour",
            np.where(b_u < 0.97, "Clinical investigation", "Unknown"),
        ),
    )

    # treatments, one row per modality given; only those started by the last contact
    t_rows = []
    proto_lists = profile.protocols
    for j, m in enumerate(MODALITIES):
        given = rng.random(n) < profile.treat_p[sg, j]
        a, b = MODALITY_START[m]
        start = age_dx + a + np.floor(rng.random(n) * (b - a)).astype(np.int64)
        keep = given & (start <= last_age)
        idx = np.nonzero(keep)[0]
        t_rows.append((idx, np.full(len(idx), j), start[idx]))
    t_pat = np.concatenate([r[0] for r in t_rows])
    t_mod = np.concatenate([r[1] for r in t_rows])
    t_start = np.concatenate([r[2] for r in t_rows])
    order = np.lexsort((t_mod, t_start, t_pat))
    t_pat, t_mod, t_start = t_pat[order], t_mod[order], t_start[order]
    # protocol: one per patient (from the subgroup's list), written on chemotherapy rows
    n_proto = np.array([len(p) for p in proto_lists])
    flat_proto = [p for ps in proto_lists for p in ps] + [""]
    proto_off = np.concatenate([[0], np.cumsum(n_proto)[:-1]])
    pick = np.floor(rng.random(n) * np.maximum(n_proto[sg], 1)).astype(np.int64)
    pat_proto = np.where(n_proto[sg] > 0, proto_off[sg] + pick, len(flat_proto) - 1)
    protocol = _gather(flat_proto, pat_proto[t_pat])
    protocol = protocol.set(pl.Series((t_mod != 0) | (n_proto[sg][t_pat] == 0)), None)

    # events
    e_pat = np.concatenate([np.nonzero(relapse)[0], np.nonzero(smn)[0], np.nonzero(dead)[0]])
    e_kind = np.concatenate(
        [np.zeros(relapse.sum(), int), np.ones(smn.sum(), int), np.full(dead.sum(), 2)]
    )
    e_age = np.concatenate(
        [
            age_dx[relapse] + np.floor(rel_t[relapse]).astype(np.int64),
            age_dx[smn] + np.floor(smn_t[smn]).astype(np.int64),
            last_age[dead],
        ]
    )
    order = np.lexsort((e_kind, e_age, e_pat))
    e_pat, e_kind, e_age = e_pat[order], e_kind[order], e_age[order]
    prog = np.array([p == "Progression" for p in profile.progression_event])
    e_type_code = np.where(
        e_kind == 0, np.where(prog[sg[e_pat]], 1, 0), np.where(e_kind == 1, 2, 3)
    )
    event_types = ["Relapse", "Progression", "Subsequent malignancy", "Death"]

    # study: trial sites enrol every child in a protocol; registries know it for some
    enrolled = rng.random(n) < (0.95 if site.source_type == "trial" else 0.3)
    study = _gather(flat_proto, pat_proto).set(pl.Series(~enrolled | (n_proto[sg] == 0)), None)
    c_u = rng.random(n)
    cause = np.where(c_u < 0.85, "Disease", np.where(c_u < 0.95, "Treatment-related", "Other"))

    frames = {
        "patient": pl.DataFrame(
            {
                "patient_id": pat_ids,
                "sex": np.where(male, "Male", "Female"),
                "birth_year": _years(birth_day),
                "study_id": study,
            }
        ),
        "tumour": pl.DataFrame(
            {
                "tumour_id": tum_ids,
                "patient_id": pat_ids,
                "diagnosis_year": _years(dx_day),
                "age_at_diagnosis_days": age_dx,
                "icdo3_morphology": profile.diag_morph[d].astype(np.int64),
                "icdo3_behaviour": profile.diag_beh[d].astype(np.int64),
                "icdo3_topography": topo,
                "laterality": laterality,
                "basis_of_diagnosis": basis,
                "histology_group": pl.Series(
                    np.where(unfavourable, "Unfavourable", "Favourable")
                ).set(pl.Series(~wilms), None),
                "stage_system": stage_system,
                "stage": stage,
            }
        ),
        "treatment": pl.DataFrame(
            {
                "tumour_id": tum_ids.gather(t_pat),
                "modality": _gather(list(MODALITIES), t_mod),
                "age_at_start_days": t_start,
                "protocol": protocol,
            }
        ),
        "event": pl.DataFrame(
            {
                "tumour_id": tum_ids.gather(e_pat),
                "event_type": _gather(event_types, e_type_code),
                "age_at_event_days": e_age,
            }
        ),
        "followup": pl.DataFrame(
            {
                "patient_id": pat_ids,
                "vital_status": np.where(dead, "Dead", "Alive"),
                "age_at_last_contact_days": last_age,
                "cause_of_death": pl.Series(cause).set(pl.Series(~dead), None),
            }
        ),
    }
    return SiteTables(
        frames=frames,
        tumour_dx_age=age_dx,
        treatment_tumour=t_pat,
        event_tumour=e_pat,
        followup_patient=np.arange(n),
        last_contact_age=last_age,
    )


def apply_dialect(frames: dict[str, pl.DataFrame], dialect_name: str) -> dict[str, pl.DataFrame]:
    """Re-spell canonical codes the way this site writes them."""
    dialect = next(d for d in DIALECTS if d["name"] == dialect_name)
    out = {}
    for table, df in frames.items():
        exprs = []
        for col in df.columns:
            mapping = dialect.get(col)
            if isinstance(mapping, dict):
                exprs.append(pl.col(col).replace(mapping))
        if table == "tumour":
            m = pl.col("icdo3_morphology").cast(pl.String)
            b = pl.col("icdo3_behaviour").cast(pl.String)
            if dialect["morphology"] == "combined":
                exprs.append(pl.concat_str([m, b]).alias("icdo3_morphology"))
            elif dialect["morphology"] == "slash":
                exprs.append(pl.concat_str([m, pl.lit("/"), b]).alias("icdo3_morphology"))
            if dialect["topography"] == "compact":
                exprs.append(pl.col("icdo3_topography").str.replace(".", "", literal=True))
        df = df.with_columns(exprs) if exprs else df
        if table == "tumour" and dialect["morphology"] == "combined":
            df = df.drop("icdo3_behaviour")
        out[table] = df
    return out


# --- defects ------------------------------------------------------------------------------
# kind -> (table, column, rule the validator must report)
DEFECT_KINDS: dict[str, tuple[str, str, str]] = {
    "bad_sex_code": ("patient", "sex", "code_list"),
    "missing_sex": ("patient", "sex", "required"),
    "impossible_birth_year": ("patient", "birth_year", "range"),
    "duplicate_patient": ("patient", "patient_id", "duplicate"),
    "bad_morphology": ("tumour", "icdo3_morphology", "range"),
    "bad_topography": ("tumour", "icdo3_topography", "range"),
    "impossible_age": ("tumour", "age_at_diagnosis_days", "range"),
    "unclassifiable_tumour": ("tumour", "icdo3_morphology", "iccc3_classifiable"),
    "missing_topography": ("tumour", "icdo3_topography", "required"),
    "orphan_tumour": ("tumour", "patient_id", "tumour_patient_exists"),
    "duplicate_tumour": ("tumour", "tumour_id", "duplicate"),
    "bad_modality": ("treatment", "modality", "code_list"),
    "treatment_before_diagnosis": ("treatment", "age_at_start_days", "treatment_after_diagnosis"),
    "bad_event_type": ("event", "event_type", "code_list"),
    "event_before_diagnosis": ("event", "age_at_event_days", "event_after_diagnosis"),
    "event_after_last_contact": ("event", "age_at_event_days", "event_not_after_last_contact"),
    "bad_vital_status": ("followup", "vital_status", "code_list"),
    "cause_of_death_when_alive": ("followup", "cause_of_death", "cause_of_death_only_if_dead"),
    "missing_last_contact": ("followup", "age_at_last_contact_days", "required"),
    "contact_before_diagnosis": (
        "followup",
        "age_at_last_contact_days",
        "last_contact_after_diagnosis",
    ),
}
# defects that a cross-table rule catches need a clean reference row
_NEEDS_CLEAN_TUMOUR = {
    "treatment_before_diagnosis",
    "event_before_diagnosis",
    "contact_before_diagnosis",
    "event_after_last_contact",
}


def _set(df: pl.DataFrame, col: str, rows: np.ndarray, value: object) -> pl.DataFrame:
    mask = np.zeros(df.height, dtype=bool)
    mask[rows] = True
    if isinstance(value, np.ndarray):
        full = np.zeros(df.height, dtype=value.dtype)
        full[rows] = value
        new = pl.Series(full).cast(df.schema[col], strict=False)
    else:
        new = pl.repeat(value, df.height, eager=True, dtype=df.schema[col])
    return df.with_columns(pl.when(pl.Series(mask)).then(new).otherwise(pl.col(col)).alias(col))


def inject_defects(
    rng: np.random.Generator, st: SiteTables, frames: dict[str, pl.DataFrame], rate: float
) -> tuple[dict[str, pl.DataFrame], pl.DataFrame]:
    """Corrupt about ``rate`` of each table's rows; return the frames and the manifest."""
    frames = dict(frames)
    records: list[tuple[str, int, str, str, str]] = []  # table, 0-based row (pre-dup), kind...
    dup_sources: dict[str, np.ndarray] = {}
    corrupted_tumour = np.zeros(frames["tumour"].height, dtype=bool)
    # children whose follow-up row must stay clean (it is the reference of an event defect)
    protected_followup = np.zeros(frames["followup"].height, dtype=bool)
    ref_of = {
        "treatment": st.treatment_tumour,
        "event": st.event_tumour,
        "followup": st.followup_patient,  # tumour row i belongs to patient i
    }
    for table in TABLES:
        df = frames[table]
        kinds = [k for k, v in DEFECT_KINDS.items() if v[0] == table]
        if df.height == 0 or not kinds:
            continue
        k = max(1, int(round(rate * df.height)))
        candidates = np.arange(df.height)
        rows = rng.choice(candidates, size=min(k, df.height), replace=False)
        assigned = rng.integers(0, len(kinds), len(rows))
        for ki, kind in enumerate(kinds):
            r = np.sort(rows[assigned == ki])
            if kind in _NEEDS_CLEAN_TUMOUR:
                r = r[~corrupted_tumour[ref_of[table][r]]]
            if table == "followup":
                r = r[~protected_followup[r]]
            if kind == "cause_of_death_when_alive":
                alive = (frames[table]["cause_of_death"].is_null()).to_numpy()
                r = r[alive[r]]
            if len(r) == 0:
                continue
            df = frames[table]
            col = DEFECT_KINDS[kind][1]
            if kind.startswith("duplicate_"):
                # the later copy is the defect; the original stays clean
                dup_sources[table] = np.concatenate([dup_sources.get(table, []), r]).astype(int)
                continue
            if kind == "bad_sex_code":
                df = _set(df, col, r, "Q")
            elif kind in ("missing_sex", "missing_topography", "missing_last_contact"):
                df = _set(df, col, r, None)
            elif kind == "impossible_birth_year":
                df = _set(df, col, r, 1850)
            elif kind == "bad_morphology":
                df = _set(df, col, r, _morph_like(df, "9999", "3"))
            elif kind == "bad_topography":
                df = _set(df, col, r, "C99.9")
            elif kind == "impossible_age":
                df = _set(df, col, r, -(1 + rng.integers(0, 400, len(r))))
            elif kind == "unclassifiable_tumour":
                df = _set(df, col, r, _morph_like(df, "9380", "3"))
                df = _set(df, "icdo3_topography", r, "C34.1")
                if "icdo3_behaviour" in df.columns:
                    df = _set(df, "icdo3_behaviour", r, 3)
            elif kind == "orphan_tumour":
                df = _set(df, col, r, "UNKNOWN-PATIENT")
            elif kind == "bad_modality":
                df = _set(df, col, r, "Homeopathy")
            elif kind == "bad_event_type":
                df = _set(df, col, r, "Cured")
            elif kind == "bad_vital_status":
                df = _set(df, col, r, "Zombie")
            elif kind == "cause_of_death_when_alive":
                df = _set(df, col, r, "Disease")
            elif kind == "event_after_last_contact":
                patient = ref_of[table][r]
                after = st.last_contact_age[patient] + rng.integers(1, 300, len(r))
                df = _set(df, col, r, after)
                protected_followup[patient] = True
            elif kind in _NEEDS_CLEAN_TUMOUR:
                dx = st.tumour_dx_age[ref_of[table][r]]
                df = _set(df, col, r, dx - 40 - rng.integers(1, 300, len(r)))
            frames[table] = df
            if table == "tumour":
                corrupted_tumour[r] = True
            for row in r:
                records.append((table, int(row), kind, col, DEFECT_KINDS[kind][2]))
    # insert each duplicate copy later in its table, then renumber every row
    final_rows: dict[str, np.ndarray] = {}
    for table in TABLES:
        df = frames[table]
        src = dup_sources.get(table, np.array([], dtype=int))
        n = df.height
        keys = np.arange(n) * 2
        if len(src):
            after = src + rng.integers(0, np.maximum(n - src, 1))  # somewhere at/after source
            keys = np.concatenate([keys, np.minimum(after, n - 1) * 2 + 1])
            take = np.concatenate([np.arange(n), src])
        else:
            take = np.arange(n)
        order = np.argsort(keys, kind="stable")
        frames[table] = df[take[order]]
        position = np.empty(len(order), dtype=np.int64)
        position[order] = np.arange(len(order))
        final_rows[table] = position  # position of each (original + copy) entry in the file
        for j in range(len(src)):
            kind = "duplicate_patient" if table == "patient" else "duplicate_tumour"
            records.append((table, n + j, kind, DEFECT_KINDS[kind][1], DEFECT_KINDS[kind][2]))
    manifest = pl.DataFrame(
        [(t, int(final_rows[t][r]) + 1, kind, col, rule) for t, r, kind, col, rule in records],
        schema={
            "table": pl.String,
            "row": pl.Int64,
            "kind": pl.String,
            "column": pl.String,
            "rule": pl.String,
        },
        orient="row",
    ).sort(["table", "row"])
    return frames, manifest


def _morph_like(df: pl.DataFrame, histology: str, behaviour: str) -> str:
    """A morphology written in the same form as this delivery writes them."""
    sample = df["icdo3_morphology"].drop_nulls().head(1).cast(pl.String).to_list()
    s = sample[0] if sample else ""
    if "/" in s:
        return f"{histology}/{behaviour}"
    if len(s) == 5:
        return f"{histology}{behaviour}"
    return histology


@dataclass
class GenerateSummary:
    out_dir: str
    seed: int
    defects_rate: float
    sites: list[dict]


def write_table(df: pl.DataFrame, path: Path, file_format: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    if file_format == "csv":
        df.write_csv(tmp)
    else:
        df.write_parquet(tmp, statistics=False)
    tmp.replace(path)


def generate(
    out_dir: Path,
    n_sites: int,
    n_patients: int,
    seed: int,
    defects_rate: float = 0.0,
    policies_dir: Path = REPO_ROOT / "policies",
) -> GenerateSummary:
    """Write one delivery per site under ``out_dir`` (see module docstring).

    Everything is written into a staging directory beside ``out_dir`` and swapped in at the
    end: a crash leaves no half-written delivery, and a rerun leaves no stale file of an
    earlier one. An existing ``out_dir`` is only replaced if it is empty or an earlier output
    of this command (it has ``manifest.json``).
    """
    if not 0 <= defects_rate <= 0.5:
        raise ValueError("--defects must be between 0 and 0.5")
    plans = plan_sites(n_sites, n_patients, policies_dir)
    profile = load_profile()
    out_dir = Path(out_dir)
    if out_dir.exists() and (
        not out_dir.is_dir()
        or (any(out_dir.iterdir()) and not (out_dir / "manifest.json").is_file())
    ):
        raise ValueError(f"{out_dir} exists and is not an earlier output of tre data generate")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=out_dir.parent))
    try:
        summary = _write_all(staging, plans, profile, seed, defects_rate, policies_dir)
        if out_dir.exists():
            old = staging.with_name(staging.name.replace(".staging-", ".old-"))
            os.replace(out_dir, old)
            os.replace(staging, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    summary.out_dir = str(out_dir)
    return summary


def _write_all(
    out_dir: Path,
    plans: list[SitePlan],
    profile: Profile,
    seed: int,
    defects_rate: float,
    policies_dir: Path,
) -> GenerateSummary:
    manifests = []
    sites = []
    for i, plan in enumerate(plans):
        rng = np.random.default_rng([seed, i])
        st = simulate_site(rng, plan, profile)
        frames = apply_dialect(st.frames, plan.dialect)
        if defects_rate > 0:
            frames, man = inject_defects(
                np.random.default_rng([seed, i, 1]), st, frames, defects_rate
            )
            manifests.append(man.select(pl.lit(plan.id).alias("site"), pl.all()))
        site_dir = out_dir / plan.id
        site_dir.mkdir(parents=True, exist_ok=True)
        for table, df in frames.items():
            write_table(df, site_dir / f"{table}.{plan.file_format}", plan.file_format)
        sites.append({**asdict(plan), "rows": {t: f.height for t, f in frames.items()}})
    if defects_rate > 0:
        pl.concat(manifests).write_csv(out_dir / "defects.csv")
    _declare_extra_sites(out_dir, plans, policies_dir)
    (out_dir / "manifest.json").write_text(
        json.dumps({"seed": seed, "defects_rate": defects_rate, "sites": sites}, indent=2) + "\n"
    )
    return GenerateSummary(str(out_dir), seed, defects_rate, sites)


def _declare_extra_sites(out_dir: Path, plans: list[SitePlan], policies_dir: Path) -> None:
    """Sites beyond the declared ones need a declaration before ingest: write one per extra site
    (a copy of its template's sharing conditions) under ``out_dir/site-declarations/``."""
    extra = [p for p in plans if p.id != p.template]
    if not extra:
        return
    decl_dir = out_dir / "site-declarations"
    decl_dir.mkdir(exist_ok=True)
    for p in extra:
        body = yaml.safe_load((policies_dir / "sites" / f"{p.template}.yaml").read_text())
        body.update(id=p.id, name=f"{body['name']} (synthetic copy {p.id})")
        (decl_dir / f"{p.id}.yaml").write_text(yaml.safe_dump(body, sort_keys=False))


def read_delivery(site_dir: Path) -> dict[str, pl.DataFrame]:
    """Read a site's delivery as written (CSV as text, Parquet as typed)."""
    tables = {}
    for t in TABLES:
        csv, pq = site_dir / f"{t}.csv", site_dir / f"{t}.parquet"
        if csv.exists():
            tables[t] = pl.read_csv(csv, infer_schema=False)
        elif pq.exists():
            tables[t] = pl.read_parquet(pq)
    return tables

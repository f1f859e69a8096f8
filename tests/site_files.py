"""Generated site deliveries (CSV or Parquet) in the dictionary's delivered format, for the
ingest tests and the ingest benchmark. Vectorised with numpy so millions of rows are quick.

Every generated row is valid under policies/dictionary.yaml; ``defects`` then breaks chosen
rows in known ways so tests can check exactly which rows the ingest reports.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

# (morphology, behaviour, topography, ICCC-3 group): each classifies under the ICCC-3 recode
TUMOURS = [
    ("9836", "3", "C42.1", "I"),
    ("9861", "3", "C42.1", "I"),
    ("8960", "3", "C64.9", "VI"),
    ("9500", "3", "C74.9", "IV"),
    ("9510", "3", "C69.2", "V"),
    ("8970", "3", "C22.0", "VII"),
    ("9470", "3", "C71.6", "III"),
    ("9650", "3", "C77.0", "II"),
    ("9180", "3", "C40.2", "VIII"),
    ("8900", "3", "C49.0", "IX"),
    ("9070", "3", "C62.9", "X"),
    ("8370", "3", "C74.0", "XI"),
]


def _frame(columns: dict[str, np.ndarray]) -> pl.DataFrame:
    return pl.DataFrame(
        [
            pl.Series(k, v.tolist() if v.dtype == object else v.astype(str), dtype=pl.String)
            for k, v in columns.items()
        ]
    )


def generate(n_patients: int, seed: int = 0, id_prefix: str = "P") -> dict[str, pl.DataFrame]:
    """Delivered tables for ``n_patients`` children: 1-2 tumours each, 2 treatments per
    tumour, a relapse for some tumours, one follow-up per child (about 6 rows per child)."""
    rng = np.random.default_rng(seed)
    pid = np.array([f"{id_prefix}{i:08d}" for i in range(n_patients)], dtype=object)
    birth_year = rng.integers(1990, 2015, n_patients)
    sex = rng.choice(np.array(["F", "M", "female", "Male", "1", "2"], dtype=object), n_patients)
    patient = _frame(
        {
            "patient_id": pid,
            "sex": sex,
            "birth_year": birth_year.astype(str),
            "study_id": np.where(rng.random(n_patients) < 0.3, "TRIAL-A", None),
        }
    )
    n_tum = 1 + (rng.random(n_patients) < 0.1)
    t_pat = np.repeat(np.arange(n_patients), n_tum)
    t_k = np.concatenate([np.arange(k) for k in n_tum]) if n_patients < 1000 else None
    if t_k is None:  # vectorised rank within patient
        starts = np.repeat(np.cumsum(n_tum) - n_tum, n_tum)
        t_k = np.arange(len(t_pat)) - starts
    n_t = len(t_pat)
    tid = np.char.add(np.char.add(pid[t_pat].astype(str), "-T"), t_k.astype(str)).astype(object)
    age_days = rng.integers(30, 14 * 365, n_t)
    diag_year = birth_year[t_pat] + np.floor(age_days / 365.25).astype(np.int64)
    diag_year += rng.random(n_t) < 0.5
    choice = rng.integers(0, len(TUMOURS), n_t)
    combos = np.array(TUMOURS, dtype=object)
    tumour = _frame(
        {
            "tumour_id": tid,
            "patient_id": pid[t_pat],
            "diagnosis_year": diag_year.astype(str),
            "age_at_diagnosis_days": age_days.astype(str),
            "icdo3_morphology": combos[choice, 0],
            "icdo3_behaviour": combos[choice, 1],
            "icdo3_topography": combos[choice, 2],
            "laterality": rng.choice(np.array(["L", "R", None], dtype=object), n_t),
            "basis_of_diagnosis": np.full(n_t, "7", dtype=object),
            "stage_system": np.full(n_t, None, dtype=object),
            "stage": np.full(n_t, None, dtype=object),
        }
    )
    tr_t = np.repeat(np.arange(n_t), 2)
    treatment = _frame(
        {
            "tumour_id": tid[tr_t],
            "modality": np.tile(np.array(["chemo", "Surgery"], dtype=object), n_t),
            "age_at_start_days": (age_days[tr_t] + np.tile([5, 60], n_t)).astype(str),
            "protocol": np.full(2 * n_t, None, dtype=object),
        }
    )
    relapsed = np.flatnonzero(rng.random(n_t) < 0.2)
    event = _frame(
        {
            "tumour_id": tid[relapsed],
            "event_type": np.full(len(relapsed), "Relapse", dtype=object),
            "age_at_event_days": (age_days[relapsed] + 300).astype(str),
        }
    )
    last = np.zeros(n_patients, dtype=np.int64)
    np.maximum.at(last, t_pat, age_days)
    dead = rng.random(n_patients) < 0.15
    followup = _frame(
        {
            "patient_id": pid,
            "vital_status": np.where(dead, "Dead", "Alive").astype(object),
            "age_at_last_contact_days": (last + 700).astype(str),
            "cause_of_death": np.where(dead, "Disease", None).astype(object),
        }
    )
    return {
        "patient": patient,
        "tumour": tumour,
        "treatment": treatment,
        "event": event,
        "followup": followup,
    }


def write(tables: dict[str, pl.DataFrame], directory: Path, fmt: str = "csv") -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, df in tables.items():
        path = directory / f"{name}.{fmt}"
        if fmt == "csv":
            df.write_csv(path)
        else:
            df.write_parquet(path)
        paths.append(path)
    return paths


def set_cell(df: pl.DataFrame, row: int, column: str, value: object) -> pl.DataFrame:
    """Return ``df`` with one cell (0-based row) replaced: to plant a defect."""
    idx = pl.int_range(0, pl.len())
    return df.with_columns(
        pl.when(idx == row).then(pl.lit(value, pl.String)).otherwise(pl.col(column)).alias(column)
    )

"""Subprocess for the gc crash test: runs ``airlock gc`` (retention.collect) and freezes after
step N so the test can kill -9 it exactly there.
Usage: gc_worker.py DB_URL SCHEMA STATE_DIR POLICIES NOW_ISO N"""

import datetime as dt
import sys
import time
from pathlib import Path

from airlock.retention import collect, load_retention_policy
from airlock.service.core import AirlockService
from airlock.service.db import make_engine
from tre.registry import load_registry
from tre.settings import Settings

url, schema, state_dir, policies, now, stop_at = sys.argv[1:7]
settings = Settings(state_dir=Path(state_dir), policies_dir=Path(policies), airlock_db_url=url)
engine = make_engine(url, schema=schema or None)
steps = []


def hook(kind: str, what: str) -> None:
    steps.append(kind)
    if len(steps) - 1 == int(stop_at):
        print(f"AT {kind}", flush=True)
        time.sleep(3600)  # the test kills us here


service = AirlockService(settings, engine, load_registry(Path(policies)))
collect(
    service,
    load_retention_policy(Path(policies)),
    now=dt.datetime.fromisoformat(now),
    on_step=hook,
)
print("DONE " + " ".join(steps), flush=True)

"""Alembic environment: the engine is handed over by ``airlock.service.db.upgrade``."""

from __future__ import annotations

from alembic import context

from airlock.service.models import Base
from tre.audit import AuditBase

target_metadata = [Base.metadata, AuditBase.metadata]
engine = context.config.attributes.get("engine")
if engine is None:
    from airlock.service.db import make_engine
    from tre.settings import get_settings

    engine = make_engine(get_settings().airlock_db_url)

with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=target_metadata)
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()

"""Alembic environment: the URL comes from pgsage's settings (or the caller's config)."""

from __future__ import annotations

from sqlalchemy import create_engine, pool

import app.models  # noqa: F401  (registers every table)
from alembic import context
from app.config import get_settings
from app.db.base import Base
from app.db.session import database_url

config = context.config
target_metadata = Base.metadata


def _include_object(obj: object, name: str | None, type_: str, reflected: bool, compare_to: object) -> bool:
    """Per-model HNSW indexes are data made at run time, not part of the migrated schema."""
    return not (type_ == "index" and name is not None and "_hnsw_m" in name)


def _url() -> str:
    return config.get_main_option("sqlalchemy.url") or database_url(get_settings())


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata, include_object=_include_object)
        with context.begin_transaction():
            # Many processes may start at once (API, workers): serialise migrations.
            connection.exec_driver_sql("SELECT pg_advisory_xact_lock(727274)")
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()

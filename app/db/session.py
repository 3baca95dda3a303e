"""Engine and session scope; the caller at the boundary owns the transaction."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings


def database_url(settings: Settings) -> str:
    """The configured DATABASE_URL, or the embedded server under the data directory."""
    if settings.database_url:
        return settings.database_url
    from app.embedded import embedded_database_url

    return embedded_database_url(settings.data_dir)


def make_engine(settings: Settings, *, pool_size: int = 10) -> Engine:
    """One engine per process; pre-ping so a restarted Postgres is noticed, not fatal."""
    engine = create_engine(
        database_url(settings),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        pool_recycle=1800,
        connect_args={"connect_timeout": 5},
    )
    event.listen(engine, "connect", _register_vector)
    return engine


def _register_vector(dbapi_connection: Any, _: Any) -> None:
    """Teach psycopg the vector type (binary COPY of numpy rows); absent before the first migration."""
    from pgvector.psycopg import register_vector

    try:
        register_vector(dbapi_connection)
    except Exception:  # the extension is created by the first migration
        dbapi_connection.rollback()


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """Commit on success, roll back on any error."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()

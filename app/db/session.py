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


def make_engine(settings: Settings, *, pool_size: int = 10, url: str | None = None, connect_timeout: int = 5) -> Engine:
    """One engine per process (and one more for a read replica, at url); pre-ping so a restarted Postgres is
    noticed, not fatal."""
    engine = create_engine(
        url or database_url(settings),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        pool_recycle=1800,
        connect_args={"connect_timeout": connect_timeout},
    )
    event.listen(engine, "connect", _register_vector)
    event.listen(engine, "connect", _hnsw_defaults(settings))
    return engine


# Key of the HNSW settings a connection was opened with, in its pool record's info.
HNSW_DEFAULTS = "pgsage_hnsw_defaults"


def _hnsw_defaults(settings: Settings) -> Any:
    """Each connection starts with the configured HNSW search settings, so a query sets them only when it
    asks for others (one round trip less per search)."""
    ef, mst = settings.hnsw_ef_search, settings.hnsw_max_scan_tuples

    def apply(dbapi_connection: Any, record: Any) -> None:
        with dbapi_connection.cursor() as cur:
            cur.execute(
                "SELECT set_config('hnsw.ef_search', %s, false), set_config('hnsw.iterative_scan', "
                "'relaxed_order', false), set_config('hnsw.max_scan_tuples', %s, false)",
                (str(ef), str(mst)),
            )
        dbapi_connection.commit()
        # Read by app.query.retrieve through Connection.info, which is this record's.
        record.info[HNSW_DEFAULTS] = (ef, mst)

    return apply


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

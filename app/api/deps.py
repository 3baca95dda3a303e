"""Request dependencies: the process-wide objects built in the lifespan, and a session per request."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from app.api.ratelimit import Limiter
from app.config import Settings
from app.db.replica import ReadReplica
from app.query.pipeline import QueryPipeline


@dataclass
class Resources:
    """Heavy objects, built once per API process."""

    settings: Settings
    engine: Engine
    factory: sessionmaker[Session]
    query: QueryPipeline
    celery: Any
    limiter: Limiter  # requests per key
    failures: Limiter  # requests without a valid key, per client address
    metrics: Any  # the service-wide collectors of /metrics (app.metrics.service_registry)
    replica: ReadReplica | None = None  # PGSAGE_DATABASE_READ_URL: where searches and answers read


# Dependencies that do no I/O are `async def`: FastAPI runs a plain `def` dependency on its thread pool, and
# each such hop costs a question a few hundred microseconds.


async def get_resources(request: Request) -> Resources:
    return request.app.state.resources  # type: ignore[no-any-return]


async def get_session(resources: Annotated[Resources, Depends(get_resources)]) -> AsyncIterator[Session]:
    """A session whose transaction commits when the endpoint returns, and rolls back on error.

    Opening a session does no I/O (it connects on first use, on the thread that uses it); the commit or
    rollback runs on the thread pool, off the event loop.
    """
    session = resources.factory()
    try:
        yield session
        await run_in_threadpool(_finish, session, commit=True)
    except BaseException:
        await run_in_threadpool(_finish, session, commit=False)
        raise


def _finish(session: Session, *, commit: bool) -> None:
    try:
        if commit:
            session.commit()
        else:
            session.rollback()
    finally:
        session.close()


def get_read_session(resources: Annotated[Resources, Depends(get_resources)],
                     session: Annotated[Session, Depends(get_session, scope="function")]) -> Iterator[Session]:
    """Where a search or an answer reads: a session on the read replica that has caught up with the primary,
    else the request's own session on the primary. Declare it after the key check, so a refused request never
    reaches the replica."""
    replica = resources.replica.session(session) if resources.replica is not None else None
    if replica is None:
        yield session
        return
    try:
        yield replica
    finally:
        replica.close()  # read only: its transaction is rolled back


ResourcesDep = Annotated[Resources, Depends(get_resources)]
# scope="function": commit before the response is sent, so a client never reads its own write stale.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
# The key check is read on the primary (a revoked key stops at once); the search itself may read a replica.
ReadSessionDep = Annotated[Session, Depends(get_read_session, scope="function")]

"""Request dependencies: the process-wide objects built in the lifespan, and a session per request."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from app.api.ratelimit import Limiter
from app.config import Settings
from app.query.pipeline import QueryPipeline


@dataclass
class Resources:
    """Heavy objects, built once per API process."""

    settings: Settings
    engine: Engine
    factory: sessionmaker[Session]
    query: QueryPipeline
    celery: Any
    limiter: Limiter


def get_resources(request: Request) -> Resources:
    return request.app.state.resources  # type: ignore[no-any-return]


def get_session(resources: Annotated[Resources, Depends(get_resources)]) -> Iterator[Session]:
    """A session whose transaction commits when the endpoint returns, and rolls back on error."""
    session = resources.factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


ResourcesDep = Annotated[Resources, Depends(get_resources)]
# scope="function": commit before the response is sent, so a client never reads its own write stale.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]

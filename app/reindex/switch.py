"""Switch: make a complete space active in one transaction; roll back; retire old spaces after a while."""

from __future__ import annotations

import logging
import uuid

from sqlalchemy import text
from sqlalchemy.orm import Session

from app.errors import Conflict
from app.reindex import spaces
from app.reindex.plan import PLAN_LOCK

log = logging.getLogger(__name__)


def switch(session: Session, job_id: uuid.UUID, source_id: int, target_id: int) -> bool:
    """Atomically: the old space becomes retired (kept for rollback), the new one active, the job done.

    Returns False, switching nothing, if the job was cancelled meanwhile (it is no longer running).
    """
    session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": PLAN_LOCK})
    # The job row first: its row lock orders this against a concurrent cancel, which only touches open jobs.
    finished = session.execute(
        text(
            "UPDATE reindex_jobs SET status = 'succeeded', finished_at = now(), heartbeat_at = now() "
            "WHERE id = :id AND status = 'running'"
        ),
        {"id": job_id},
    )
    if not finished.rowcount:  # type: ignore[attr-defined]
        log.warning("re-index %s was stopped before its switch; the active space is unchanged", job_id)
        return False
    session.execute(
        text("UPDATE embedding_models SET status = 'retired', retired_at = now() WHERE id = :s AND status = 'active'"),
        {"s": source_id},
    )
    session.execute(
        text("UPDATE embedding_models SET status = 'active', activated_at = now(), retired_at = NULL WHERE id = :t"),
        {"t": target_id},
    )
    log.warning("switched the active embedding space %s -> %s", source_id, target_id)
    return True


def rollback(session: Session) -> tuple[int, int]:
    """Make the most recently retired space active again; the current one is marked rolled back."""
    session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": PLAN_LOCK})
    if session.execute(text("SELECT 1 FROM reindex_jobs WHERE status IN ('pending', 'running')")).first():
        raise Conflict("a re-index is running: cancel it first")
    previous = session.execute(
        text("SELECT id FROM embedding_models WHERE status = 'retired' ORDER BY retired_at DESC LIMIT 1")
    ).scalar()
    if previous is None:
        raise Conflict("there is no previous embedding space to roll back to (it may have been dropped)")
    current = session.execute(text("SELECT id FROM embedding_models WHERE status = 'active'")).scalar_one()
    session.execute(
        text("UPDATE embedding_models SET status = 'rolled_back', retired_at = now() WHERE id = :c"), {"c": current}
    )
    session.execute(
        text("UPDATE embedding_models SET status = 'active', activated_at = now(), retired_at = NULL WHERE id = :p"),
        {"p": previous},
    )
    log.warning("rolled back the active embedding space %s -> %s", current, previous)
    return int(current), int(previous)


def retire_expired(session: Session, retention_hours: float) -> list[int]:
    """Drop the vectors and indexes of spaces retired (or abandoned) longer ago than the retention time."""
    ids = (
        session.execute(
            text("""
        SELECT m.id FROM embedding_models m
         WHERE m.status IN ('retired', 'rolled_back', 'refused', 'cancelled', 'superseded')
           AND coalesce(m.retired_at, m.created_at) < now() - make_interval(secs => :h * 3600)
           AND EXISTS (SELECT 1 FROM chunk_vectors v WHERE v.model_id = m.id)
        """),
            {"h": retention_hours},
        )
        .scalars()
        .all()
    )
    for mid in ids:
        for table in spaces.VECTOR_TABLES:
            session.execute(text(f"DROP INDEX IF EXISTS {spaces.index_name(table, mid)}"))
            session.execute(text(f"DELETE FROM {table} WHERE model_id = :m"), {"m": mid})
        # Its chunk set goes too when no other space that is kept reads it.
        session.execute(
            text("""
            DELETE FROM chunks c USING embedding_models m
             WHERE m.id = :m AND c.chunker = 'v' || coalesce(m.params->>'chunker_version', '1') || ':'
                   || (m.params->>'chunk_max_tokens') || ':' || (m.params->>'chunk_overlap_tokens')
               AND NOT EXISTS (SELECT 1 FROM embedding_models o
                                WHERE o.id <> m.id AND o.status IN ('active', 'building', 'retired')
                                  AND o.params = m.params)
            """),
            {"m": mid},
        )
        # A rolled-back, refused or cancelled space keeps its status: its model is not re-indexed by itself.
        session.execute(
            text(
                "UPDATE embedding_models SET status = 'dropped' WHERE id = :m AND status IN ('retired', 'superseded')"
            ),
            {"m": mid},
        )
        log.warning("dropped embedding space %s", mid)
    return [int(i) for i in ids]

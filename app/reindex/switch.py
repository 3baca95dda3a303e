"""Switch: make a complete space active in one transaction; roll back; retire old spaces after a while."""

from __future__ import annotations

import logging
import uuid

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from app.db.session import make_sessionmaker, session_scope
from app.embedding import chunker_key
from app.errors import Conflict
from app.reindex import spaces
from app.reindex.plan import PLAN_LOCK

log = logging.getLogger(__name__)
# Statuses of spaces no query reads and no re-index builds; kept for a while, then dropped. 'dropping' is
# a drop that stopped half-way (it is finished); 'dropped' may still hold vectors a write in flight added.
DROPPABLE = ("retired", "rolled_back", "refused", "cancelled", "superseded", "failed", "dropping", "dropped")
# Rows deleted per transaction: each batch is short, so no lock is held long and vacuum can keep up.
RETIRE_BATCH = 5000


def switch(session: Session, job_id: uuid.UUID, source_id: int, target_id: int) -> bool:
    """Atomically: the old space becomes retired (kept for rollback), the new one active, the job done; a space
    retired by an earlier switch is superseded (see spaces.supersede_retired).

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
    # The space retired before stops receiving writes now (ingestion writes the active space and one retired):
    # it is no rollback target from here on, so no rollback can land where recent documents are missing.
    spaces.supersede_retired(session)
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
    """Make the rollback target (the space the last switch retired) active again; the current one is marked
    rolled back. Only that space is reachable: it alone has been written beside the active one since the switch
    (spaces.live), so it holds every document. Once rolled back to, no space is left to roll back to again."""
    session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": PLAN_LOCK})
    spaces.hold_writes(session)  # a write in flight finishes first; the next ones see the new spaces
    if session.execute(text("SELECT 1 FROM reindex_jobs WHERE status IN ('pending', 'running')")).first():
        raise Conflict("a re-index is running: cancel it first")
    previous = spaces.rollback_target(session)
    if previous is None:
        raise Conflict(
            "there is no previous embedding space to roll back to: only the space the last switch retired is kept "
            "up to date for a rollback, and it was rolled back to already or dropped (an earlier space missed the "
            "documents written since; `pgsage reindex --model NAME` builds it again)"
        )
    current = session.execute(text("SELECT id FROM embedding_models WHERE status = 'active'")).scalar_one()
    session.execute(
        text("UPDATE embedding_models SET status = 'rolled_back', retired_at = now() WHERE id = :c"), {"c": current}
    )
    session.execute(
        text("UPDATE embedding_models SET status = 'active', activated_at = now(), retired_at = NULL WHERE id = :p"),
        {"p": previous.id},
    )
    log.warning("rolled back the active embedding space %s -> %s", current, previous.id)
    return int(current), int(previous.id)


def retire_expired(engine: Engine, retention_hours: float, *, batch: int = RETIRE_BATCH) -> list[int]:
    """Drop the vectors, indexes and unused chunk sets of spaces retired (or abandoned) longer ago than the
    retention time, without blocking queries or writes.

    Each space is first marked 'dropping' under the plan lock (the lock of switch, rollback and plan), with
    its status checked again there: a rollback that made it active again meanwhile wins, and once it is
    marked no rollback, re-index or document write reaches it. Then its HNSW index is dropped
    CONCURRENTLY and its rows deleted in short batches, each its own transaction.
    """
    factory = make_sessionmaker(engine)
    with session_scope(factory) as session:
        candidates = session.execute(
            text(f"""
            SELECT m.id FROM embedding_models m
             WHERE m.status IN {DROPPABLE}
               AND coalesce(m.retired_at, m.created_at) < now() - make_interval(secs => :h * 3600)
               AND (m.status = 'dropping' OR EXISTS (SELECT 1 FROM chunk_vectors v WHERE v.model_id = m.id)
                    OR EXISTS (SELECT 1 FROM document_vectors v WHERE v.model_id = m.id))
             ORDER BY m.id"""),
            {"h": retention_hours},
        ).scalars().all()
    dropped = []
    for mid in candidates:
        with session_scope(factory) as session:
            session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": PLAN_LOCK})
            # Checked again under the lock: a rollback may have made it the active space meanwhile.
            was = session.execute(
                text(f"""
                UPDATE embedding_models m SET status = 'dropping' FROM embedding_models o
                 WHERE m.id = :m AND o.id = m.id AND m.status IN {DROPPABLE}
                   AND coalesce(m.retired_at, m.created_at) < now() - make_interval(secs => :h * 3600)
                RETURNING o.status, m.params"""),
                {"m": mid, "h": retention_hours},
            ).first()
        if was is None:
            log.warning("embedding space %s is in use again: not dropped", mid)
            continue
        with engine.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            for table in spaces.HNSW_TABLES:
                conn.execute(text(f"DROP INDEX CONCURRENTLY IF EXISTS {spaces.index_name(table, mid)}"))
            for table in spaces.VECTOR_TABLES:
                while conn.execute(
                    text(f"DELETE FROM {table} WHERE ctid = ANY(ARRAY("
                         f"SELECT ctid FROM {table} WHERE model_id = :m LIMIT {int(batch)}))"),
                    {"m": mid},
                ).rowcount:
                    pass
        _drop_unread_chunks(factory, chunker_key(was.params or {}), batch)
        with session_scope(factory) as session:
            # A rolled-back, refused or cancelled space keeps its status: its model is not re-indexed by itself.
            keep = was.status in ("rolled_back", "refused", "cancelled")
            session.execute(
                text("UPDATE embedding_models SET status = :s WHERE id = :m AND status = 'dropping'"),
                {"m": mid, "s": was.status if keep else "dropped"},
            )
        log.warning("dropped embedding space %s", mid)
        dropped.append(int(mid))
    return dropped


def _drop_unread_chunks(factory: sessionmaker[Session], chunker: str, batch: int) -> None:
    """Delete a chunk set (its chunks, and with them their postings) once no space that is kept reads it;
    in batches, each checking again under the plan lock (a re-index may start to read it meanwhile)."""
    while True:
        with session_scope(factory) as session:
            session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": PLAN_LOCK})
            kept = session.execute(text(
                "SELECT params FROM embedding_models WHERE status IN ('active', 'building', 'retired')")).scalars()
            if chunker in {chunker_key(p or {}) for p in kept}:
                return
            deleted = session.execute(
                text(f"DELETE FROM chunks WHERE id = ANY(ARRAY(SELECT id FROM chunks WHERE chunker = :ck "
                     f"LIMIT {int(batch)}))"),
                {"ck": chunker},
            ).rowcount  # type: ignore[attr-defined]
        if not deleted:
            return

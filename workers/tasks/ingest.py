"""Ingest tasks: ids in, the pipeline does the work."""

from __future__ import annotations

import logging
import uuid

from sqlalchemy.exc import OperationalError

from workers.celery_app import celery_app
from workers.resources import resources

log = logging.getLogger(__name__)


@celery_app.task(
    name="ingest.process_documents",
    bind=True,
    autoretry_for=(OperationalError,),
    retry_backoff=True,
    retry_backoff_max=60,
    max_retries=8,
)
def process_documents(self: object, job_id: str | None, document_ids: list[str]) -> dict[str, int]:
    """Chunk, embed and store these documents; safe to run twice."""
    job = uuid.UUID(job_id) if job_id else None
    outcome = resources().ingest.process(job, [uuid.UUID(d) for d in document_ids])
    return {"indexed": outcome.indexed, "failed": outcome.failed, "skipped": outcome.skipped}


@celery_app.task(
    name="collections.delete",
    autoretry_for=(OperationalError,),
    retry_backoff=True,
    retry_backoff_max=60,
    max_retries=8,
)
def delete_collection(job_id: str) -> int:
    """Remove a deleted collection's documents in batches, then the collection; safe to run twice."""
    from app.config import get_settings
    from app.db.session import session_scope
    from app.ingest import store

    job, batch, total = uuid.UUID(job_id), get_settings().delete_batch_documents, 0
    while True:
        with session_scope(resources().factory) as session:
            deleted = store.delete_collection_batch(session, job, batch)
        if not deleted:
            with session_scope(resources().factory) as session:
                store.compact_lexical_statistics(session)
            log.info("collection delete %s finished: %d documents removed", job_id, total)
            return total
        total += deleted


@celery_app.task(name="ingest.requeue_stalled")
def requeue_stalled() -> int:
    """Send again the documents whose task was lost or whose worker died; processing is idempotent."""
    from app.config import get_settings
    from app.db.session import session_scope
    from app.ingest import store

    settings = get_settings()
    with session_scope(resources().factory) as session:
        ids = store.claim_stalled(session, settings.ingest_stall_minutes, settings.ingest_lease_seconds, 10_000)
    batch = settings.ingest_batch_documents
    for i in range(0, len(ids), batch):
        process_documents.delay(None, [str(d) for d in ids[i : i + batch]])
    if ids:
        log.warning("re-queued %d stalled documents", len(ids))
    with session_scope(resources().factory) as session:
        deletes = store.stalled_collection_deletes(session, settings.ingest_stall_minutes)
    for job in deletes:
        log.warning("re-sending collection delete %s: it has not advanced", job)
        delete_collection.delay(str(job))
    # BM25 statistics deltas from writes outside an ingest batch (a re-index's new chunk set, a retired one).
    with session_scope(resources().factory) as session:
        store.compact_lexical_statistics(session)
    return len(ids)

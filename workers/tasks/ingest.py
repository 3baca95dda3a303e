"""Ingest tasks: ids in, the pipeline does the work."""

from __future__ import annotations

import logging
import uuid

from celery.signals import worker_process_init
from sqlalchemy.exc import OperationalError

from workers.celery_app import celery_app
from workers.resources import ingest_pipeline

log = logging.getLogger(__name__)


@worker_process_init.connect
def _warm(**_: object) -> None:
    """Load the model when a worker process starts, not inside the first task."""
    ingest_pipeline()


@celery_app.task(name="ingest.process_documents", bind=True, autoretry_for=(OperationalError,),
                 retry_backoff=True, retry_backoff_max=60, max_retries=8)
def process_documents(self: object, job_id: str, document_ids: list[str]) -> dict[str, int]:
    """Chunk, embed and store these documents; safe to run twice."""
    outcome = ingest_pipeline().process(uuid.UUID(job_id), [uuid.UUID(d) for d in document_ids])
    return {"indexed": outcome.indexed, "failed": outcome.failed, "skipped": outcome.skipped}

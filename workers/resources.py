"""Heavy objects of a worker process, built once (at process init) and reused by every task."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings, get_settings
from app.db.session import make_engine, make_sessionmaker
from app.embedding import EmbedderPool, worker_embedders
from app.ingest.pipeline import IngestPipeline
from app.reindex.pipeline import ReindexPipeline

log = logging.getLogger(__name__)
_lock = threading.Lock()
_resources: WorkerResources | None = None


@dataclass
class WorkerResources:
    settings: Settings
    engine: Engine
    factory: sessionmaker[Session]
    embedders: EmbedderPool
    ingest: IngestPipeline
    reindex: ReindexPipeline


def resources() -> WorkerResources:
    """The process's engine, models and pipelines, built on first use."""
    global _resources
    with _lock:
        if _resources is None:
            settings = get_settings()
            if settings.worker_nice:
                os.nice(settings.worker_nice)
            engine = make_engine(settings, pool_size=3)
            factory = make_sessionmaker(engine)
            embedders = worker_embedders(settings)
            _resources = WorkerResources(
                settings=settings,
                engine=engine,
                factory=factory,
                embedders=embedders,
                ingest=IngestPipeline(factory, embedders),
                reindex=ReindexPipeline(settings, engine, factory, embedders),
            )
            log.info("worker resources ready (model %s, %d threads, %d lanes)", embedders.configured.spec.fingerprint,
                     settings.worker_embed_threads, embedders.configured.lanes)
        return _resources

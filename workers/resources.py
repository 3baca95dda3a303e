"""Heavy objects of a worker process, built once (at process init) and reused by every task."""

from __future__ import annotations

import logging
import threading

from app.config import get_settings
from app.db.session import make_engine, make_sessionmaker
from app.embedding import Embedder
from app.ingest.pipeline import IngestPipeline

log = logging.getLogger(__name__)
_lock = threading.Lock()
_ingest: IngestPipeline | None = None


def ingest_pipeline() -> IngestPipeline:
    """The process's ingest pipeline (engine + embedder), built on first use."""
    global _ingest
    with _lock:
        if _ingest is None:
            settings = get_settings()
            engine = make_engine(settings, pool_size=2)
            _ingest = IngestPipeline(make_sessionmaker(engine), Embedder(settings))
            log.info("worker resources ready (model %s)", _ingest.embedder.spec.fingerprint)
        return _ingest

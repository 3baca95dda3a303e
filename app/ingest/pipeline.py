"""Ingest pipeline: load (done at the request) -> chunk -> embed -> store, one transaction per document."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from app.db.session import session_scope
from app.embedding import Embedder
from app.ingest import store
from app.ingest.chunk import ChunkSpan, Chunker
from app.ingest.embed import embed_documents
from app.reindex import spaces

log = logging.getLogger(__name__)


@dataclass
class IngestOutcome:
    indexed: int = 0
    failed: int = 0
    skipped: int = 0


class IngestPipeline:
    """Chunks, embeds and stores queued documents; built once per worker process."""

    def __init__(self, factory: sessionmaker[Session], embedder: Embedder) -> None:
        self.factory = factory
        self.embedder = embedder
        self.chunker = Chunker(embedder.tokenizer, embedder.chunk_max_tokens,
                               embedder.settings.chunk_overlap_tokens)
        with session_scope(factory) as session:
            self.space_id = spaces.register(session, embedder.spec).id

    def process(self, job_id: uuid.UUID | None, doc_ids: Sequence[uuid.UUID]) -> IngestOutcome:
        """Index the given documents; each succeeds or fails on its own."""
        outcome = IngestOutcome()
        with session_scope(self.factory) as session:
            pending = store.pending_documents(session, doc_ids)
        chunked: list[list[ChunkSpan]] = []
        ready = []
        for doc in pending:
            try:
                chunks = self.chunker.split(doc.content)
                if not chunks:
                    raise ValueError("the document has no text to index")
            except Exception as exc:  # one bad document must not sink the batch
                log.exception("chunking failed for %s", doc.id)
                self._fail(doc.id, f"chunking failed: {exc}")
                outcome.failed += 1
                continue
            chunked.append(chunks)
            ready.append(doc)
        vectors = embed_documents(self.embedder, chunked)
        for doc, chunks, matrix in zip(ready, chunked, vectors, strict=True):
            try:
                with session_scope(self.factory) as session:
                    written = store.write_document(session, doc, chunks, {self.space_id: matrix})
            except Exception as exc:
                log.exception("storing failed for %s", doc.id)
                self._fail(doc.id, f"storing failed: {exc}")
                outcome.failed += 1
                continue
            if written:
                outcome.indexed += 1
            else:
                outcome.skipped += 1
        if job_id is not None:
            # Documents indexed by an earlier delivery, or superseded, still settle this job's items.
            with session_scope(self.factory) as session:
                store.settle_job_items(session, job_id, doc_ids)
        return outcome

    def _fail(self, doc_id: uuid.UUID, error: str) -> None:
        with session_scope(self.factory) as session:
            store.mark_failed(session, doc_id, error)

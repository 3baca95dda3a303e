"""Ingest pipeline: load (done at the request) -> chunk -> embed -> store, one transaction per document."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from app.db.session import session_scope
from app.embedding import Embedder, EmbedderPool
from app.ingest import store
from app.ingest.chunk import Chunker, ChunkSpan
from app.ingest.embed import embed_documents
from app.reindex import spaces

log = logging.getLogger(__name__)

# Documents are written by this many threads, each document in its own transaction as before. Most of
# a write is Postgres inserting the vectors into the HNSW indexes, one backend on one core while the
# worker waits; two connections keep both cores of a small machine busy. Measured on SciFact (5,000
# documents into indexed tables): store time 64 s -> 33 s. Every write locks only its own document.
STORE_THREADS = 2


@dataclass
class IngestOutcome:
    indexed: int = 0
    failed: int = 0
    skipped: int = 0


class IngestPipeline:
    """Chunks, embeds and stores queued documents; built once per worker process."""

    def __init__(self, factory: sessionmaker[Session], embedders: EmbedderPool) -> None:
        self.factory = factory
        self.embedders = embedders
        embedder = embedders.configured
        self.chunker = Chunker(embedder.tokenizer, embedder.chunk_max_tokens, embedder.settings.chunk_overlap_tokens)

    def _targets(self) -> list[tuple[int, Embedder]]:
        """The spaces to write: the active one, and the new one while a re-index builds it."""
        with session_scope(self.factory) as session:
            live = spaces.live(session)
        targets = []
        for space in live:
            try:
                targets.append((space.id, self.embedders.for_space(space)))
            except ValueError:
                # Its model is gone from this machine; the re-index sweep (or a rollback) covers it.
                log.exception("cannot write to embedding space %s", space.id)
        return targets

    def process(self, job_id: uuid.UUID | None, doc_ids: Sequence[uuid.UUID]) -> IngestOutcome:
        """Index the given documents; each succeeds or fails on its own."""
        outcome = IngestOutcome()
        started = time.perf_counter()
        with session_scope(self.factory) as session:
            pending = store.pending_documents(session, doc_ids)
        loaded = time.perf_counter()
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
        chunked_at = time.perf_counter()
        per_space = [(space_id, embed_documents(embedder, chunked)) for space_id, embedder in self._targets()]
        embedded = time.perf_counter()

        def write(i: int) -> str:
            doc = ready[i]
            try:
                vectors = {sid: vecs[i] for sid, vecs in per_space}
                with session_scope(self.factory) as session:
                    written = store.write_document(session, doc, chunked[i], vectors)
            except Exception as exc:
                log.exception("storing failed for %s", doc.id)
                self._fail(doc.id, f"storing failed: {exc}")
                return "failed"
            return "indexed" if written else "skipped"

        with ThreadPoolExecutor(STORE_THREADS, thread_name_prefix="ingest-store") as writers:
            results = list(writers.map(write, range(len(ready))))
        outcome.indexed += results.count("indexed")
        outcome.failed += results.count("failed")
        outcome.skipped += results.count("skipped")
        if job_id is not None:
            # Documents indexed by an earlier delivery, or superseded, still settle this job's items.
            with session_scope(self.factory) as session:
                store.settle_job_items(session, job_id, doc_ids)
        done = time.perf_counter()
        log.info(
            "ingest batch: %d documents, %d chunks (%d indexed, %d failed, %d skipped); "
            "load %.3fs chunk %.3fs embed %.3fs store %.3fs",
            len(doc_ids),
            sum(len(c) for c in chunked),
            outcome.indexed,
            outcome.failed,
            outcome.skipped,
            loaded - started,
            chunked_at - loaded,
            embedded - chunked_at,
            done - embedded,
        )
        return outcome

    def _fail(self, doc_id: uuid.UUID, error: str) -> None:
        with session_scope(self.factory) as session:
            store.mark_failed(session, doc_id, error)

"""Re-index pipeline: plan (detect) -> backfill beside the old space -> build the index -> switch."""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass

from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.db.session import session_scope
from app.embedding import Embedder, EmbedderPool, chunker_key
from app.ingest.chunk import Chunker
from app.ingest.embed import embed_documents
from app.ingest.pipeline import chunker_for, split_document
from app.ingest.store import ChunkSet, PendingDocument
from app.metrics import add_counts, record_counts
from app.models import EmbeddingModel
from app.models.embedding import index_type
from app.reindex import backfill, quality, spaces
from app.reindex.switch import switch

log = logging.getLogger(__name__)


@dataclass
class ReindexOutcome:
    status: str
    embedded: int = 0


class ReindexPipeline:
    """Runs one re-index job to its end; safe to start twice (a per-job advisory lock) and to resume."""

    def __init__(self, settings: Settings, engine: Engine, factory: sessionmaker[Session], pool: EmbedderPool) -> None:
        self.settings = settings
        self.engine = engine
        self.factory = factory
        self.pool = pool

    def run(self, job_id: uuid.UUID) -> ReindexOutcome:
        # A session-level lock: released by Postgres if this worker dies, so a restart can resume.
        with self.engine.connect() as lock_conn:
            key = lock_conn.execute(text("SELECT hashtextextended(:j, 0)"), {"j": str(job_id)}).scalar_one()
            if not lock_conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar_one():
                lock_conn.commit()
                return ReindexOutcome("running elsewhere")
            lock_conn.commit()
            try:
                return self._run(job_id)
            except OperationalError:
                raise  # the database is away: transient, the task retries (a bounded number of times)
            except Exception as exc:
                # Anything else no retry can mend (a quality gate without its collection, a broken setting):
                # the job fails with the reason instead of being sent again for ever.
                log.exception("re-index %s failed", job_id)
                self._fail(job_id, f"{type(exc).__name__}: {getattr(exc, 'message', None) or exc}")
                return ReindexOutcome("failed")
            finally:
                lock_conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                lock_conn.commit()

    def _job(self, session: Session, job_id: uuid.UUID) -> dict[str, object] | None:
        row = session.execute(text("SELECT * FROM reindex_jobs WHERE id = :id"), {"id": job_id}).mappings().first()
        return dict(row) if row else None

    def fail(self, job_id: uuid.UUID, error: str) -> None:
        """Fail an open job with its reason; its new space is marked failed."""
        self._fail(job_id, error)

    def _fail(self, job_id: uuid.UUID, error: str) -> None:
        with session_scope(self.factory) as session:
            session.execute(
                text(
                    "UPDATE reindex_jobs SET status = 'failed', error = :e, finished_at = now() "
                    "WHERE id = :id AND status IN ('pending', 'running')"
                ),
                {"id": job_id, "e": error[:2000]},
            )
            session.execute(
                text(
                    "UPDATE embedding_models SET status = 'failed' WHERE status = 'building' AND id = "
                    "(SELECT target_model_id FROM reindex_jobs WHERE id = :id)"
                ),
                {"id": job_id},
            )

    def _run(self, job_id: uuid.UUID) -> ReindexOutcome:
        with session_scope(self.factory) as session:
            job = self._job(session, job_id)
            if job is None or job["status"] not in ("pending", "running"):
                return ReindexOutcome(str(job["status"]) if job else "gone")
            target = spaces.by_id(session, int(job["target_model_id"]))  # type: ignore[call-overload]
            source_id = int(job["source_model_id"])  # type: ignore[call-overload]
            session.execute(
                text(
                    "UPDATE reindex_jobs SET status = 'running', started_at = coalesce(started_at, now()), "
                    "heartbeat_at = now() WHERE id = :id"
                ),
                {"id": job_id},
            )
            cursor = int(job["cursor"])  # type: ignore[call-overload]
        try:
            embedder = self.pool.for_space(target)
        except Exception as exc:
            log.exception("re-index %s cannot load its model", job_id)
            self._fail(job_id, f"cannot load the new model: {exc}")
            return ReindexOutcome("failed")

        embedded = 0
        batch_size = self.settings.reindex_batch_chunks
        with session_scope(self.factory) as session:
            source_chunker = chunker_key(spaces.by_id(session, source_id).params or {})
        target_chunker = chunker_key(target.params or {})
        # A new chunker means new chunks: documents are re-chunked from their stored content.
        rechunk = target_chunker != source_chunker
        chunker = chunker_for(embedder) if rechunk else None
        tried: set[uuid.UUID] = set()  # documents that gave no chunks are not asked for again
        for _round in range(5):
            sweeping = False
            while True:
                with session_scope(self.factory) as session:
                    status = session.execute(
                        text("SELECT status FROM reindex_jobs WHERE id = :id"), {"id": job_id}
                    ).scalar()
                    if status != "running":
                        log.warning("re-index %s stopped: %s", job_id, status)
                        return ReindexOutcome(str(status), embedded)
                    if chunker is not None:
                        docs = backfill.documents_to_rechunk(session, target_chunker, max(1, batch_size // 8))
                    else:
                        batch = backfill.next_batch(session, target.id, target_chunker, 0 if sweeping else cursor,
                                                    batch_size)
                if chunker is not None:
                    docs = [d for d in docs if d.id not in tried]
                    if not docs:
                        break
                    tried.update(d.id for d in docs)
                    embedded += self._rechunk(job_id, target.id, target_chunker, chunker, embedder, docs)
                    continue
                if batch is None:
                    if sweeping:
                        break
                    # Past the end: sweep from the start for chunks written out of id order meanwhile.
                    sweeping = True
                    continue
                t0 = time.perf_counter()
                [vectors] = embed_documents(embedder, [batch.chunks])
                seconds = time.perf_counter() - t0
                with session_scope(self.factory) as session:
                    add_counts(session, {("embedding_seconds", "reindex"): seconds,
                                         ("embedded_chunks", "reindex"): len(batch.chunks)})
                    embedded += backfill.write_batch(
                        session, job_id, target.id, batch, vectors, advance_cursor=not sweeping
                    )
                if not sweeping:
                    cursor = batch.max_id
            with session_scope(self.factory) as session:
                backfill.write_document_vectors(session, target.id, target.dimension)
            self._build_index(target.id)
            if self.settings.reindex_eval_dir is not None and not self._passes_quality_gate(job_id, source_id, target):
                return ReindexOutcome("refused", embedded)
            with session_scope(self.factory) as session:
                # Hold off document writes while checking completeness and switching, so nothing slips between.
                spaces.hold_writes(session)
                if backfill.missing_count(session, target.id, target_chunker, rechunk) == 0:
                    if switch(session, job_id, source_id, target.id):
                        return ReindexOutcome("succeeded", embedded)
                    return ReindexOutcome("stopped before the switch", embedded)
        self._fail(job_id, "chunks kept arriving without vectors in the new space; giving up after 5 rounds")
        return ReindexOutcome("failed", embedded)

    def _rechunk(
        self, job_id: uuid.UUID, target_id: int, key: str, chunker: Chunker, embedder: Embedder,
        docs: list[PendingDocument],
    ) -> int:
        """Chunk and embed a batch of documents into the new chunk set; each written in its own transaction."""
        chunked = [split_document(chunker, doc) for doc in docs]
        t0 = time.perf_counter()
        vectors = embed_documents(embedder, chunked)
        record_counts(self.factory, {("embedding_seconds", "reindex"): time.perf_counter() - t0,
                                     ("embedded_chunks", "reindex"): sum(len(c) for c in chunked)})
        added = 0
        for doc, chunks, embedded in zip(docs, chunked, vectors, strict=True):
            if not chunks:
                continue
            with session_scope(self.factory) as session:
                added += backfill.write_rechunked(session, job_id, doc, ChunkSet(key, chunks, {target_id: embedded}))
        return added

    def _passes_quality_gate(self, job_id: uuid.UUID, source_id: int, target: EmbeddingModel) -> bool:
        """Evaluate both spaces on the labelled set; record the figures; refuse the switch if quality drops."""
        with session_scope(self.factory) as session:
            source = spaces.by_id(session, source_id)
            old = quality.space_quality(session, self.settings, source, self.pool.for_space(source))
            new = quality.space_quality(session, self.settings, target, self.pool.for_space(target))
            verdict = quality.gate(old, new, self.settings.reindex_eval_margin)
            session.execute(
                text(
                    "UPDATE reindex_jobs SET quality = CAST(:q AS jsonb), status = CASE WHEN :ok THEN status "
                    "ELSE 'refused' END, error = :e, finished_at = CASE WHEN :ok THEN NULL ELSE now() END "
                    "WHERE id = :id"
                ),
                {"q": json.dumps(verdict), "ok": verdict["passed"], "e": verdict["reason"], "id": job_id},
            )
            if not verdict["passed"]:
                session.execute(text("UPDATE embedding_models SET status = 'refused' WHERE id = :t"), {"t": target.id})
                log.warning("re-index %s %s", job_id, verdict["reason"])
        return bool(verdict["passed"])

    def _build_index(self, space_id: int) -> None:
        """Build the new space's HNSW indexes without blocking writes (CONCURRENTLY, outside a transaction)."""
        started = time.perf_counter()
        with self.engine.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            space = conn.execute(
                text("SELECT id, dimension, params FROM embedding_models WHERE id = :i"), {"i": space_id}
            ).one()
            spaces.build_memory(conn, self.settings.hnsw_build_memory)
            for table in spaces.HNSW_TABLES:
                name = spaces.index_name(table, space.id)
                valid = conn.execute(
                    text(
                        "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                        "WHERE c.relname = :n"
                    ),
                    {"n": name},
                ).scalar()
                if valid is False:  # left behind by a build that was killed
                    conn.execute(text(f"DROP INDEX CONCURRENTLY IF EXISTS {name}"))
                conn.execute(text(spaces.index_statement(table, space.id, space.dimension, index_type(space.params),
                                                         graph=spaces.HnswGraph.of(self.settings),
                                                         concurrently=True)))
            conn.execute(text("RESET maintenance_work_mem"))  # the connection goes back to the pool
        log.info("built the HNSW indexes of space %s in %.1fs", space_id, time.perf_counter() - started)

"""Ingest pipeline: load (done at the request) -> chunk -> embed -> store, one transaction per embedded group."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from app.db.session import session_scope
from app.embedding import Embedder, EmbedderPool, chunker_key
from app.ingest import store
from app.ingest.chunk import Chunker, ChunkSpan
from app.ingest.embed import Embedded, embed_documents
from app.metrics import record_counts
from app.reindex import spaces

log = logging.getLogger(__name__)

# Groups of documents are written by this many threads, each group in its own transaction. Most of a
# write is Postgres inserting the vectors into the HNSW indexes, one backend on one core while the
# worker waits; two connections keep both cores of a small machine busy. Measured on SciFact (5,000
# documents into indexed tables): store time 64 s -> 33 s. Every write locks only its own documents.
STORE_THREADS = 2
# Chunks embedded together before their documents are handed to the writers: large enough that the
# model's length-sorted batches stay full, small enough that writing overlaps the next group's encode.
EMBED_GROUP_CHUNKS = 128
# Fresh documents are claimed (their attempt counted) this many at a time, in one statement: a claim per
# document cost ~13 s of the 390 s SciFact ingest. If the process dies, all of a block come back as
# suspects and are then processed one at a time.
CLAIM_BLOCK = 16
# A document whose spaces change while it is embedded (a re-index opens, switches or is rolled back) is
# embedded again for the new ones; each pass needs another change, so a few passes are plenty.
RETARGET_PASSES = 4


def chunker_for(embedder: Embedder) -> Chunker:
    """The chunker of an embedder's space: its tokenizer, its chunk budget and overlap."""
    return Chunker(embedder.tokenizer, embedder.chunk_max_tokens, embedder.spec.chunk_overlap_tokens)


def split_document(chunker: Chunker, doc: store.PendingDocument) -> list[ChunkSpan]:
    """A stored document's chunks, read as its format says, under its title."""
    return chunker.split(doc.content, kind=doc.format, title=doc.title)


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
        self.max_attempts = embedder.settings.ingest_max_attempts
        self.task_time_limit = embedder.settings.ingest_task_time_limit
        self.lease_seconds = embedder.settings.ingest_lease_seconds
        self.chunkers: dict[str, Chunker] = {}

    def chunker(self, key: str, embedder: Embedder) -> Chunker:
        """The chunker of a chunk set, built once; its budget and overlap are the set's own."""
        if key not in self.chunkers:
            self.chunkers[key] = chunker_for(embedder)
        return self.chunkers[key]

    def _targets(self) -> list[tuple[int, str, Embedder]]:
        """The spaces to write, the active one first, then the new one while a re-index builds it."""
        with session_scope(self.factory) as session:
            live = sorted(spaces.live(session), key=lambda s: s.status != "active")
        targets = []
        for space in live:
            try:
                targets.append((space.id, chunker_key(space.params or {}), self.embedders.for_space(space)))
            except ValueError:
                # Its model is gone from this machine; the re-index sweep (or a rollback) covers it.
                log.exception("cannot write to embedding space %s", space.id)
        return targets

    def process(self, job_id: uuid.UUID | None, doc_ids: Sequence[uuid.UUID]) -> IngestOutcome:
        """Index the given documents; each succeeds or fails on its own.

        Documents are claimed (their attempt counted) in blocks of CLAIM_BLOCK before they are chunked,
        and they are embedded in groups of about EMBED_GROUP_CHUNKS chunks; each group is handed to the writer
        threads while the next one is embedded, so the Postgres side (COPY, HNSW inserts, BM25
        postings) runs beside the model instead of after it.

        If the process dies (a crash, a kill, the time limit), the documents it had claimed are sent
        again once their claim is stale. Those come back with attempts > 0 and are processed one at a
        time, after the others, so a document that kills its worker takes down only itself, and after
        PGSAGE_INGEST_MAX_ATTEMPTS it fails with the reason recorded.

        The spaces to write are read again for each group, and each write checks them under the lock a
        switch or rollback takes: a document whose spaces changed between its embedding and its write (a
        re-index opened, switched, was rolled back) is embedded again for the spaces live now, in another pass.
        """
        outcome = IngestOutcome()
        started = time.perf_counter()
        with session_scope(self.factory) as session:
            pending = store.pending_documents(session, doc_ids)
            store.hold(session, [d.id for d in pending])
        loaded = time.perf_counter()
        timings = {"chunk": 0.0, "embed": 0.0, "store": 0.0, "chunks": 0.0}
        batch, claimed = pending, False
        for _pass in range(RETARGET_PASSES):
            batch = self._index(batch, claimed, outcome, timings)
            if not batch:
                break
            claimed = True
            log.warning("%d documents met embedding spaces that changed while they were embedded; "
                        "embedding them again for the spaces live now", len(batch))
        else:
            # They stay queued under this worker's claim; the stalled sweep sends them again.
            log.error("%d documents left queued: the embedding spaces kept changing under them", len(batch))
        if job_id is not None:
            # Documents indexed by an earlier delivery, or superseded, still settle this job's items.
            with session_scope(self.factory) as session:
                store.settle_job_items(session, job_id, doc_ids)
        with session_scope(self.factory) as session:
            store.compact_lexical_statistics(session)  # fold this batch's BM25 statistics deltas in
        with session_scope(self.factory) as session:
            analysed = store.analyze_grown(session)  # so the next questions are planned for the tables as they are
        if analysed:
            log.info("analysed %s after this batch", ", ".join(analysed))
        record_counts(self.factory, {
            ("ingest_documents", "indexed"): outcome.indexed, ("ingest_documents", "failed"): outcome.failed,
            ("ingest_documents", "skipped"): outcome.skipped, ("ingest_chunks", ""): timings["chunks"],
            ("embedding_seconds", "ingest"): timings["embed"], ("embedded_chunks", "ingest"): timings["chunks"],
        })
        log.info(
            "ingest batch: %d documents, %d chunks (%d indexed, %d failed, %d skipped); "
            "load %.3fs chunk %.3fs embed %.3fs store %.3fs",
            len(doc_ids),
            timings["chunks"],
            outcome.indexed,
            outcome.failed,
            outcome.skipped,
            loaded - started,
            timings["chunk"],
            timings["embed"],
            timings["store"],
        )
        return outcome

    def _index(
        self, pending: list[store.PendingDocument], claimed: bool, outcome: IngestOutcome, timings: dict[str, float]
    ) -> list[store.PendingDocument]:
        """One pass over the documents with the spaces live now; the documents to embed again (see process)."""
        targets = self._targets()
        # One chunk set per chunker the live spaces read (two only while a re-index changes the chunking).
        chunkers = {key: self.chunker(key, embedder) for _, key, embedder in targets}
        primary = targets[0][1] if targets else None
        docs: list[store.PendingDocument] = []
        chunked: list[dict[str, list[ChunkSpan]]] = []

        def write(group: list[int], vectors: list[dict[int, tuple[str, Embedded]]]) -> list[str]:
            """Store a group of documents in one transaction; if that fails, each on its own, so that one bad
            document fails alone. The group shares its spaces (they are read once per group)."""
            try:
                with session_scope(self.factory) as session:
                    if spaces.unwritten(session, set(vectors[0])):
                        return ["retarget"] * len(group)
                    written = store.write_documents(
                        session, [store.DocumentWrite(docs[i], chunk_sets(i, v)) for i, v in zip(group, vectors,
                                                                                                   strict=True)])
            except OperationalError:
                raise  # the database is away: the task is retried, the documents stay queued
            except Exception as exc:
                if len(group) > 1:
                    log.warning("storing a group of %d documents failed (%s); storing them one at a time",
                                len(group), exc)
                    return [write([i], [v])[0] for i, v in zip(group, vectors, strict=True)]
                log.exception("storing failed for %s", docs[group[0]].id)
                self._fail(docs[group[0]], f"storing failed: {exc}")
                return ["failed"]
            return ["indexed" if written[docs[i].id] else "skipped" for i in group]

        def chunk_sets(i: int, vectors: dict[int, tuple[str, Embedded]]) -> list[store.ChunkSet]:
            """One set per chunker the spaces read, the active space's first (its postings are kept)."""
            keys = dict.fromkeys(key for key, _ in vectors.values())
            return [store.ChunkSet(key, chunked[i][key], {sid: v for sid, (k, v) in vectors.items() if k == key})
                    for key in keys]

        with ThreadPoolExecutor(STORE_THREADS, thread_name_prefix="ingest-store") as writers:
            futures: list[tuple[list[int], Future[list[str]]]] = []

            waiting = {d.id for d in pending}
            held = time.monotonic()

            def flush(group: list[int]) -> None:
                nonlocal held, targets
                if not group:
                    return
                # Read again for each group: a re-index opened or switched since goes into this group's writes.
                targets = self._targets()
                for _, key, embedder in targets:
                    chunkers.setdefault(key, self.chunker(key, embedder))
                for i in group:
                    for key in chunkers.keys() - chunked[i].keys():
                        chunked[i][key] = split_document(chunkers[key], docs[i])
                t0 = time.perf_counter()
                per_space = [(sid, key, embed_documents(embedder, [chunked[i][key] for i in group]))
                             for sid, key, embedder in targets]
                timings["embed"] += time.perf_counter() - t0
                # The group is written in one transaction (store.write_documents), beside the next group's encode.
                futures.append((group, writers.submit(
                    write, group, [{sid: (key, vecs[j]) for sid, key, vecs in per_space} for j in range(len(group))])))
                waiting.difference_update(docs[i].id for i in group)
                if time.monotonic() - held > self.lease_seconds / 3:
                    with session_scope(self.factory) as session:
                        store.hold(session, list(waiting))  # renew the claim on the rest of the batch
                    held = time.monotonic()

            # Fresh documents are claimed CLAIM_BLOCK at a time (one statement); suspects one at a time,
            # and only once the group before them is embedded, so that if a suspect kills the process
            # again, that attempt is charged to it alone. Documents of a later pass are claimed already.
            passes: tuple[tuple[list[store.PendingDocument], int], ...]
            if claimed:
                passes = ((pending, max(len(pending), 1)),)
            else:
                passes = (([d for d in pending if d.attempts == 0], CLAIM_BLOCK),
                          ([d for d in pending if d.attempts > 0], 1))
            for batch, block in passes:
                group: list[int] = []
                size = 0
                for start in range(0, len(batch), block):
                    if block == 1 and group:
                        flush(group)
                        group, size = [], 0
                    taken = batch[start : start + block] if claimed else self._claim(batch[start : start + block],
                                                                                      outcome)
                    for doc in taken:
                        t0 = time.perf_counter()
                        try:
                            sets = {key: split_document(c, doc) for key, c in chunkers.items()}
                            if not primary or not sets[primary]:
                                raise ValueError("the document has no text to index")
                        except Exception as exc:  # one bad document must not sink the batch
                            log.exception("chunking failed for %s", doc.id)
                            self._fail(doc, f"chunking failed: {exc}")
                            outcome.failed += 1
                            continue
                        finally:
                            timings["chunk"] += time.perf_counter() - t0
                        chunks = sets[primary]
                        if group and size + len(chunks) > EMBED_GROUP_CHUNKS:
                            flush(group)
                            group, size = [], 0
                        docs.append(doc)
                        chunked.append(sets)
                        group.append(len(docs) - 1)
                        size += len(chunks)
                flush(group)
            embedded = time.perf_counter()
            outcomes = {i: r for group, f in futures for i, r in zip(group, f.result(), strict=True)}
            results = [outcomes[i] for i in range(len(docs))]
        # "store" is the write time left after the last group is embedded (the rest overlapped it).
        timings["store"] += time.perf_counter() - embedded
        timings["chunks"] += sum(len(c[primary]) for c in chunked if primary)
        outcome.indexed += results.count("indexed")
        outcome.failed += results.count("failed")
        outcome.skipped += results.count("skipped")
        return [docs[i] for i, r in enumerate(results) if r == "retarget"]

    def _claim(self, batch: list[store.PendingDocument], outcome: IngestOutcome) -> list[store.PendingDocument]:
        """Count this attempt for each; the documents to go ahead with. One that has used up its attempts
        is failed with the reason; one no longer queued is skipped."""
        with session_scope(self.factory) as session:
            attempts = store.claim(session, [d.id for d in batch])
        ready = []
        for doc in batch:
            attempt = attempts.get(doc.id)
            if attempt is None:
                outcome.skipped += 1
            elif attempt > self.max_attempts:
                self._fail(
                    doc,
                    f"gave up after {self.max_attempts} attempts: each time, the worker processing this document "
                    f"stopped before finishing it (a crash, a kill, running out of memory, or the "
                    f"{self.task_time_limit}s task time limit); the rest of its batch was indexed",
                )
                log.error("document %s failed after %d attempts", doc.id, self.max_attempts)
                outcome.failed += 1
            else:
                if attempt > 1:
                    log.warning("document %s: attempt %d of %d, processed on its own", doc.id, attempt,
                                self.max_attempts)
                ready.append(doc)
        return ready

    def _fail(self, doc: store.PendingDocument, error: str) -> None:
        """Fail this version of the document (a newer one sent meanwhile stays queued)."""
        with session_scope(self.factory) as session:
            store.mark_failed(session, doc.id, error, doc.content_hash)


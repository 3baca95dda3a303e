"""Question pipeline: embed the query -> retrieve (dense, lexical) -> fuse -> rerank -> answer with citations."""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from sqlalchemy.orm import Session

from app.config import Settings
from app.embedding import Embedder, EmbedderPool, chunker_key, torch_threads
from app.errors import Unavailable
from app.metrics import QUERY_EMBEDDING
from app.models import EmbeddingModel
from app.query import retrieve
from app.query.answer import NO_ANSWER, Answer, AnswerEvent, ExtractiveAnswerer, LLMAnswerer, answer_events
from app.query.fuse import Candidate, Fusion, fuse, rank_by
from app.query.rerank import Passage, RerankerPool, rocchio
from app.query.retrieve import PassageFusion

Mode = Literal["hybrid", "dense", "lexical"]
Group = Literal["passage", "document"]
# The dense leg asks HNSW for this many chunks per candidate document wanted (documents have several).
CHUNKS_PER_CANDIDATE = 2


@dataclass(frozen=True)
class Retrieval:
    """The retrieval knobs of one query; defaults come from Settings, a request may override any."""

    mode: Mode
    candidates: int
    fusion: Fusion
    dense_weight: float
    document_weight: float
    bm25_k1: float
    bm25_b: float
    rerank: str
    rerank_depth: int
    prf_docs: int
    prf_beta: float
    ef_search: int
    passage_dense_weight: float
    passage_document_weight: float
    passage_sentence_weight: float
    passage_title_weight: float
    lexical_depth: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Retrieval:
        return cls(
            mode=settings.search_mode,
            candidates=settings.search_candidates,
            fusion=settings.search_fusion,
            dense_weight=settings.search_dense_weight,
            document_weight=settings.search_document_weight,
            bm25_k1=settings.bm25_k1,
            bm25_b=settings.bm25_b,
            rerank=settings.rerank,
            rerank_depth=settings.rerank_depth,
            prf_docs=settings.prf_docs,
            prf_beta=settings.prf_beta,
            ef_search=settings.hnsw_ef_search,
            passage_dense_weight=settings.passage_dense_weight,
            passage_document_weight=settings.passage_document_weight,
            passage_sentence_weight=settings.passage_sentence_weight,
            passage_title_weight=settings.passage_title_weight,
            lexical_depth=settings.lexical_depth,
        )


@dataclass
class SearchResult:
    hits: list[retrieve.Hit]
    query_vector: Any
    space: EmbeddingModel
    retrieval: Retrieval
    group: Group = "document"
    # The IDF of each query term among the passages (passage search), for the answer's sentence scores.
    idf: dict[str, float] = field(default_factory=dict)


@dataclass
class SearchRequest:
    query: str
    k: int
    collection: str
    filters: dict[str, Any] | None = None
    ef_search: int | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    # passage: the k best chunks, several per document allowed; document: the k best documents, each
    # shown by its best chunk. None: the server's setting.
    group: Group | None = None


class QueryPipeline:
    """Search and ask; holds the query embedder, rerankers and answerers, built once per API process."""

    def __init__(
        self,
        settings: Settings,
        embedders: EmbedderPool,
        llm_client: Any | None = None,
        rerankers: RerankerPool | None = None,
    ) -> None:
        self.settings = settings
        self.embedders = embedders
        self.defaults = Retrieval.from_settings(settings)
        self.rerankers = rerankers or RerankerPool(settings.embedding_device)
        if self.defaults.rerank.startswith("cross-encoder:"):
            self.rerankers.get(self.defaults.rerank)  # load at start, not in the first request
        # One thread embeds every query of this process: torch runs one forward pass at a time anyway (the
        # embedder's lock), and a fixed thread keeps its OpenMP team warm.
        self.encoder = ThreadPoolExecutor(1, thread_name_prefix="query-encoder", initializer=torch_threads,
                                          initargs=(settings.query_encode_threads,))
        self.vectors = QueryVectors(settings.query_cache_size)
        self.extractive = ExtractiveAnswerer(settings.answer_max_sentences, settings.answer_max_words)
        self.llm = (
            LLMAnswerer(llm_client, settings.llm_model, settings.llm_max_tokens)
            if llm_client is not None and settings.llm_model
            else None
        )

    def _encode(self, embedder: Embedder, query: str) -> Any:
        """The query's vector from this embedder (timed for /metrics), kept for the next time it is asked."""
        cached = self.vectors.get(embedder, query)
        if cached is not None:
            return cached
        with QUERY_EMBEDDING.time():
            vector = embedder.encode([query])[0]
        vector.setflags(write=False)  # shared by every request that asks the same: never changed in place
        self.vectors.put(embedder, query, vector)
        return vector

    def options(self, req: SearchRequest) -> Retrieval:
        overrides = {k: v for k, v in req.overrides.items() if v is not None}
        if req.ef_search is not None:
            overrides["ef_search"] = req.ef_search
        opts = replace(self.defaults, **overrides)
        RerankerPool.check(opts.rerank)
        return opts

    def search(self, session: Session, req: SearchRequest) -> SearchResult:
        """Ranked chunks from the active space: the k best passages, or the k best documents by their best chunk.

        retrieve (dense HNSW leg and/or BM25 leg) -> exact signals for every candidate -> fuse ->
        rerank -> the top k. The space is read once, in the request's transaction, so a response
        comes wholly from one space even while a re-index switches spaces.
        """
        opts = self.options(req)
        # The query is embedded on the encoder thread while this one reads the space and runs the lexical
        # leg in Postgres: torch and Postgres both release the GIL, so the two overlap. The configured
        # model is the active space's except during a re-index's switch, checked below.
        configured = self.embedders.configured
        cached = self.vectors.get(configured, req.query)
        pending = _done(cached) if cached is not None else self.encoder.submit(self._encode, configured, req.query)
        time.sleep(0)  # hand the GIL to the encoder thread now, not when this one next waits on Postgres
        cid, space = retrieve.collection_and_space(session, req.collection, plan_once=not req.filters)
        try:
            embedder = self.embedders.for_space(space)
        except ValueError as exc:
            raise Unavailable(f"the active embedding space cannot be queried here: {exc}", retry_after=60) from None

        def query_vector() -> Any:
            """The query's vector in the active space (every mode needs it: a lexical hit shows its similarity)."""
            vector = pending.result()
            return vector if embedder is configured else self._encode(embedder, req.query)

        if (req.group or self.settings.search_group) == "passage":
            return self._passages(session, req, opts, cid, space, query_vector)
        return self._documents(session, req, opts, cid, space, query_vector)

    def _passages(
        self, session: Session, req: SearchRequest, opts: Retrieval, cid: int, space: EmbeddingModel,
        query_vector: Callable[[], Any],
    ) -> SearchResult:
        """Passage ranking: both legs score chunks (HNSW over chunk vectors, BM25 over chunk postings);
        every candidate chunk gets both signals exactly, plus its document's (single vector, BM25) as a prior.

        Two statements: the lexical leg (while the query is embedded), then the dense leg, every signal, the
        fusion and the texts of the best passages (retrieve.passage_ranking)."""
        pool = max(opts.candidates, req.k)
        fusion = PassageFusion(opts.mode, opts.passage_dense_weight, opts.passage_document_weight,
                               opts.passage_sentence_weight, opts.passage_title_weight)
        chunker = chunker_key(space.params or {})
        lexical = None
        if opts.mode != "dense":
            lexical = retrieve.passage_lexical(session, req.query, cid, chunker, pool, k1=opts.bm25_k1,
                                               b=opts.bm25_b, filters=req.filters,
                                               documents=fusion.documents or fusion.titles,
                                               depth=opts.lexical_depth)
        qvec = query_vector()
        cross_encoder = opts.rerank.startswith("cross-encoder:")
        hits = retrieve.passage_ranking(
            session, space, qvec, cid, chunker, pool, lexical, fusion,
            max(req.k, opts.rerank_depth) if cross_encoder else req.k,
            filters=req.filters, ef_search=opts.ef_search, max_scan_tuples=self.settings.hnsw_max_scan_tuples,
            k1=opts.bm25_k1, b=opts.bm25_b,
        )
        if cross_encoder:
            hits = self._cross_encode_passages(req.query, hits, opts)
        return SearchResult(hits[: req.k], qvec, space, opts, "passage", lexical.idf if lexical else {})

    def _cross_encode_passages(self, query: str, ranked: list[retrieve.Hit], opts: Retrieval) -> list[retrieve.Hit]:
        """The head of the passage ranking reordered by the cross-encoder; the tail keeps its order below it."""
        reranker = self.rerankers.get(opts.rerank)
        head, tail = ranked[: opts.rerank_depth], ranked[opts.rerank_depth :]
        scores = reranker.scores(query, [Passage(h.title, h.text) for h in head])
        for h, score in zip(head, scores, strict=True):
            h.rerank_score = float(score)
        return sorted(head, key=lambda h: -(h.rerank_score or 0.0)) + tail

    def _documents(
        self, session: Session, req: SearchRequest, opts: Retrieval, cid: int, space: EmbeddingModel,
        query_vector: Callable[[], Any],
    ) -> SearchResult:
        """Document ranking: one result per document, shown by its chunk closest to the query."""
        pool = max(opts.candidates, req.k)

        found: dict[uuid.UUID, None] = {}
        lexical: dict[uuid.UUID, float] = {}
        ranked_lexical: list[tuple[uuid.UUID, float]] = []
        if opts.mode in ("lexical", "hybrid"):
            # Needs no vector: it runs while the query is embedded.
            ranked_lexical = retrieve.lexical_documents(
                session, req.query, cid, pool, k1=opts.bm25_k1, b=opts.bm25_b, filters=req.filters
            )
        qvec = query_vector()
        if opts.mode in ("dense", "hybrid"):
            hits = retrieve.dense_chunks(
                session, space, qvec, cid, min(pool * CHUNKS_PER_CANDIDATE, 1000),
                filters=req.filters, ef_search=opts.ef_search, max_scan_tuples=self.settings.hnsw_max_scan_tuples,
            )
            found.update((h.document_id, None) for h in hits)
        lexical.update(ranked_lexical)
        found.update((d, None) for d, _ in ranked_lexical)
        ids = list(found)
        if opts.mode == "hybrid":
            # Dense-only candidates get their exact BM25 too (0 when no query term occurs in them).
            missing = [d for d in ids if d not in lexical]
            if missing:
                lexical.update(retrieve.lexical_documents(
                    session, req.query, cid, len(missing), k1=opts.bm25_k1, b=opts.bm25_b, within=missing
                ))
        candidates = self._candidates(session, space, qvec, ids, lexical)
        ranked_candidates = self._rank(candidates, opts)
        if opts.rerank == "prf" and opts.mode != "lexical":
            feedback = retrieve.document_vectors(
                session, space, [c.document_id for c in ranked_candidates[: opts.prf_docs]]
            )
            moved = rocchio(qvec, feedback, opts.prf_beta)
            original = {c.document_id: (c.chunk_id, c.chunk_sim) for c in candidates}
            candidates = self._candidates(session, space, moved, ids, lexical)
            ranked_candidates = self._rank(candidates, opts)
            for c in ranked_candidates:
                # Ranked by the moved query, but shown by the chunk nearest the question as asked.
                c.chunk_id, c.chunk_sim = original.get(c.document_id, (c.chunk_id, c.chunk_sim))
        rerank_scores: dict[uuid.UUID, float] = {}
        if opts.rerank.startswith("cross-encoder:"):
            ranked_candidates, rerank_scores = self._cross_encode(session, req.query, ranked_candidates, opts)
        top = [c for c in ranked_candidates if c.chunk_id is not None][: req.k]
        hits = retrieve.chunk_hits(session, [(c.chunk_id, c.score, c.chunk_sim) for c in top if c.chunk_id is not None])
        for h in hits:
            h.rerank_score = rerank_scores.get(h.document_id)
        return SearchResult(hits, qvec, space, opts, "document")

    @staticmethod
    def _candidates(
        session: Session, space: EmbeddingModel, qvec: Any, ids: list[uuid.UUID], lexical: dict[uuid.UUID, float]
    ) -> list[Candidate]:
        signals = retrieve.dense_signals(session, space, qvec, ids, chunker_key(space.params or {}))
        out = []
        for d in ids:
            sig = signals.get(d)
            if sig is None:  # deleted, or not yet in this space
                continue
            chunk_id, sim = sig.best
            out.append(Candidate(d, chunk_id, sim, sig.document_sim, lexical.get(d, 0.0)))
        return out

    @staticmethod
    def _rank(candidates: list[Candidate], opts: Retrieval) -> list[Candidate]:
        if opts.mode == "hybrid":
            return fuse(candidates, method=opts.fusion, dense_weight=opts.dense_weight,
                        document_weight=opts.document_weight)
        return rank_by(candidates, opts.mode, opts.document_weight)

    def _cross_encode(
        self, session: Session, query: str, ranked: list[Candidate], opts: Retrieval
    ) -> tuple[list[Candidate], dict[uuid.UUID, float]]:
        """The head of the ranking reordered by the cross-encoder; the tail keeps its order below it."""
        reranker = self.rerankers.get(opts.rerank)
        head, tail = ranked[: opts.rerank_depth], ranked[opts.rerank_depth :]
        texts = retrieve.chunk_hits(session, [(c.chunk_id, 0.0, 0.0) for c in head if c.chunk_id is not None])
        by_chunk = {h.chunk_id: h for h in texts}
        head = [c for c in head if c.chunk_id in by_chunk]
        passages = [by_chunk[c.chunk_id] for c in head if c.chunk_id is not None]
        scores = reranker.scores(query, [Passage(h.title, h.text) for h in passages])
        order = sorted(range(len(head)), key=lambda i: -scores[i])
        return [head[i] for i in order] + tail, {head[i].document_id: scores[i] for i in range(len(head))}

    def relevant(self, session: Session, req: SearchRequest) -> tuple[SearchResult, list[retrieve.Hit]]:
        """The passages found for a question and those of them close enough to it to answer from."""
        result = self.search(session, replace(req, group="passage"))
        return result, [h for h in result.hits if h.relevance >= self.settings.answer_min_score]

    def ask(self, session: Session, req: SearchRequest) -> Answer:
        """An answer that cites the chunks it used, or a plain 'not found' when nothing is relevant."""
        result, relevant = self.relevant(session, req)
        if not relevant:
            return Answer(NO_ANSWER, [], "none")
        if self.llm is not None:
            return self.llm.answer(req.query, relevant)
        return self._extract(session, req, result, relevant)

    def ask_events(self, session: Session, req: SearchRequest) -> Iterator[AnswerEvent]:
        """ask() as events: citations, tokens, done (see AnswerEvent); may raise AppError while iterated.

        Retrieval (and the extractive answer) run now, in the caller's session; the events need no
        database, so they can be sent after the session is closed.
        """
        result, relevant = self.relevant(session, req)
        if not relevant:
            return answer_events(Answer(NO_ANSWER, [], "none"))
        if self.llm is not None:
            return self.llm.stream(req.query, relevant)
        return answer_events(self._extract(session, req, result, relevant))

    def _extract(
        self, session: Session, req: SearchRequest, result: SearchResult, relevant: list[retrieve.Hit]
    ) -> Answer:
        """The extractive answer from the passages' sentence vectors (made at ingest) and term overlap."""
        sentences = retrieve.sentence_scores(session, result.space, result.query_vector,
                                             result.idf, [h.chunk_id for h in relevant])
        return self.extractive.answer(relevant, sentences)


class QueryVectors:
    """The vectors of recent queries, per model (a model's fingerprint is in the key), least recently used out:
    a repeated question (a retry, a dashboard, the same question from many users) skips the model."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, embedder: Embedder, query: str) -> Any | None:
        if not self.size:
            return None
        key = (embedder.spec.fingerprint, query)
        with self._lock:
            vector = self._items.get(key)
            if vector is not None:
                self._items.move_to_end(key)
            return vector

    def put(self, embedder: Embedder, query: str, vector: Any) -> None:
        if not self.size:
            return
        with self._lock:
            self._items[(embedder.spec.fingerprint, query)] = vector
            while len(self._items) > self.size:
                self._items.popitem(last=False)


def _done(value: Any) -> Future[Any]:
    future: Future[Any] = Future()
    future.set_result(value)
    return future

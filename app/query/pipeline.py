"""Question pipeline: embed the query -> retrieve (dense, lexical) -> fuse -> rerank -> answer with citations."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from sqlalchemy.orm import Session

from app.config import Settings
from app.embedding import EmbedderPool
from app.errors import Unavailable
from app.ingest.store import collection_id
from app.models import EmbeddingModel
from app.query import retrieve
from app.query.answer import NO_ANSWER, Answer, ExtractiveAnswerer, LLMAnswerer
from app.query.fuse import Candidate, Fusion, fuse, rank_by
from app.query.rerank import Passage, RerankerPool, rocchio
from app.reindex import spaces

Mode = Literal["hybrid", "dense", "lexical"]
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
        )


@dataclass
class SearchResult:
    hits: list[retrieve.Hit]
    query_vector: Any
    space: EmbeddingModel
    retrieval: Retrieval


@dataclass
class SearchRequest:
    query: str
    k: int
    collection: str
    filters: dict[str, Any] | None = None
    ef_search: int | None = None
    overrides: dict[str, Any] = field(default_factory=dict)


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
        self.extractive = ExtractiveAnswerer(settings.answer_max_sentences)
        self.llm = (
            LLMAnswerer(llm_client, settings.llm_model, settings.llm_max_tokens)
            if llm_client is not None and settings.llm_model
            else None
        )

    def options(self, req: SearchRequest) -> Retrieval:
        overrides = {k: v for k, v in req.overrides.items() if v is not None}
        if req.ef_search is not None:
            overrides["ef_search"] = req.ef_search
        opts = replace(self.defaults, **overrides)
        RerankerPool.check(opts.rerank)
        return opts

    def search(self, session: Session, req: SearchRequest) -> SearchResult:
        """Ranked chunks (one per document, its best) from the active space.

        retrieve (dense HNSW leg and/or BM25 leg) -> exact signals for every candidate -> fuse ->
        rerank -> the top k. The space is read once, in the request's transaction, so a response
        comes wholly from one space even while a re-index switches spaces.
        """
        opts = self.options(req)
        cid = collection_id(session, req.collection)
        space = spaces.active(session)
        if space is None:
            raise Unavailable("no embedding model is active yet; the service is still starting")
        try:
            embedder = self.embedders.for_space(space)
        except ValueError as exc:
            raise Unavailable(f"the active embedding space cannot be queried here: {exc}", retry_after=60) from None
        # The query vector ranks a document's chunks in every mode, so even a lexical hit shows its best part.
        qvec = embedder.encode([req.query])[0]
        pool = max(opts.candidates, req.k)

        found: dict[uuid.UUID, None] = {}
        lexical: dict[uuid.UUID, float] = {}
        if opts.mode in ("dense", "hybrid"):
            hits = retrieve.dense_chunks(
                session, space, qvec, cid, min(pool * CHUNKS_PER_CANDIDATE, 1000),
                filters=req.filters, ef_search=opts.ef_search, max_scan_tuples=self.settings.hnsw_max_scan_tuples,
            )
            found.update((h.document_id, None) for h in hits)
        if opts.mode in ("lexical", "hybrid"):
            ranked = retrieve.lexical_documents(
                session, req.query, cid, pool, k1=opts.bm25_k1, b=opts.bm25_b, filters=req.filters
            )
            lexical.update(ranked)
            found.update((d, None) for d, _ in ranked)
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
        return SearchResult(hits, qvec, space, opts)

    @staticmethod
    def _candidates(
        session: Session, space: EmbeddingModel, qvec: Any, ids: list[uuid.UUID], lexical: dict[uuid.UUID, float]
    ) -> list[Candidate]:
        signals = retrieve.dense_signals(session, space, qvec, ids)
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

    def ask(self, session: Session, req: SearchRequest) -> Answer:
        """An answer that cites the chunks it used, or a plain 'not found' when nothing is relevant."""
        result = self.search(session, req)
        relevant = [h for h in result.hits if (h.similarity or 0.0) >= self.settings.answer_min_score]
        if not relevant:
            return Answer(NO_ANSWER, [], "none")
        if self.llm is not None:
            return self.llm.answer(req.query, relevant)
        embedder = self.embedders.for_space(result.space)
        return self.extractive.answer(embedder, result.query_vector, relevant, self.settings.answer_min_score)

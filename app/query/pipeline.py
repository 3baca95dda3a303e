"""Question pipeline: embed the query -> retrieve from the active space -> answer with citations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from app.config import Settings
from app.embedding import EmbedderPool
from app.errors import Unavailable
from app.ingest.store import collection_id
from app.models import EmbeddingModel
from app.query import retrieve
from app.query.answer import NO_ANSWER, Answer, ExtractiveAnswerer, LLMAnswerer
from app.reindex import spaces


@dataclass
class SearchResult:
    hits: list[retrieve.Hit]
    query_vector: Any
    space: EmbeddingModel


@dataclass
class SearchRequest:
    query: str
    k: int
    collection: str
    filters: dict[str, Any] | None = None
    ef_search: int | None = None


class QueryPipeline:
    """Search and ask; holds the query embedder and the answerers, built once per API process."""

    def __init__(self, settings: Settings, embedders: EmbedderPool, llm_client: Any | None = None) -> None:
        self.settings = settings
        self.embedders = embedders
        self.extractive = ExtractiveAnswerer(settings.answer_max_sentences)
        self.llm = (
            LLMAnswerer(llm_client, settings.llm_model, settings.llm_max_tokens)
            if llm_client is not None and settings.llm_model
            else None
        )

    def search(self, session: Session, req: SearchRequest) -> SearchResult:
        """Ranked chunks from the active space, with the query embedded by that space's own model.

        The space is read once, in the request's transaction, so a response comes wholly from one
        space even while a re-index switches spaces.
        """
        cid = collection_id(session, req.collection)
        space = spaces.active(session)
        if space is None:
            raise Unavailable("no embedding model is active yet; the service is still starting")
        try:
            embedder = self.embedders.for_space(space)
        except ValueError as exc:
            raise Unavailable(f"the active embedding space cannot be queried here: {exc}", retry_after=60) from None
        qvec = embedder.encode([req.query])[0]
        hits = retrieve.dense_chunks(
            session,
            space,
            qvec,
            cid,
            req.k,
            filters=req.filters,
            ef_search=req.ef_search or self.settings.hnsw_ef_search,
            max_scan_tuples=self.settings.hnsw_max_scan_tuples,
        )
        return SearchResult(hits, qvec, space)

    def ask(self, session: Session, req: SearchRequest) -> Answer:
        """An answer that cites the chunks it used, or a plain 'not found' when nothing is relevant."""
        result = self.search(session, req)
        relevant = [h for h in result.hits if h.score >= self.settings.answer_min_score]
        if not relevant:
            return Answer(NO_ANSWER, [], "none")
        if self.llm is not None:
            return self.llm.answer(req.query, relevant)
        embedder = self.embedders.for_space(result.space)
        return self.extractive.answer(embedder, result.query_vector, relevant, self.settings.answer_min_score)

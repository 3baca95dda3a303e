"""Question pipeline: embed the query -> retrieve from the active space -> answer with citations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from app.config import Settings
from app.embedding import Embedder
from app.errors import Unavailable
from app.ingest.store import collection_id
from app.query import retrieve
from app.query.answer import NO_ANSWER, Answer, ExtractiveAnswerer, LLMAnswerer
from app.reindex import spaces


@dataclass
class SearchRequest:
    query: str
    k: int
    collection: str
    filters: dict[str, Any] | None = None
    ef_search: int | None = None


class QueryPipeline:
    """Search and ask; holds the query embedder and the answerers, built once per API process."""

    def __init__(self, settings: Settings, embedder: Embedder, llm_client: Any | None = None) -> None:
        self.settings = settings
        self.embedder = embedder
        self.extractive = ExtractiveAnswerer(embedder, settings.answer_max_sentences)
        self.llm = (LLMAnswerer(llm_client, settings.llm_model, settings.llm_max_tokens)
                    if llm_client is not None and settings.llm_model else None)

    def search(self, session: Session, req: SearchRequest) -> tuple[list[retrieve.Hit], Any]:
        """Ranked chunks from the active space, with the query embedded by that space's model."""
        cid = collection_id(session, req.collection)
        space = spaces.active(session)
        if space is None:
            raise Unavailable("no embedding model is active yet; the service is still starting")
        if space.fingerprint != self.embedder.spec.fingerprint:
            raise Unavailable("the active embedding space was made by another model configuration; "
                              "a re-index is needed before it can be queried", retry_after=60)
        qvec = self.embedder.encode([req.query])[0]
        hits = retrieve.dense_chunks(
            session, space, qvec, cid, req.k, filters=req.filters,
            ef_search=req.ef_search or self.settings.hnsw_ef_search,
            max_scan_tuples=self.settings.hnsw_max_scan_tuples,
        )
        return hits, qvec

    def ask(self, session: Session, req: SearchRequest) -> Answer:
        """An answer that cites the chunks it used, or a plain 'not found' when nothing is relevant."""
        hits, qvec = self.search(session, req)
        relevant = [h for h in hits if h.score >= self.settings.answer_min_score]
        if not relevant:
            return Answer(NO_ANSWER, [], "none")
        if self.llm is not None:
            return self.llm.answer(req.query, relevant)
        return self.extractive.answer(qvec, relevant, self.settings.answer_min_score)

"""Search and ask."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.auth import Reader, check_collection, check_reranker
from app.api.deps import ResourcesDep, SessionDep
from app.api.schemas import V1_ERRORS, AskIn, AskOut, ChunkOut, SearchIn, SearchOut, SpaceRef, error_responses
from app.query.pipeline import SearchRequest

router = APIRouter(prefix="/v1", tags=["search"], responses=error_responses(*V1_ERRORS, 404))


@router.post("/search", response_model=SearchOut, summary="Ranked chunks for a query")
def search(body: SearchIn, principal: Reader, session: SessionDep, resources: ResourcesDep) -> SearchOut:
    check_collection(principal, body.collection, "read")
    check_reranker(principal, body.rerank, resources.settings.rerank)
    pipeline = resources.query
    overrides = body.retrieval.model_dump(exclude_none=True) if body.retrieval else {}
    overrides.update(mode=body.mode, rerank=body.rerank)
    result = pipeline.search(
        session, SearchRequest(body.query, body.k, body.collection, body.filters, body.ef_search, overrides)
    )
    return SearchOut(
        query=body.query,
        collection=body.collection,
        model=result.space.name,
        space=SpaceRef(id=result.space.id, fingerprint=result.space.fingerprint),
        mode=result.retrieval.mode,
        rerank=result.retrieval.rerank,
        results=[
            ChunkOut(
                chunk_id=h.chunk_id,
                document_id=h.document_id,
                external_id=h.external_id,
                title=h.title,
                text=h.text,
                ordinal=h.ordinal,
                score=round(h.score, 6),
                similarity=round(h.similarity or 0.0, 6),
                rerank_score=None if h.rerank_score is None else round(h.rerank_score, 6),
                metadata=h.metadata,
            )
            for h in result.hits
        ],
    )


@router.post("/ask", response_model=AskOut, responses=error_responses(502),
             summary="An answer with citations to the chunks it used")
def ask(body: AskIn, principal: Reader, session: SessionDep, resources: ResourcesDep) -> AskOut:
    check_collection(principal, body.collection, "read")
    check_reranker(principal, body.rerank, resources.settings.rerank)
    request = SearchRequest(body.question, body.k, body.collection, body.filters,
                            overrides={"mode": body.mode, "rerank": body.rerank})
    answer = resources.query.ask(session, request)
    return AskOut.model_validate({"answer": answer.answer, "mode": answer.mode, "citations": answer.citations})

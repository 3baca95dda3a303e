"""Search and ask."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import ResourcesDep, SessionDep
from app.api.schemas import AskIn, AskOut, ChunkOut, SearchIn, SearchOut, SpaceRef
from app.query.pipeline import SearchRequest

router = APIRouter(prefix="/v1", tags=["search"])


@router.post("/search", response_model=SearchOut, summary="Ranked chunks for a query")
def search(body: SearchIn, session: SessionDep, resources: ResourcesDep) -> SearchOut:
    pipeline = resources.query
    result = pipeline.search(session, SearchRequest(body.query, body.k, body.collection, body.filters, body.ef_search))
    return SearchOut(
        query=body.query,
        collection=body.collection,
        model=result.space.name,
        space=SpaceRef(id=result.space.id, fingerprint=result.space.fingerprint),
        results=[
            ChunkOut(
                chunk_id=h.chunk_id,
                document_id=h.document_id,
                external_id=h.external_id,
                title=h.title,
                text=h.text,
                ordinal=h.ordinal,
                score=round(h.score, 6),
                metadata=h.metadata,
            )
            for h in result.hits
        ],
    )


@router.post("/ask", response_model=AskOut, summary="An answer with citations to the chunks it used")
def ask(body: AskIn, session: SessionDep, resources: ResourcesDep) -> AskOut:
    answer = resources.query.ask(session, SearchRequest(body.question, body.k, body.collection, body.filters))
    return AskOut.model_validate({"answer": answer.answer, "mode": answer.mode, "citations": answer.citations})

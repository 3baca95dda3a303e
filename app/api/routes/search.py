"""Search and ask."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter
from fastapi.encoders import jsonable_encoder
from fastapi.responses import StreamingResponse

from app.api.auth import Reader, check_collection, check_reranker
from app.api.deps import ReadSessionDep, ResourcesDep
from app.api.schemas import (
    V1_ERRORS,
    AskIn,
    AskOut,
    ChunkOut,
    CitationOut,
    SearchIn,
    SearchOut,
    SpaceRef,
    error_responses,
)
from app.errors import AppError
from app.query.answer import AnswerEvent
from app.query.pipeline import SearchRequest

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["search"], responses=error_responses(*V1_ERRORS, 404))

SSE_DESCRIPTION = """With `"stream": true`, Server-Sent Events, each `data` line one JSON object:
`citations` {citations: the sources given, shaped as in the JSON answer}, then `token` {text} for each
piece of the answer as it is written (the pieces concatenate to the answer), then `done` {answer, mode,
citations: those it cites}. A failure after the stream began is an `error` event {error, detail} and
ends the stream."""


def _sse_schema(name: str, data: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["event", "data"],
        "properties": {
            "event": {"const": name},
            "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": data},
        },
    }


# Before OpenAPI 3.2 (FastAPI writes 3.1), an event stream's schema is that of one event.
SSE_EVENT_SCHEMA: dict[str, Any] = {
    "description": SSE_DESCRIPTION,
    "oneOf": [
        _sse_schema("citations", {
            "type": "object", "required": ["citations"],
            "properties": {"citations": {"type": "array", "items": {"$ref": "#/components/schemas/CitationOut"}}},
        }),
        _sse_schema("token", {"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}}),
        _sse_schema("done", {"$ref": "#/components/schemas/AskOut"}),
        _sse_schema("error", {"$ref": "#/components/schemas/ErrorOut"}),
    ],
}
ASK_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The answer with its citations (JSON), or its events (text/event-stream).",
        "content": {"text/event-stream": {"schema": SSE_EVENT_SCHEMA}},
    },
    **error_responses(502),
}


@router.post("/search", response_model=SearchOut, summary="Ranked chunks for a query")
def search(body: SearchIn, principal: Reader, session: ReadSessionDep, resources: ResourcesDep) -> SearchOut:
    check_collection(principal, body.collection, "read")
    check_reranker(principal, body.rerank, resources.settings.rerank)
    pipeline = resources.query
    overrides = body.retrieval.model_dump(exclude_none=True) if body.retrieval else {}
    overrides.update(mode=body.mode, rerank=body.rerank)
    result = pipeline.search(
        session,
        SearchRequest(body.query, body.k, body.collection, body.filters, body.ef_search, overrides, body.group),
    )
    return SearchOut(
        query=body.query,
        collection=body.collection,
        model=result.space.name,
        space=SpaceRef(id=result.space.id, fingerprint=result.space.fingerprint),
        mode=result.retrieval.mode,
        group=result.group,
        rerank=result.retrieval.rerank,
        results=[
            ChunkOut(
                chunk_id=h.chunk_id,
                document_id=h.document_id,
                external_id=h.external_id,
                title=h.title,
                text=h.text,
                ordinal=h.ordinal,
                heading_path=h.heading_path,
                page_start=h.page_start,
                page_end=h.page_end,
                score=round(h.score, 6),
                similarity=round(h.similarity or 0.0, 6),
                rerank_score=None if h.rerank_score is None else round(h.rerank_score, 6),
                metadata=h.metadata,
            )
            for h in result.hits
        ],
    )


@router.post("/ask", response_model=AskOut, responses=ASK_RESPONSES,
             summary="An answer with citations to the chunks it used", description=SSE_DESCRIPTION)
def ask(
    body: AskIn, principal: Reader, session: ReadSessionDep, resources: ResourcesDep
) -> AskOut | StreamingResponse:
    check_collection(principal, body.collection, "read")
    check_reranker(principal, body.rerank, resources.settings.rerank)
    request = SearchRequest(body.question, body.k, body.collection, body.filters,
                            overrides={"mode": body.mode, "rerank": body.rerank})
    if body.stream:
        # Retrieval runs here, while the session is open: it closes when this function returns,
        # before the first event is sent. Errors until then are ordinary error responses.
        events = resources.query.ask_events(session, request)
        return StreamingResponse(_sse(events), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    answer = resources.query.ask(session, request)
    return AskOut.model_validate({"answer": answer.answer, "mode": answer.mode, "citations": answer.citations})


def _sse(events: Iterator[AnswerEvent]) -> Iterator[str]:
    """The events as Server-Sent Events; a failure becomes an `error` event and ends the stream."""
    try:
        for e in events:
            yield _sse_event(e.event, _event_data(e))
    # The status line is long gone: the client gets the error shape instead of a cut connection.
    except AppError as exc:
        detail = exc.message if exc.detail is None else {"message": exc.message, "info": exc.detail}
        yield _sse_event("error", {"error": exc.code, "detail": detail})
    except Exception:
        log.exception("a streamed answer failed")
        yield _sse_event("error", {"error": "internal_error", "detail": "the answer could not be completed"})


def _event_data(e: AnswerEvent) -> dict[str, Any]:
    """An event's data shaped by the JSON answer's models, so both forms carry the same fields."""
    if e.event == "done":
        return AskOut.model_validate(e.data).model_dump(mode="json")
    if e.event == "citations":
        return {"citations": [CitationOut.model_validate(c).model_dump(mode="json") for c in e.data["citations"]]}
    return e.data


def _sse_event(name: str, data: dict[str, Any]) -> str:
    # json.dumps escapes line breaks, so the data is always a single line.
    return f"event: {name}\ndata: {json.dumps(jsonable_encoder(data))}\n\n"

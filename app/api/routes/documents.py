"""Documents: upload (file or JSON) -> 202 with a job; read, delete; jobs."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError
from python_multipart.exceptions import FormParserError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from app.api.auth import Reader, Writer, check_collection
from app.api.deps import Resources, ResourcesDep, SessionDep
from app.api.schemas import (
    COLLECTION_PATTERN,
    ONE_LINE,
    V1_ERRORS,
    CollectionOut,
    DocumentIn,
    DocumentOut,
    DocumentPage,
    IngestAccepted,
    JobOut,
    JobPage,
    MeOut,
    error_responses,
)
from app.config import Settings
from app.db.session import session_scope
from app.errors import BadInput, NotFound, TooLarge, Unavailable, UnsupportedMedia
from app.ingest import sandbox, store
from app.ingest.load import MAX_EXTERNAL_ID, LoadedDocument, check_path, load_json, load_upload
from app.ingest.sandbox import Budget
from app.keys import Principal
from app.reindex.plan import configuration_state
from app.validation import check_metadata

router = APIRouter(prefix="/v1", tags=["documents"], responses=error_responses(*V1_ERRORS, 404))
log = logging.getLogger(__name__)

UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "additionalProperties": False,
                    "properties": {
                        "file": {"type": "string", "format": "binary",
                                 "description": ("txt, md, html, pdf, docx, pptx, xlsx, csv/tsv, or jsonl "
                                                 "({_id, title, text} per line)")},
                        "collection": {"type": "string", "default": "default"},
                        "metadata": {"type": "string", "description": "a JSON object added to every document"},
                        "path": {"type": "string", "minLength": 1, "maxLength": MAX_EXTERNAL_ID,
                                 "description": "the file's path relative to the folder ingested (POSIX, no '..'): "
                                                "its external id instead of the base name; for jsonl, the source"},
                    },
                }
            },
            "application/json": {"schema": DocumentIn.model_json_schema()},
        },
    }
}


def _json_object(raw: str | None, what: str) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise BadInput(f"{what} is malformed JSON: {exc.msg}") from None
    except RecursionError:
        raise BadInput(f"{what} is nested too deeply") from None
    except ValueError as exc:  # an integer literal over Python's 4,300-digit limit
        raise BadInput(f"{what} is malformed JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BadInput(f"{what} must be a JSON object")
    try:  # the rules of the JSON body's metadata
        check_metadata(value, f"{what}: metadata")
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    return value


async def _read_request(
    request: Request, settings: Settings, principal: Principal
) -> tuple[str, list[LoadedDocument]]:
    limit = settings.max_upload_bytes
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + 1024 * 1024:
        raise TooLarge(f"the request is larger than the {limit}-byte upload limit")
    if ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=1, max_fields=8)
        except StarletteHTTPException as exc:
            if not isinstance(exc.__context__, MultiPartException) or not isinstance(
                exc.__context__.__cause__, FormParserError
            ):
                raise  # the form's own limits (files, fields, part size) keep Starlette's answer
            # The parser gave up on the body: for a well-formed client, a part header over its limit, which a
            # file name of several KB is.
            raise BadInput("the multipart upload cannot be parsed: a part's headers, such as the file name, may be "
                           "too long (send a long name as the 'path' field)") from None
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise BadInput("send the document as a multipart field named 'file'")
        collection = str(form.get("collection") or "default")
        store.check_collection_name(collection)
        check_collection(principal, collection, "write")  # before any parsing
        extra = _json_object(str(form.get("metadata") or ""), "the metadata field")
        path = form.get("path")
        if path is not None and not isinstance(path, str):
            raise BadInput("the path field must be text, not a file")
        external_id = None if path is None else check_path(path)
        data = await upload.read(limit + 1)
        docs = await run_in_threadpool(
            load_upload, upload.filename, upload.content_type, data, limit, external_id=external_id,
            budget=_budget(settings), max_pages=settings.pdf_max_pages, pdf_library=settings.pdf_library,
            max_chars=settings.max_document_chars, max_ratio=settings.max_expansion_ratio,
        )
        for doc in docs:
            doc.metadata = {**doc.metadata, **extra}
        return collection, docs
    if ctype in ("application/json", ""):
        raw = await request.body()
        if len(raw) > limit:
            raise TooLarge(f"the request is larger than the {limit}-byte upload limit")
        body = await run_in_threadpool(_document_in, raw)
        check_collection(principal, body.collection, "write")
        # Off the event loop, and within the parse budget like every upload.
        doc = await run_in_threadpool(
            sandbox.run, load_json, (body.text, body.title, body.metadata, body.external_id,
                                     settings.max_document_chars), _budget(settings), "the document",
        )
        return body.collection, [doc]
    raise UnsupportedMedia("send multipart/form-data with a 'file' field, or a JSON document")


def _budget(settings: Settings) -> Budget:
    return Budget(settings.parse_memory_mb, settings.parse_seconds)


def _document_in(raw: bytes) -> DocumentIn:
    """The JSON body validated (in a worker thread: it is up to the upload limit)."""
    try:
        return DocumentIn.model_validate_json(raw)
    except ValidationError as exc:
        malformed = any(e["type"] == "json_invalid" for e in exc.errors())
        raise BadInput("the request body is malformed JSON" if malformed else "invalid document",
                       detail=json.loads(exc.json(include_url=False, include_input=False))) from None


def _accept(resources: Resources, collection: str, docs: list[LoadedDocument]) -> IngestAccepted:
    """Store the documents and the job in one transaction, then enqueue after the commit."""
    with session_scope(resources.factory) as session:
        cid = store.collection_id(session, collection, create=True)
        job_id = store.create_job(session, "ingest", cid, {"documents": len(docs)})
        result = store.upsert_documents(session, cid, docs, job_id)
    batch = resources.settings.ingest_batch_documents
    try:
        for i in range(0, len(result.queued), batch):
            ids = [str(d) for d in result.queued[i : i + batch]]
            resources.celery.send_task("ingest.process_documents", args=[str(job_id), ids])
    except Exception as exc:
        log.exception("could not enqueue job %s", job_id)
        raise Unavailable(
            f"the documents are stored (job {job_id}) but the task queue is unreachable ({exc}); "
            "send the same request again once it is back",
            retry_after=10,
        ) from None
    return IngestAccepted(job_id=job_id, collection=collection, documents=len(docs),
                          queued=len(result.queued), unchanged=result.unchanged,
                          status_url=f"/v1/jobs/{job_id}", warnings=[w for d in docs for w in d.warnings])


@router.post("/documents", status_code=202, response_model=IngestAccepted, openapi_extra=UPLOAD_BODY,
             responses=error_responses(415),
             summary="Add or replace documents (file upload or JSON)")
async def create_documents(request: Request, principal: Writer, resources: ResourcesDep) -> IngestAccepted:
    """Validate and store the documents, answer at once; a worker chunks and embeds them."""
    settings = resources.settings
    collection, docs = await _read_request(request, settings, principal)
    store.check_collection_name(collection)
    if len(docs) > settings.max_documents_per_request:
        raise TooLarge(
            f"the request holds {len(docs)} documents; at most {settings.max_documents_per_request} per request"
        )
    return await run_in_threadpool(_accept, resources, collection, docs)


PageLimit = Annotated[int, Query(ge=1, le=200, description="Items per page.")]
Cursor = Annotated[str | None, Query(max_length=200, pattern=r"^[A-Za-z0-9_=-]+$",
                                     description="The `next_cursor` of the previous page.")]
CollectionFilter = Annotated[str | None, Query(max_length=64, pattern=COLLECTION_PATTERN,
                                               description="Only this collection.")]


def _cursor(value: str | None) -> tuple[datetime, uuid.UUID] | None:
    """A page cursor: the (time, id) of the last item of the previous page, opaque to clients."""
    if value is None:
        return None
    try:
        stamp, ident = json.loads(base64.urlsafe_b64decode(value.encode()))
        return datetime.fromisoformat(stamp), uuid.UUID(ident)
    except (ValueError, TypeError, binascii.Error):
        # 404, not 422: any string of the cursor's characters is well-formed; this one points at no page.
        raise NotFound("no page at this cursor: it is not one this API gave (pass a page's next_cursor "
                       "unchanged)") from None


def _page(items: list[dict[str, Any]], limit: int, column: str) -> dict[str, Any]:
    """A page from up to limit + 1 rows: the extra row only says that there is a next page."""
    if len(items) <= limit:
        return {"items": items, "next_cursor": None}
    last = items[limit - 1]
    cursor = base64.urlsafe_b64encode(json.dumps([last[column].isoformat(), str(last["id"])]).encode()).decode()
    return {"items": items[:limit], "next_cursor": cursor}


@router.get("/collections", response_model=list[CollectionOut],
            summary="The collections the key reaches, with document, chunk and failed counts")
def list_collections(principal: Reader, session: SessionDep) -> list[dict[str, Any]]:
    return store.list_collections(session, principal.visible)


@router.delete("/collections/{name}", status_code=202, response_model=JobOut,
               summary="Delete a collection: its documents, chunks, vectors and postings, in the background")
def delete_collection(
    name: Annotated[str, Path(max_length=64, pattern=COLLECTION_PATTERN)], principal: Reader,
    resources: ResourcesDep,
) -> dict[str, Any]:
    """The collection is out of reach (and its name free) when this answers; a worker removes its contents in
    batches. Follow the job at /v1/jobs/{id}. Needs an admin key that reaches the collection."""
    check_collection(principal, name, "admin")
    with session_scope(resources.factory) as session:
        job_id = store.start_collection_delete(session, name, principal.visible)
    try:
        resources.celery.send_task("collections.delete", args=[str(job_id)])
    except Exception:
        # The job is recorded: the periodic check sends a delete that has not advanced again.
        log.exception("could not enqueue the delete of collection %s (job %s); it will be re-sent", name, job_id)
    with session_scope(resources.factory) as session:
        return store.job_progress(session, job_id, principal.visible)


@router.get("/documents", response_model=DocumentPage,
            summary="Documents, newest change first, by collection, status or title/id (keyset pages)")
def list_documents(
    principal: Reader,
    session: SessionDep,
    collection: CollectionFilter = None,
    status: Annotated[Literal["queued", "indexed", "failed"] | None, Query(description="Only this status.")] = None,
    q: Annotated[str | None, Query(min_length=1, max_length=200, pattern=ONE_LINE,
                                   description="Part of the title or external id.")] = None,
    limit: PageLimit = 50,
    cursor: Cursor = None,
) -> dict[str, Any]:
    if collection is not None:
        check_collection(principal, collection, "read")
        store.collection_id(session, collection)  # 404 if it does not exist
    items = store.list_documents(session, principal.visible, collection=collection, status=status, q=q,
                                 limit=limit + 1, cursor=_cursor(cursor))
    return _page(items, limit, "updated_at")


@router.get("/jobs", response_model=JobPage, summary="Ingest jobs, newest first, with their state and counts")
def list_jobs(
    principal: Reader, session: SessionDep, collection: CollectionFilter = None, limit: PageLimit = 50,
    cursor: Cursor = None,
) -> dict[str, Any]:
    if collection is not None:
        check_collection(principal, collection, "read")
        store.collection_id(session, collection)  # 404 if it does not exist
    items = store.list_jobs(session, principal.visible, collection=collection, limit=limit + 1,
                            cursor=_cursor(cursor))
    return _page(items, limit, "created_at")


@router.get("/documents/{document_id}", response_model=DocumentOut, summary="A document and its status")
def read_document(document_id: uuid.UUID, principal: Reader, session: SessionDep) -> dict[str, Any]:
    return store.get_document(session, document_id, principal.visible)


@router.delete("/documents/{document_id}", status_code=204, summary="Delete a document, its chunks and vectors")
def delete_document(document_id: uuid.UUID, principal: Writer, session: SessionDep) -> Response:
    store.delete_document(session, document_id, principal.visible)
    return Response(status_code=204)


@router.get("/jobs/{job_id}", response_model=JobOut, summary="A job's state, counts and errors")
def read_job(job_id: uuid.UUID, principal: Reader, session: SessionDep) -> dict[str, Any]:
    return store.job_progress(session, job_id, principal.visible)


@router.get("/me", response_model=MeOut, summary="The calling key: its name, role and collections")
def read_me(principal: Reader) -> dict[str, Any]:
    return {"id": principal.key_id, "name": principal.name, "role": principal.role,
            "collections": list(principal.collections)}


@router.get("/status", summary="Collections, documents, chunks, jobs and embedding models")
def read_status(principal: Reader, session: SessionDep, resources: ResourcesDep) -> dict[str, Any]:
    summary = store.status_summary(session, principal.visible)
    # The configured model against the active one: they differ while a re-index runs, after a rollback or a
    # re-index into a named model, and on a process not yet given the newest configuration.
    summary["configuration"] = configuration_state(session, resources.query.embedders.configured.spec)
    return summary

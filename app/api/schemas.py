"""Request and response bodies of the HTTP API."""

from __future__ import annotations

import math
import re
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from app.config import get_settings
from app.ingest.load import MAX_EXTERNAL_ID, MAX_TITLE
from app.ingest.store import COLLECTION_RULE
from app.validation import (
    CONTROLS,
    MAX_KEY_CHARS,
    MAX_VALUE_CHARS,
    SURROGATE,
    TEXT_CONTROLS,
    check_metadata,
    check_text,
    quoted,
)

MAX_FILTER_KEYS = 16
COLLECTION_PATTERN = f"^{COLLECTION_RULE}$"


def _collection(value: Any) -> Any:
    if isinstance(value, str) and not re.fullmatch(COLLECTION_RULE, value):
        raise ValueError("collection names are 1-64 characters: letters, digits, '_', '.', '-'")
    return value


CollectionName = Annotated[
    str,
    Field(description="1-64 characters: letters, digits, '_', '.', '-'.",
          json_schema_extra={"pattern": COLLECTION_PATTERN}),
    BeforeValidator(_collection),
]


class _In(BaseModel):
    # strict: no silent coercion (false is not 0.0, "5" is not 5); the schema says exactly what is accepted.
    model_config = ConfigDict(extra="forbid", strict=True)


# Text fields. Postgres text holds no NUL and no lone surrogate; beyond that, names, ids, titles and keys are
# one line of printable characters, and free text (a query, a question, a metadata value) may also hold tabs
# and line breaks. Control characters means Unicode's Cc: U+0000-U+001F and U+007F-U+009F.
NO_NUL = r"^[^\x00]*$"
ONE_LINE = rf"^[^{CONTROLS}]*$"
TEXT = rf"^[^{TEXT_CONTROLS}]*$"
# "Not blank" means a character that is neither Python's whitespace nor JSON Schema's (ECMA) \s.
NOT_BLANK = r"^[^\x00]*[^\s\x00\x1c-\x1f\x85\ufeff][^\x00]*$"
TEXT_NOT_BLANK = rf"^[^{TEXT_CONTROLS}]*[^\s{CONTROLS}\ufeff][^{TEXT_CONTROLS}]*$"
# External ids, key names, model names: printable (no control characters), not blank.
PRINTABLE_ID = rf"^[^{CONTROLS}]*[^\s{CONTROLS}\ufeff][^{CONTROLS}]*$"
MAX_KEY_NAME = 200
_SCALAR = {"anyOf": [{"type": "string", "maxLength": MAX_VALUE_CHARS, "pattern": TEXT}, {"type": "number"},
                     {"type": "boolean"}, {"type": "null"}]}
_KEY_NAMES = {"minLength": 1, "maxLength": MAX_KEY_CHARS, "pattern": ONE_LINE}
FILTERS_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {
            "type": "object",
            "maxProperties": MAX_FILTER_KEYS,
            "propertyNames": _KEY_NAMES,
            "additionalProperties": {"anyOf": [
                _SCALAR, {"type": "array", "minItems": 1, "maxItems": 100, "items": _SCALAR},
            ]},
        },
        {"type": "null"},
    ],
    "description": "Metadata filters: {key: value} must match exactly; {key: [a, b]} matches any of them.",
}
METADATA_SCHEMA: dict[str, Any] = {
    "anyOf": [{"type": "object", "propertyNames": _KEY_NAMES}, {"type": "null"}],
    "description": f"Any JSON object. Keys: 1-{MAX_KEY_CHARS} characters, no control characters; strings: at most "
                   f"{MAX_VALUE_CHARS} characters, no control characters but tab and line breaks.",
}


def _json_int(value: Any) -> Any:
    """JSON has one number type: 5.0 is the integer 5 (as JSON Schema says); true and "5" are not."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# An integer as JSON Schema means it; the models are strict, so booleans and strings are refused.
Positive = Annotated[int, Field(ge=1), BeforeValidator(_json_int)]
UpTo50 = Annotated[int, Field(ge=1, le=50), BeforeValidator(_json_int)]
UpTo100 = Annotated[int, Field(ge=1, le=100), BeforeValidator(_json_int)]
UpTo1000 = Annotated[int, Field(ge=1, le=1000), BeforeValidator(_json_int)]
Depth = Annotated[int, Field(ge=0, le=1_000_000), BeforeValidator(_json_int)]


def _schema(pattern: str | None = None, **settings_limits: str) -> Any:
    """A field's JSON schema additions: a pattern the validators below enforce with clearer messages than
    a regex would give, and limits that are settings (read when the schema is built)."""

    def extra(schema: dict[str, Any]) -> None:
        if pattern:
            schema["pattern"] = pattern
        for keyword, name in settings_limits.items():
            schema[keyword] = getattr(get_settings(), name)

    return extra


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _check_filters(value: Any) -> Any:
    """Filters as the schema describes them (FILTERS_SCHEMA), refused with a message that names the key at fault;
    runs before pydantic types the field, so a key or value no stored metadata could hold never gets further."""
    if not isinstance(value, dict):
        return value
    if not value:
        return None
    if len(value) > MAX_FILTER_KEYS:
        raise ValueError(f"at most {MAX_FILTER_KEYS} filter keys")
    for key, option in value.items():
        if not isinstance(key, str) or not key or len(key) > MAX_KEY_CHARS:
            raise ValueError(f"filter keys are 1-{MAX_KEY_CHARS} characters")
        shown = quoted(key)
        check_text(key, f"the filter key {shown}", one_line=True, blank_ok=True)
        if isinstance(option, list):
            if not 1 <= len(option) <= 100:
                raise ValueError(f"filter {shown}: a list holds 1-100 values")
            if not all(_scalar(v) for v in option):
                raise ValueError(f"filter {shown}: each value in a list is a string, number, boolean or null")
            values = option
        elif not _scalar(option):
            raise ValueError(f"filter {shown}: a value is a string, number, boolean or null, or a list of them")
        else:
            values = [option]
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"filter {shown}: {v!r} is not a finite number")
            check_text(v, f"filter {shown}: a value", limit=MAX_VALUE_CHARS, blank_ok=True)
    return value


class RetrievalIn(_In):
    """Per-request retrieval knobs; anything left out takes the server's setting."""

    candidates: UpTo1000 | None = Field(default=None, description="Documents each leg brings in.")
    fusion: Literal["zscore", "convex", "rrf"] | None = Field(
        default=None, description="How the two legs are fused."
    )
    dense_weight: float | None = Field(default=None, ge=0, le=1, description="Share of the dense leg in fusion.")
    document_weight: float | None = Field(
        default=None, ge=0, le=10, description="Weight of the document's single vector beside its best chunk."
    )
    passage_dense_weight: float | None = Field(
        default=None, ge=0, le=1, description="Passage ranking: share of the dense leg beside BM25."
    )
    passage_document_weight: float | None = Field(
        default=None, ge=0, le=10, description="Passage ranking: weight of the passage's document beside the passage."
    )
    passage_sentence_weight: float | None = Field(
        default=None, ge=0, le=10, description="Passage ranking: weight of the passage's best sentence."
    )
    passage_title_weight: float | None = Field(
        default=None, ge=0, le=10,
        description="Passage ranking: weight of the question's terms in the passage's document title.",
    )
    bm25_k1: float | None = Field(default=None, ge=0, le=10)
    bm25_b: float | None = Field(default=None, ge=0, le=1)
    lexical_depth: Depth | None = Field(
        default=None,
        description="Passage lexical leg: postings read per query term, best first (0: all of them).",
    )
    rerank_depth: UpTo1000 | None = Field(default=None, description="Candidates the reranker reads.")
    prf_docs: UpTo100 | None = None
    prf_beta: float | None = Field(default=None, ge=0, le=10)


Mode = Literal["hybrid", "dense", "lexical"]
Group = Literal["passage", "document"]
GROUP_DESCRIPTION = (
    "passage: the k best passages, several from one document allowed; document: the k best documents, each "
    "shown by its best passage. Default: the server's setting (PGSAGE_SEARCH_GROUP, passage)."
)
RERANK_DESCRIPTION = (
    "none, prf, or cross-encoder:<model name or path>; default: the server's setting. Naming a cross-encoder "
    "other than the configured one (PGSAGE_RERANK) needs an admin key for all collections: it loads that model "
    "into the server."
)
RERANK_PATTERN = rf"^(none|prf|cross-encoder:[^\s{CONTROLS}][^{CONTROLS}]*)$"


class SearchIn(_In):
    query: str = Field(min_length=1, description="The text to search for.",
                       json_schema_extra=_schema(TEXT_NOT_BLANK, maxLength="max_query_chars"))
    k: Positive = Field(default=10, description="How many chunks to return.",
                   json_schema_extra=_schema(maximum="search_max_k"))
    collection: CollectionName = "default"
    filters: dict[str, Any] | None = Field(default=None, json_schema_extra=lambda s: s.update(FILTERS_SCHEMA))
    ef_search: UpTo1000 | None = Field(default=None, description="HNSW ef_search for this query.")
    mode: Mode | None = Field(default=None, description="hybrid (default), dense or lexical.")
    group: Group | None = Field(default=None, description=GROUP_DESCRIPTION)
    rerank: str | None = Field(default=None, max_length=500, pattern=RERANK_PATTERN, description=RERANK_DESCRIPTION)
    retrieval: RetrievalIn | None = None

    @field_validator("query", mode="before")
    @classmethod
    def _query(cls, v: Any) -> Any:
        return check_text(v, "the query", limit=get_settings().max_query_chars)

    @field_validator("k")
    @classmethod
    def _k(cls, v: int) -> int:
        limit = get_settings().search_max_k
        if v > limit:
            raise ValueError(f"k must be between 1 and {limit}")
        return v

    @field_validator("filters", mode="before")
    @classmethod
    def _filters(cls, v: Any) -> Any:
        return _check_filters(v)

    @field_validator("rerank", mode="before")
    @classmethod
    def _rerank(cls, v: Any) -> Any:
        return check_text(v, "rerank", limit=500, one_line=True)


class AskIn(_In):
    question: str = Field(min_length=1, json_schema_extra=_schema(TEXT_NOT_BLANK, maxLength="max_query_chars"))
    k: UpTo50 = 5
    collection: CollectionName = "default"
    filters: dict[str, Any] | None = Field(default=None, json_schema_extra=lambda s: s.update(FILTERS_SCHEMA))
    mode: Mode | None = Field(default=None, description="hybrid (default), dense or lexical.")
    rerank: str | None = Field(default=None, max_length=500, pattern=RERANK_PATTERN, description=RERANK_DESCRIPTION)
    stream: bool = Field(default=False, description="Answer as Server-Sent Events (text/event-stream): "
                         "citations, then token events as the answer is written, then done (or error).")

    @field_validator("question", mode="before")
    @classmethod
    def _question(cls, v: Any) -> Any:
        return check_text(v, "the question", limit=get_settings().max_query_chars)

    @field_validator("filters", mode="before")
    @classmethod
    def _filters(cls, v: Any) -> Any:
        return _check_filters(v)

    @field_validator("rerank", mode="before")
    @classmethod
    def _rerank(cls, v: Any) -> Any:
        return check_text(v, "rerank", limit=500, one_line=True)


class DocumentIn(_In):
    text: str = Field(min_length=1, json_schema_extra=_schema(NOT_BLANK))
    title: str | None = Field(default=None, max_length=MAX_TITLE, json_schema_extra=_schema(ONE_LINE),
                              description="One line of at most 1000 characters.")
    metadata: dict[str, Any] | None = Field(default=None, json_schema_extra=lambda s: s.update(METADATA_SCHEMA))
    external_id: str | None = Field(default=None, min_length=1, max_length=MAX_EXTERNAL_ID,
                                    json_schema_extra=_schema(PRINTABLE_ID))
    collection: CollectionName = "default"

    @field_validator("text", mode="before")
    @classmethod
    def _text(cls, v: Any) -> Any:
        # Control characters are the text's own business (a form feed separates pages); the database's are not.
        if isinstance(v, str) and ("\x00" in v or SURROGATE.search(v)):
            check_text(v, "the text")
        return v

    @field_validator("title", mode="before")
    @classmethod
    def _title(cls, v: Any) -> Any:
        return check_text(v, "the title", limit=MAX_TITLE, one_line=True, blank_ok=True)

    @field_validator("external_id", mode="before")
    @classmethod
    def _external_id(cls, v: Any) -> Any:
        return check_text(v, "external_id", limit=MAX_EXTERNAL_ID, one_line=True)

    @field_validator("metadata", mode="before")
    @classmethod
    def _metadata(cls, v: Any) -> Any:
        check_metadata(v, "metadata")
        return v


class ChunkOut(BaseModel):
    chunk_id: int
    document_id: uuid.UUID
    external_id: str
    title: str | None
    text: str
    ordinal: int
    heading_path: list[str] = Field(description="Title > section > subsection of the document the chunk is under.")
    page_start: int | None = Field(default=None, description="First page of a PDF the chunk spans.")
    page_end: int | None = Field(default=None, description="Last page of a PDF the chunk spans.")
    score: float = Field(description="The result's score in the ranking mode (fused, cosine or BM25).")
    similarity: float = Field(description="Cosine similarity of this chunk to the query.")
    rerank_score: float | None = None
    metadata: dict[str, Any]


class SpaceRef(BaseModel):
    """The embedding space that served a response."""

    id: int
    fingerprint: str


class SearchOut(BaseModel):
    query: str
    collection: str
    model: str
    space: SpaceRef
    mode: Mode
    group: Group
    rerank: str
    results: list[ChunkOut]


class CitationOut(BaseModel):
    n: int
    chunk_id: int
    document_id: uuid.UUID
    external_id: str
    title: str | None
    heading_path: list[str] = Field(default_factory=list)
    page_start: int | None = None
    page_end: int | None = None
    score: float
    text: str
    quote: str | None = Field(default=None, description="The sentences of this passage the answer uses.")


class AskOut(BaseModel):
    answer: str
    mode: Literal["extractive", "llm", "none"]
    citations: list[CitationOut]


class IngestAccepted(BaseModel):
    job_id: uuid.UUID
    collection: str
    documents: int
    queued: int
    unchanged: int
    status_url: str
    warnings: list[str] = Field(default_factory=list, description=(
        "What the index will not hold of an accepted file, per document: for example a PDF's pages without a "
        "text layer (scanned), whose content cannot be found until it is OCR'd."))


class JobError(BaseModel):
    document_id: uuid.UUID
    external_id: str
    error: str | None


class CollectionOut(BaseModel):
    name: str
    documents: int
    indexed: int
    queued: int
    failed: int
    chunks: int


class DocumentSummary(BaseModel):
    id: uuid.UUID
    collection: str
    external_id: str
    title: str | None
    status: str
    error: str | None
    chunk_count: int
    created_at: datetime
    updated_at: datetime
    indexed_at: datetime | None


class DocumentPage(BaseModel):
    items: list[DocumentSummary]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last one.")


class JobSummary(BaseModel):
    id: uuid.UUID
    kind: str
    collection: str | None
    state: Literal["queued", "running", "succeeded", "failed", "completed_with_errors"]
    total: int
    done: int
    indexed: int
    unchanged: int
    failed: int
    created_at: datetime
    updated_at: datetime


class JobOut(JobSummary):
    errors: list[JobError]


class JobPage(BaseModel):
    items: list[JobSummary]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last one.")


class DocumentOut(BaseModel):
    id: uuid.UUID
    collection: str
    external_id: str
    title: str | None
    source: str | None
    metadata: dict[str, Any]
    status: str
    error: str | None
    chunk_count: int
    characters: int
    content_hash: str
    created_at: datetime
    updated_at: datetime
    indexed_at: datetime | None


class ReindexIn(_In):
    model: str | None = Field(
        default=None, min_length=1, max_length=500, json_schema_extra={"pattern": PRINTABLE_ID},
        description="Re-index into this embedding model (a name or a local folder) instead of the configured one; "
        "once it switches it is the active model for queries, whatever the configuration says.",
    )
    revision: str | None = Field(
        default=None, min_length=1, max_length=200, json_schema_extra={"pattern": PRINTABLE_ID},
        description="A label for the model's weights (default: a hash of the weight files).",
    )

    @field_validator("model", mode="before")
    @classmethod
    def _model(cls, v: Any) -> Any:
        return check_text(v, "the model", limit=500, one_line=True)

    @field_validator("revision", mode="before")
    @classmethod
    def _revision(cls, v: Any) -> Any:
        return check_text(v, "the revision", limit=200, one_line=True)


class KeyIn(_In):
    name: str = Field(min_length=1, max_length=MAX_KEY_NAME, description="What the key is for.",
                      json_schema_extra=_schema(PRINTABLE_ID))
    role: Literal["read", "write", "admin"] = Field(description="read: search, ask, read; write: also ingest "
                                                    "and delete; admin: also re-index and keys.")
    collections: list[Annotated[str, Field(pattern=rf"^(?:{COLLECTION_RULE}|\*)$")]] = Field(
        min_length=1, max_length=100, description="Collection names the key reaches, or ['*'] for all."
    )

    @field_validator("name", mode="before")
    @classmethod
    def _name(cls, v: Any) -> Any:
        return check_text(v, "the name", limit=MAX_KEY_NAME, one_line=True)


class KeyOut(BaseModel):
    id: uuid.UUID
    prefix: str
    name: str
    role: str
    collections: list[str]
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class MeOut(BaseModel):
    """The calling key: what it may do and where, so a client offers only what the key can do."""

    id: uuid.UUID
    name: str
    role: str = Field(description="read < write < admin")
    collections: list[str] = Field(description='The collections the key reaches; ["*"] for all.')


class KeyCreated(KeyOut):
    key: str = Field(description="The key itself; shown only now, only its hash is stored.")


class ErrorOut(BaseModel):
    """Every error: a stable code and a message (or, for invalid input, the fields at fault)."""

    error: str
    detail: Any


_ERRORS = {
    400: "The request could not be parsed (malformed multipart, or a body that is not UTF-8).",
    401: "No API key, or one that is not valid or has been revoked.",
    403: "The key lacks the role, or does not reach the collection.",
    404: "No such collection, document, job or key (or not one this key can see).",
    409: "The action conflicts with the current state (a re-index running, nothing to roll back...), or met a "
         "concurrent change to the same rows (send it again).",
    413: "The body, the upload, the number of documents or a value is over its limit.",
    415: "Unsupported file type or content type.",
    422: "Invalid input: the fields at fault and why.",
    429: "This key's rate limit is exceeded; retry after Retry-After seconds.",
    502: "The language model did not answer.",
    503: "The database or the task queue is unavailable; retry after Retry-After seconds.",
}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}}
_HEADERS = {
    401: {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
    429: _RETRY_AFTER,
    503: _RETRY_AFTER,
}
# Every /v1 operation can answer these (a key is checked, the body is limited, the database is needed and may
# refuse a value or meet a concurrent change).
V1_ERRORS = (400, 401, 403, 409, 413, 422, 429, 503)


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses an operation can answer, all with the ErrorOut body."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in sorted(codes):
        out[code] = {"model": ErrorOut, "description": _ERRORS[code]}
        if code in _HEADERS:
            out[code]["headers"] = _HEADERS[code]
    return out

"""Request and response bodies of the HTTP API."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.config import get_settings
from app.ingest.load import unstorable

MAX_FILTER_KEYS = 16


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_filters(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if not value:
        return None
    if len(value) > MAX_FILTER_KEYS:
        raise ValueError(f"at most {MAX_FILTER_KEYS} filter keys")
    for key, option in value.items():
        if not key or len(key) > 128:
            raise ValueError("filter keys are 1-128 characters")
        if isinstance(option, list) and not 1 <= len(option) <= 100:
            raise ValueError(f"filter {key!r}: a list holds 1-100 values")
    problem = unstorable(value)
    if problem:
        raise ValueError(f"{problem}, which no stored metadata can hold")
    return value


class RetrievalIn(_In):
    """Per-request retrieval knobs; anything left out takes the server's setting."""

    candidates: int | None = Field(default=None, ge=1, le=1000, description="Documents each leg brings in.")
    fusion: Literal["zscore", "convex", "rrf"] | None = Field(
        default=None, description="How the two legs are fused."
    )
    dense_weight: float | None = Field(default=None, ge=0, le=1, description="Share of the dense leg in fusion.")
    document_weight: float | None = Field(
        default=None, ge=0, le=10, description="Weight of the document's single vector beside its best chunk."
    )
    bm25_k1: float | None = Field(default=None, ge=0, le=10)
    bm25_b: float | None = Field(default=None, ge=0, le=1)
    rerank_depth: int | None = Field(default=None, ge=1, le=1000, description="Candidates the reranker reads.")
    prf_docs: int | None = Field(default=None, ge=1, le=100)
    prf_beta: float | None = Field(default=None, ge=0, le=10)


Mode = Literal["hybrid", "dense", "lexical"]
RERANK_DESCRIPTION = "none, prf, or cross-encoder:<model name or path>; default: the server's setting."


class SearchIn(_In):
    query: str = Field(min_length=1, description="The text to search for.")
    k: int = Field(default=10, ge=1, description="How many chunks to return.")
    collection: str = Field(default="default", min_length=1, max_length=64)
    filters: dict[str, Any] | None = Field(
        default=None,
        description="Metadata filters: {key: value} must match exactly; {key: [a, b]} matches any of them.",
    )
    ef_search: int | None = Field(default=None, ge=1, le=1000, description="HNSW ef_search for this query.")
    mode: Mode | None = Field(default=None, description="hybrid (default), dense or lexical.")
    rerank: str | None = Field(default=None, max_length=500, description=RERANK_DESCRIPTION)
    retrieval: RetrievalIn | None = None

    @field_validator("query")
    @classmethod
    def _query(cls, v: str) -> str:
        limit = get_settings().max_query_chars
        if not v.strip():
            raise ValueError("the query is blank")
        if "\x00" in v:
            raise ValueError("the query contains a NUL character")
        if len(v) > limit:
            raise ValueError(f"the query is longer than {limit} characters")
        return v

    @field_validator("k")
    @classmethod
    def _k(cls, v: int) -> int:
        limit = get_settings().search_max_k
        if v > limit:
            raise ValueError(f"k must be between 1 and {limit}")
        return v

    @field_validator("filters")
    @classmethod
    def _filters(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        return _check_filters(v)


class AskIn(_In):
    question: str = Field(min_length=1)
    k: int = Field(default=5, ge=1, le=50)
    collection: str = Field(default="default", min_length=1, max_length=64)
    filters: dict[str, Any] | None = None
    mode: Mode | None = Field(default=None, description="hybrid (default), dense or lexical.")
    rerank: str | None = Field(default=None, max_length=500, description=RERANK_DESCRIPTION)

    @field_validator("question")
    @classmethod
    def _question(cls, v: str) -> str:
        return SearchIn._query(v)

    @field_validator("filters")
    @classmethod
    def _filters(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        return _check_filters(v)


class DocumentIn(_In):
    text: str = Field(min_length=1)
    title: str | None = Field(default=None, max_length=1000)
    metadata: dict[str, Any] | None = None
    external_id: str | None = Field(default=None, min_length=1, max_length=512)
    collection: str = Field(default="default", min_length=1, max_length=64)


class ChunkOut(BaseModel):
    chunk_id: int
    document_id: uuid.UUID
    external_id: str
    title: str | None
    text: str
    ordinal: int
    score: float = Field(description="The document's score in the ranking mode (fused, cosine or BM25).")
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
    rerank: str
    results: list[ChunkOut]


class CitationOut(BaseModel):
    n: int
    chunk_id: int
    document_id: uuid.UUID
    external_id: str
    title: str | None
    score: float
    text: str
    quote: str | None = None


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


class JobError(BaseModel):
    document_id: uuid.UUID
    external_id: str
    error: str | None


class JobOut(BaseModel):
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
    errors: list[JobError]


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


class KeyIn(_In):
    name: str = Field(min_length=1, max_length=200, description="What the key is for.")
    role: Literal["read", "write", "admin"] = Field(description="read: search, ask, read; write: also ingest "
                                                    "and delete; admin: also re-index and keys.")
    collections: list[str] = Field(min_length=1, max_length=100,
                                   description="Collection names the key reaches, or ['*'] for all.")


class KeyOut(BaseModel):
    id: uuid.UUID
    prefix: str
    name: str
    role: str
    collections: list[str]
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class KeyCreated(KeyOut):
    key: str = Field(description="The key itself; shown only now, only its hash is stored.")


class ErrorOut(BaseModel):
    error: str
    detail: Any

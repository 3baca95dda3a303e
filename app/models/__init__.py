"""Typed SQLAlchemy models; importing this module registers every table on Base.metadata."""

from app.models.apikey import ApiKey
from app.models.collection import Collection
from app.models.document import (
    Chunk,
    ChunkPosting,
    Document,
    LexicalDf,
    LexicalPosting,
    LexicalSize,
)
from app.models.embedding import ChunkVector, DocumentVector, EmbeddingModel, SentenceVector
from app.models.job import Job, JobDocument
from app.models.metric import ServiceCounter
from app.models.reindex import ReindexJob

__all__ = [
    "ApiKey",
    "Chunk",
    "ChunkPosting",
    "ChunkVector",
    "Collection",
    "Document",
    "DocumentVector",
    "EmbeddingModel",
    "Job",
    "JobDocument",
    "LexicalDf",
    "LexicalPosting",
    "LexicalSize",
    "ReindexJob",
    "SentenceVector",
    "ServiceCounter",
]

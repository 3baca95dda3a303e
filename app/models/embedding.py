from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pgvector.sqlalchemy import Vector
from sqlalchemy import BigInteger, Boolean, DateTime, ForeignKey, Identity, Index, Integer, Text, func, text
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base


class EmbeddingModel(Base):
    """An embedding space: one model configuration, identified by its fingerprint.

    status: building -> active -> retired (kept for rollback) -> dropping -> dropped; or failed, cancelled,
    superseded, refused (by the quality gate), rolled_back; those are dropped after the retention time too
    (dropping -> their status again, or dropped). One space at most is retired: the next switch supersedes it
    (it stops receiving writes then, so it stops being a rollback target).
    """

    __tablename__ = "embedding_models"
    __table_args__ = (
        Index("uq_embedding_models_one_active", text("(true)"), unique=True,
              postgresql_where=text("status = 'active'")),
        # The rollback target: only the space the last switch retired is written beside the active one.
        Index("uq_embedding_models_one_retired", text("(true)"), unique=True,
              postgresql_where=text("status = 'retired'")),
    )

    id: Mapped[int] = mapped_column(Integer, Identity(), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(Text, unique=True)
    name: Mapped[str] = mapped_column(Text)
    revision: Mapped[str] = mapped_column(Text)
    # Hash of the weight files the space was built with (NULL for spaces older than revision 0006).
    weights: Mapped[str | None] = mapped_column(Text)
    dimension: Mapped[int] = mapped_column(Integer)
    pooling: Mapped[str] = mapped_column(Text)
    normalize: Mapped[bool] = mapped_column(Boolean)
    params: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    status: Mapped[str] = mapped_column(Text, server_default="building")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    activated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    retired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    @property
    def index_type(self) -> str:
        """The vector type its HNSW index casts to: vector (float32), or halfvec when made so."""
        return index_type(self.params)


def index_type(params: dict[str, Any] | None) -> str:
    """The vector type of a space's HNSW index, from its params: vector unless it was made halfvec."""
    return str((params or {}).get("index_type", "vector"))


class DocumentVector(Base):
    """The single vector of a document in one embedding space."""

    __tablename__ = "document_vectors"

    document_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("documents.id", ondelete="CASCADE"), primary_key=True
    )
    model_id: Mapped[int] = mapped_column(
        ForeignKey("embedding_models.id", ondelete="CASCADE"), primary_key=True
    )
    embedding: Mapped[Any] = mapped_column(Vector())


class ChunkVector(Base):
    """One vector per chunk per embedding space: the multi-vector table searched by HNSW.

    Its HNSW index is per model (a partial expression index on embedding::vector(dim)),
    created as data when a space is registered, not by a migration.
    """

    __tablename__ = "chunk_vectors"
    __table_args__ = (Index("ix_chunk_vectors_model_document", "model_id", "document_id"),)

    chunk_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("chunks.id", ondelete="CASCADE"), primary_key=True
    )
    model_id: Mapped[int] = mapped_column(
        ForeignKey("embedding_models.id", ondelete="CASCADE"), primary_key=True
    )
    document_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("documents.id", ondelete="CASCADE")
    )
    collection_id: Mapped[int] = mapped_column(ForeignKey("collections.id", ondelete="CASCADE"))
    embedding: Mapped[Any] = mapped_column(Vector())


class SentenceVector(Base):
    """One vector per quotable sentence of a chunk per embedding space (the span is within the chunk's text).

    Read only for the candidates of a question: a passage's best sentence is a ranking signal, and the
    extractive answer quotes the sentences closest to the question without embedding them then.
    """

    __tablename__ = "sentence_vectors"
    __table_args__ = (Index("ix_sentence_vectors_model", "model_id"),)

    chunk_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("chunks.id", ondelete="CASCADE"), primary_key=True
    )
    model_id: Mapped[int] = mapped_column(
        ForeignKey("embedding_models.id", ondelete="CASCADE"), primary_key=True
    )
    ordinal: Mapped[int] = mapped_column(Integer, primary_key=True)
    char_start: Mapped[int] = mapped_column(Integer)
    char_end: Mapped[int] = mapped_column(Integer)
    embedding: Mapped[Any] = mapped_column(Vector())

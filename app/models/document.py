from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    Sequence,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base, Timestamps

CHUNK_ID_SEQ = Sequence("chunks_id_seq")
EMPTY_PATH = text("'{}'::text[]")


class Document(Timestamps, Base):
    """One source document; its text is kept so chunks can be rebuilt without the source."""

    __tablename__ = "documents"
    __table_args__ = (
        UniqueConstraint("collection_id", "external_id", name="uq_documents_collection_external"),
        Index("ix_documents_collection_status", "collection_id", "status"),
        Index("ix_documents_metadata", "metadata", postgresql_using="gin",
              postgresql_ops={"metadata": "jsonb_path_ops"}),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    collection_id: Mapped[int] = mapped_column(ForeignKey("collections.id", ondelete="CASCADE"))
    external_id: Mapped[str] = mapped_column(Text)
    title: Mapped[str | None] = mapped_column(Text)
    source: Mapped[str | None] = mapped_column(Text)
    metadata_: Mapped[dict[str, Any]] = mapped_column(
        "metadata", JSONB, server_default=text("'{}'::jsonb")
    )
    # The title, source and metadata ({"title", "source", "metadata"}) of a version queued while an older one is
    # indexed: they replace the columns above in the transaction that writes its chunks (NULL: nothing pending).
    pending: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    content: Mapped[str] = mapped_column(Text)
    # How the chunker reads the content: text, markdown (HTML is stored as Markdown) or pdf.
    format: Mapped[str] = mapped_column(Text, server_default="text")
    content_hash: Mapped[str] = mapped_column(Text)
    # queued -> indexed | failed
    status: Mapped[str] = mapped_column(Text, server_default="queued")
    error: Mapped[str | None] = mapped_column(Text)
    chunk_count: Mapped[int] = mapped_column(Integer, server_default="0")
    # Word count after stop-words (the BM25 document length); 0 until indexed.
    lexical_length: Mapped[int] = mapped_column(Integer, server_default="0")
    indexed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Times a worker took the document up, and when it last did: a document whose worker died is sent
    # again once its claim is stale; one that has used up its attempts fails alone.
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Chunk(Base):
    """A token-bounded span of a document's text."""

    __tablename__ = "chunks"
    __table_args__ = (
        UniqueConstraint("document_id", "chunker", "ordinal", name="uq_chunks_document_chunker_ordinal"),
        Index("ix_chunks_collection_chunker", "collection_id", "chunker"),
    )

    id: Mapped[int] = mapped_column(BigInteger, CHUNK_ID_SEQ, primary_key=True,
                                    server_default=CHUNK_ID_SEQ.next_value())
    document_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("documents.id", ondelete="CASCADE")
    )
    ordinal: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    token_count: Mapped[int] = mapped_column(Integer)
    char_start: Mapped[int] = mapped_column(Integer)
    char_end: Mapped[int] = mapped_column(Integer)
    # The chunk set: the chunker (version, budget, overlap) that made it; each space reads its own.
    chunker: Mapped[str] = mapped_column(Text, server_default="")
    collection_id: Mapped[int] = mapped_column(Integer)
    # Title > section > subsection: embedded and indexed with the text, shown with every result.
    heading_path: Mapped[list[str]] = mapped_column(ARRAY(Text), server_default=EMPTY_PATH)
    page_start: Mapped[int | None] = mapped_column(Integer)
    page_end: Mapped[int | None] = mapped_column(Integer)
    # Terms after stop-words (the BM25 passage length).
    lexical_length: Mapped[int] = mapped_column(Integer, server_default="0")


class ChunkPosting(Base):
    """One term of one chunk for passage BM25: its frequency and the chunk's length."""

    __tablename__ = "chunk_postings"
    __table_args__ = (Index("ix_chunk_postings_chunk", "chunk_id"),)

    collection_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    chunker: Mapped[str] = mapped_column(Text, primary_key=True)
    term: Mapped[str] = mapped_column(Text, primary_key=True)
    chunk_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("chunks.id", ondelete="CASCADE"), primary_key=True)
    tf: Mapped[int] = mapped_column(Integer)
    chunk_length: Mapped[int] = mapped_column(Integer)


class LexicalPosting(Base):
    """One term of one document for BM25: its frequency and the document's length."""

    __tablename__ = "lexical_postings"
    __table_args__ = (Index("ix_lexical_postings_document", "document_id"),)

    collection_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    term: Mapped[str] = mapped_column(Text, primary_key=True)
    document_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("documents.id", ondelete="CASCADE"), primary_key=True
    )
    tf: Mapped[int] = mapped_column(Integer)
    doc_length: Mapped[int] = mapped_column(Integer)


class LexicalDf(Base):
    """A term's document frequency in a collection's scope ('' documents, else a chunk set's chunker), as of the
    last compaction; triggers on the postings append lexical_df_deltas rows, compaction folds them in."""

    __tablename__ = "lexical_df"

    collection_id: Mapped[int] = mapped_column(ForeignKey("collections.id", ondelete="CASCADE"), primary_key=True)
    scope: Mapped[str] = mapped_column(Text, primary_key=True)
    term: Mapped[str] = mapped_column(Text, primary_key=True)
    df: Mapped[int] = mapped_column(BigInteger)


class LexicalSize(Base):
    """A collection scope's items with terms (n) and their total length, as of the last compaction."""

    __tablename__ = "lexical_size"

    collection_id: Mapped[int] = mapped_column(ForeignKey("collections.id", ondelete="CASCADE"), primary_key=True)
    scope: Mapped[str] = mapped_column(Text, primary_key=True)
    n: Mapped[int] = mapped_column(BigInteger)
    total: Mapped[int] = mapped_column(BigInteger)


# Changes not yet compacted, appended by triggers (no key: writers never wait on each other).
lexical_df_deltas = Table(
    "lexical_df_deltas", Base.metadata,
    Column("collection_id", Integer, nullable=False), Column("scope", Text, nullable=False),
    Column("term", Text, nullable=False), Column("delta", BigInteger, nullable=False),
    Index("ix_lexical_df_deltas", "collection_id", "scope", "term"),
)
lexical_size_deltas = Table(
    "lexical_size_deltas", Base.metadata,
    Column("collection_id", Integer, nullable=False), Column("scope", Text, nullable=False),
    Column("n", BigInteger, nullable=False), Column("total", BigInteger, nullable=False),
    Index("ix_lexical_size_deltas", "collection_id", "scope"),
)

"""passages: chunk sets per chunker, heading paths and pages, chunk-level BM25 postings, sentence vectors

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02

Passage retrieval scores chunks, not only documents, so each chunk gets its own BM25 postings
(chunk_postings) and its length in terms. A chunk records its heading path (title > section >
subsection) and, for PDFs, the pages it spans. Chunks belong to a chunk set named by the chunker
that made them (`chunker`: version, token budget, overlap): a re-index into a space with another
chunker builds that space's chunks beside the old ones, so queries keep being served from the old
chunks until the switch. Existing chunks are labelled with the active space's chunker; documents
get the format their chunker reads (text, markdown, pdf), 'text' for those already stored.

sentence_vectors holds one vector per quotable sentence of a chunk (per space): the passage ranking
takes a chunk's best sentence as a signal, and the extractive answer picks sentences by them, so no
sentence is embedded while a question waits. Existing chunks get theirs from the re-index that the
chunker change starts.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from pgvector.sqlalchemy import Vector
from sqlalchemy.dialects import postgresql

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CHUNKER_OF_ACTIVE = """
UPDATE chunks SET chunker = coalesce((
    SELECT 'v' || coalesce(params->>'chunker_version', '1') || ':' || (params->>'chunk_max_tokens') || ':'
           || (params->>'chunk_overlap_tokens')
      FROM embedding_models WHERE status = 'active'), 'v1:254:32')
"""
BACKFILL_POSTINGS = """
WITH tf AS (
    SELECT c.id AS chunk_id, d.collection_id, c.chunker, l.lexeme AS term,
           coalesce(array_length(l.positions, 1), 1) AS tf
      FROM chunks c JOIN documents d ON d.id = c.document_id,
           unnest(to_tsvector('pg_catalog.english', coalesce(d.title, '') || ' ' || c.text)) l
)
INSERT INTO chunk_postings (collection_id, chunker, term, chunk_id, tf, chunk_length)
SELECT collection_id, chunker, term, chunk_id, tf, sum(tf) OVER (PARTITION BY chunk_id) FROM tf
"""


def upgrade() -> None:
    op.add_column("documents", sa.Column("format", sa.Text(), server_default="text", nullable=False))
    op.add_column("chunks", sa.Column("chunker", sa.Text(), server_default="", nullable=False))
    op.add_column("chunks", sa.Column("collection_id", sa.Integer(), nullable=True))
    op.add_column(
        "chunks",
        sa.Column("heading_path", postgresql.ARRAY(sa.Text()), server_default=sa.text("'{}'::text[]"), nullable=False),
    )
    op.add_column("chunks", sa.Column("page_start", sa.Integer(), nullable=True))
    op.add_column("chunks", sa.Column("page_end", sa.Integer(), nullable=True))
    op.add_column("chunks", sa.Column("lexical_length", sa.Integer(), server_default="0", nullable=False))
    op.execute(CHUNKER_OF_ACTIVE)
    op.execute("UPDATE chunks c SET collection_id = d.collection_id FROM documents d WHERE d.id = c.document_id")
    op.alter_column("chunks", "collection_id", nullable=False)
    op.drop_constraint("uq_chunks_document_ordinal", "chunks", type_="unique")
    op.create_unique_constraint("uq_chunks_document_chunker_ordinal", "chunks", ["document_id", "chunker", "ordinal"])
    op.create_index("ix_chunks_collection_chunker", "chunks", ["collection_id", "chunker"])
    op.create_table(
        "chunk_postings",
        sa.Column("collection_id", sa.Integer(), nullable=False),
        sa.Column("chunker", sa.Text(), nullable=False),
        sa.Column("term", sa.Text(), nullable=False),
        sa.Column("chunk_id", sa.BigInteger(), nullable=False),
        sa.Column("tf", sa.Integer(), nullable=False),
        sa.Column("chunk_length", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["chunk_id"], ["chunks.id"], name=op.f("fk_chunk_postings_chunk_id_chunks"), ondelete="CASCADE"
        ),
    )
    # Scoring reads (collection, chunker, term) ranges; tf and length ride in the index.
    op.execute(
        "ALTER TABLE chunk_postings ADD CONSTRAINT pk_chunk_postings "
        "PRIMARY KEY (collection_id, chunker, term, chunk_id) INCLUDE (tf, chunk_length)"
    )
    op.create_index("ix_chunk_postings_chunk", "chunk_postings", ["chunk_id"])
    op.create_table(
        "sentence_vectors",
        sa.Column("chunk_id", sa.BigInteger(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("ordinal", sa.Integer(), nullable=False),
        sa.Column("char_start", sa.Integer(), nullable=False),
        sa.Column("char_end", sa.Integer(), nullable=False),
        sa.Column("embedding", Vector(), nullable=False),
        sa.ForeignKeyConstraint(
            ["chunk_id"], ["chunks.id"], name=op.f("fk_sentence_vectors_chunk_id_chunks"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["model_id"], ["embedding_models.id"], name=op.f("fk_sentence_vectors_model_id_embedding_models"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("chunk_id", "model_id", "ordinal", name=op.f("pk_sentence_vectors")),
    )
    op.create_index("ix_sentence_vectors_model", "sentence_vectors", ["model_id"])
    op.execute(BACKFILL_POSTINGS)
    op.execute(
        "UPDATE chunks c SET lexical_length = p.len FROM "
        "(SELECT chunk_id, max(chunk_length) AS len FROM chunk_postings GROUP BY 1) p WHERE c.id = p.chunk_id"
    )


def downgrade() -> None:
    op.drop_index("ix_sentence_vectors_model", table_name="sentence_vectors")
    op.drop_table("sentence_vectors")
    op.drop_index("ix_chunk_postings_chunk", table_name="chunk_postings")
    op.drop_table("chunk_postings")
    op.drop_index("ix_chunks_collection_chunker", table_name="chunks")
    op.drop_constraint("uq_chunks_document_chunker_ordinal", "chunks", type_="unique")
    # Only one chunk set can stay under the old constraint: the active space's.
    op.execute("""
    DELETE FROM chunks WHERE chunker <> coalesce((
        SELECT 'v' || coalesce(params->>'chunker_version', '1') || ':' || (params->>'chunk_max_tokens') || ':'
               || (params->>'chunk_overlap_tokens') FROM embedding_models WHERE status = 'active'), chunker)
    """)
    op.create_unique_constraint("uq_chunks_document_ordinal", "chunks", ["document_id", "ordinal"])
    for column in ("lexical_length", "page_end", "page_start", "heading_path", "collection_id", "chunker"):
        op.drop_column("chunks", column)
    op.drop_column("documents", "format")

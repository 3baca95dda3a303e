"""lexical postings

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23

The lexical leg: one row per (collection, term, document) with the term's frequency and the
document's length, so BM25 (term-frequency saturation, length normalisation, IDF over the
collection) is computed inside Postgres from live statistics. Terms come from Postgres's own
English analyser (to_tsvector: stop-words and Snowball stemming) over the document's chunks,
each character counted once despite the chunk overlap.

Also drops the per-model HNSW indexes on document_vectors: retrieval reads a document's single
vector by primary key for the candidates it scores, so those indexes only slowed every ingest.
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BACKFILL = """
WITH seg AS (
    SELECT c.document_id,
           substr(d.content, greatest(c.char_start, coalesce(lag(c.char_end) OVER w, 0)) + 1,
                  c.char_end - greatest(c.char_start, coalesce(lag(c.char_end) OVER w, 0))) AS txt
      FROM chunks c JOIN documents d ON d.id = c.document_id
     WHERE d.status = 'indexed'
    WINDOW w AS (PARTITION BY c.document_id ORDER BY c.ordinal)
), tf AS (
    SELECT s.document_id, l.lexeme AS term, sum(array_length(l.positions, 1))::int AS tf
      FROM seg s, unnest(to_tsvector('pg_catalog.english', s.txt)) l
     GROUP BY 1, 2
)
INSERT INTO lexical_postings (collection_id, term, document_id, tf, doc_length)
SELECT d.collection_id, tf.term, tf.document_id, tf.tf, sum(tf.tf) OVER (PARTITION BY tf.document_id)
  FROM tf JOIN documents d ON d.id = tf.document_id
"""


def upgrade() -> None:
    op.add_column("documents", sa.Column("lexical_length", sa.Integer(), server_default="0", nullable=False))
    op.create_table(
        "lexical_postings",
        sa.Column("collection_id", sa.Integer(), nullable=False),
        sa.Column("term", sa.Text(), nullable=False),
        sa.Column("document_id", sa.UUID(), nullable=False),
        sa.Column("tf", sa.Integer(), nullable=False),
        sa.Column("doc_length", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["document_id"], ["documents.id"], name=op.f("fk_lexical_postings_document_id_documents"),
            ondelete="CASCADE",
        ),
    )
    # Scoring reads (collection, term) ranges; tf and length ride in the index for index-only scans.
    op.execute(
        "ALTER TABLE lexical_postings ADD CONSTRAINT pk_lexical_postings "
        "PRIMARY KEY (collection_id, term, document_id) INCLUDE (tf, doc_length)"
    )
    op.create_index("ix_lexical_postings_document", "lexical_postings", ["document_id"])
    op.execute(BACKFILL)
    op.execute(
        "UPDATE documents d SET lexical_length = p.len FROM "
        "(SELECT document_id, max(doc_length) AS len FROM lexical_postings GROUP BY 1) p WHERE d.id = p.document_id"
    )
    op.execute("""
    DO $$
    DECLARE r record;
    BEGIN
      FOR r IN SELECT c.relname FROM pg_class c JOIN pg_index i ON i.indexrelid = c.oid
                WHERE i.indrelid = 'document_vectors'::regclass AND c.relname LIKE 'ix_document_vectors_hnsw_m%'
      LOOP
        EXECUTE format('DROP INDEX %I', r.relname);
      END LOOP;
    END $$
    """)


def downgrade() -> None:
    op.drop_index("ix_lexical_postings_document", table_name="lexical_postings")
    op.drop_table("lexical_postings")
    op.drop_column("documents", "lexical_length")
    # The document_vectors HNSW indexes are data of each space; they are not rebuilt here.

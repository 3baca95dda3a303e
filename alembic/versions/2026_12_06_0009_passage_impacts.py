"""passage impacts: each term's chunk postings in order of their BM25 term weight

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06

The passage BM25 statement read every posting of every query term, so its cost grew with the collection (a
common term has tens of thousands of postings in a million chunks). With this index the lexical leg reads
only each term's best postings (retrieve.passage_lexical, PGSAGE_LEXICAL_DEPTH), best first, and completes
the passages it keeps with one probe per term whose list it cut.

The order is a posting's BM25 term weight at k1 0.9, b 0.4 and a reference length of 100 terms; the
expression must stay the same as retrieve.IMPACT for the planner to read the index in order.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

IMPACT = "(tf::float8 / (tf + 0.54 + 0.36 * chunk_length / 100.0))"


def upgrade() -> None:
    op.execute(f"CREATE INDEX ix_chunk_postings_impact ON chunk_postings (collection_id, chunker, term, {IMPACT} DESC) "
               "INCLUDE (chunk_id, tf, chunk_length)")


def downgrade() -> None:
    op.execute("DROP INDEX ix_chunk_postings_impact")

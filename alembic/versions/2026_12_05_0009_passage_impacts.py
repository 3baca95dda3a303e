"""passage impacts: chunk postings ordered by their BM25 term weight, for a lexical leg that reads few of them

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05

The passage BM25 statement scored every posting of every query term, so its cost grew with the collection.
This index keeps each term's postings in order of their BM25 term weight at the default parameters
(k1 0.9, b 0.4) and a reference passage length of 100 terms, so the lexical leg can read each term's best
postings first and stop once no passage left unread can reach its top n (retrieve.passage_lexical; the bound
holds for any average length, see retrieve.IMPACT). The expression must stay the same as retrieve.IMPACT.
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

"""title terms: each document's title analysed once, for the passage ranking's title signal

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06

The passage ranking weighs the question's terms found in a candidate's document title (a field of its own, as
BM25F weighs one). Analysing each candidate's title per query cost about 20 us a title and a read of the
documents table; the title's lexemes are now a stored generated column, kept by Postgres with the title.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("ALTER TABLE documents ADD COLUMN title_terms text[] GENERATED ALWAYS AS "
               "(tsvector_to_array(to_tsvector('pg_catalog.english'::regconfig, coalesce(title, '')))) STORED")


def downgrade() -> None:
    op.execute("ALTER TABLE documents DROP COLUMN title_terms")

"""one rollback target; a queued version's title and metadata wait for its chunks

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07

Only the space the last switch retired receives writes beside the active one, so it is the only space a rollback
may reach: a partial unique index keeps one space 'retired' at a time, and the ones retired before it (which
stopped receiving writes at that switch) become 'superseded' (dropped after the retention time like before).

documents.pending holds the title, source and metadata of a version queued while an older one is indexed; they
replace the document's own when its chunks are written, in that transaction.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("""
        UPDATE embedding_models SET status = 'superseded'
         WHERE status = 'retired'
           AND id <> (SELECT id FROM embedding_models WHERE status = 'retired'
                       ORDER BY retired_at DESC NULLS LAST, id DESC LIMIT 1)""")
    op.execute("CREATE UNIQUE INDEX uq_embedding_models_one_retired ON embedding_models ((true)) "
               "WHERE status = 'retired'")
    op.execute("ALTER TABLE documents ADD COLUMN pending jsonb")


def downgrade() -> None:
    # The earlier schema sets a sent version's title, source and metadata at once: apply what is pending.
    op.execute("""
        UPDATE documents SET title = pending->>'title', source = pending->>'source', metadata = pending->'metadata'
         WHERE pending IS NOT NULL""")
    op.execute("ALTER TABLE documents DROP COLUMN pending")
    # Superseded spaces stay superseded: the earlier code drops them after the retention time, as it did the
    # retired ones it no longer wrote to.
    op.execute("DROP INDEX uq_embedding_models_one_retired")

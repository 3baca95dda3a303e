"""space weights: the hash of the weight files each embedding space was built with

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03

A space is rebuilt from its model's name (the old space during a re-index or after a rollback); the
weights at that path may have been replaced in place since, and an explicit revision label would not
show it. Spaces record the hash of their weight files, and a rebuild whose files hash differently is
refused. Spaces made before this revision have none: their revision is checked instead when it is
itself the weights hash (no explicit label was configured).
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("embedding_models", sa.Column("weights", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("embedding_models", "weights")

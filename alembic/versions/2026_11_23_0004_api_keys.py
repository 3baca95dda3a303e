"""api keys and ingest attempts

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23

API keys, kept as SHA-256 hashes, each with a role and the collections it reaches.
Documents count their processing attempts and when a worker last claimed them, so a document
whose worker dies (a crash, a kill, a time limit) is sent again, and one that keeps killing its
worker fails alone after a bounded number of attempts.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("prefix", sa.Text(), nullable=False),
        sa.Column("key_hash", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("role", sa.Text(), nullable=False),
        sa.Column("collections", postgresql.ARRAY(sa.Text()), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("role IN ('read', 'write', 'admin')", name="ck_api_keys_role"),
        sa.CheckConstraint("cardinality(collections) > 0", name="ck_api_keys_collections"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("prefix", name=op.f("uq_api_keys_prefix")),
    )
    op.add_column("documents", sa.Column("attempts", sa.Integer(), server_default="0", nullable=False))
    op.add_column("documents", sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("documents", "claimed_at")
    op.drop_column("documents", "attempts")
    op.drop_table("api_keys")

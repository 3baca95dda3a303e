"""reindex jobs

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22

Re-index jobs: at most one pending or running at a time (a partial unique index).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "reindex_jobs",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("source_model_id", sa.Integer(), nullable=False),
        sa.Column("target_model_id", sa.Integer(), nullable=False),
        sa.Column("status", sa.Text(), server_default="pending", nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("cursor", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("total_chunks", sa.Integer(), server_default="0", nullable=False),
        sa.Column("done_chunks", sa.Integer(), server_default="0", nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), server_default="false", nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("quality", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["source_model_id"],
            ["embedding_models.id"],
            name=op.f("fk_reindex_jobs_source_model_id_embedding_models"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["target_model_id"],
            ["embedding_models.id"],
            name=op.f("fk_reindex_jobs_target_model_id_embedding_models"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reindex_jobs")),
    )
    op.create_index(
        "uq_reindex_jobs_one_open",
        "reindex_jobs",
        [sa.literal_column("(true)")],
        unique=True,
        postgresql_where=sa.text("status IN ('pending', 'running')"),
    )


def downgrade() -> None:
    op.drop_index(
        "uq_reindex_jobs_one_open",
        table_name="reindex_jobs",
        postgresql_where=sa.text("status IN ('pending', 'running')"),
    )
    op.drop_table("reindex_jobs")

"""service counters: what the workers did, for /metrics

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04

Workers expose no port; after each batch they add to these counters (documents indexed and failed,
chunks, embedding seconds), and any API process's /metrics reads them, so one scrape sees the whole
service.
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "service_counters",
        sa.Column("name", sa.Text(), primary_key=True),
        sa.Column("label", sa.Text(), primary_key=True, server_default=""),
        sa.Column("value", sa.Double(), nullable=False, server_default="0"),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )


def downgrade() -> None:
    op.drop_table("service_counters")

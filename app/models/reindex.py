from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Boolean, DateTime, ForeignKey, Index, Integer, Text, func, text
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base


class ReindexJob(Base):
    """Building one embedding space beside the active one, then switching to it.

    status: pending -> running -> succeeded | failed | cancelled | refused (quality gate).
    At most one job is pending or running at a time (a partial unique index), so processes that
    notice the same model change at once create exactly one job.
    """

    __tablename__ = "reindex_jobs"
    __table_args__ = (
        Index("uq_reindex_jobs_one_open", text("(true)"), unique=True,
              postgresql_where=text("status IN ('pending', 'running')")),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    source_model_id: Mapped[int] = mapped_column(ForeignKey("embedding_models.id", ondelete="CASCADE"))
    target_model_id: Mapped[int] = mapped_column(ForeignKey("embedding_models.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(Text, server_default="pending")
    reason: Mapped[str] = mapped_column(Text)  # detected | requested
    cursor: Mapped[int] = mapped_column(BigInteger, server_default="0")
    total_chunks: Mapped[int] = mapped_column(Integer, server_default="0")
    done_chunks: Mapped[int] = mapped_column(Integer, server_default="0")
    cancel_requested: Mapped[bool] = mapped_column(Boolean, server_default="false")
    error: Mapped[str | None] = mapped_column(Text)
    quality: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, Double, Text, func
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base


class ServiceCounter(Base):
    """A counter the workers add to after each batch (documents indexed, embedding seconds...), so one scrape of
    any API process's /metrics sees the work of every worker."""

    __tablename__ = "service_counters"

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    label: Mapped[str] = mapped_column(Text, primary_key=True, server_default="")
    value: Mapped[float] = mapped_column(Double, server_default="0")
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

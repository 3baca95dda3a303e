"""The embedding-space registry: register a model by fingerprint, activate it, index it.

Per-model HNSW indexes are partial expression indexes (embedding::vector(dim), model_id = N),
so spaces of different dimensions live side by side in one table.
"""

from __future__ import annotations

import logging

from sqlalchemy import select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from app.embedding import ModelSpec
from app.models import EmbeddingModel

log = logging.getLogger(__name__)


def register(session: Session, spec: ModelSpec) -> EmbeddingModel:
    """The space for this spec, created (status building) if new."""
    session.execute(
        insert(EmbeddingModel)
        .values(fingerprint=spec.fingerprint, name=spec.name, revision=spec.revision,
                dimension=spec.dimension, pooling=spec.pooling, normalize=spec.normalize,
                params=spec.params, status="building")
        .on_conflict_do_nothing(index_elements=["fingerprint"])
    )
    return session.execute(
        select(EmbeddingModel).where(EmbeddingModel.fingerprint == spec.fingerprint)
    ).scalar_one()


def active(session: Session) -> EmbeddingModel | None:
    return session.execute(select(EmbeddingModel).where(EmbeddingModel.status == "active")).scalar_one_or_none()


def ensure_active(session: Session, spec: ModelSpec) -> EmbeddingModel:
    """Register the configured model; on a fresh database it becomes the active space at once."""
    # Serialise first-time activation between processes starting together.
    session.execute(text("SELECT pg_advisory_xact_lock(727275)"))
    space = register(session, spec)
    current = active(session)
    if current is None:
        build_index(session, space)
        space.status = "active"
        session.execute(
            text("UPDATE embedding_models SET status = 'active', activated_at = now() WHERE id = :id"),
            {"id": space.id},
        )
        session.refresh(space)
        return space
    if current.id != space.id:
        log.warning("configured embedding model %s differs from the active space %s (%s)",
                    spec.fingerprint, current.fingerprint, current.name)
    return current


def build_index(session: Session, space: EmbeddingModel) -> None:
    """Create the space's HNSW (cosine) indexes on the chunk and document vector tables."""
    dim, mid = int(space.dimension), int(space.id)
    for table in ("chunk_vectors", "document_vectors"):
        session.execute(text(
            f"CREATE INDEX IF NOT EXISTS ix_{table}_hnsw_m{mid} ON {table} "
            f"USING hnsw ((embedding::vector({dim})) vector_cosine_ops) WHERE model_id = {mid}"
        ))

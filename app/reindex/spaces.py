"""The embedding-space registry: register a model by fingerprint, activate it, index it.

Per-model HNSW indexes are partial expression indexes (embedding::vector(dim), or halfvec(dim) for a space
made with PGSAGE_VECTOR_INDEX_TYPE=halfvec; model_id = N), so spaces of different dimensions and index types
live side by side in one table.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import Connection, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from app.config import Settings
from app.embedding import ModelSpec
from app.models import EmbeddingModel, ReindexJob

log = logging.getLogger(__name__)
VECTOR_TABLES = ("chunk_vectors", "sentence_vectors", "document_vectors")
# Only the chunk table is searched through an index; a document's single vector is read by primary key
# for the candidates being scored, so an HNSW index on it would only slow every write.
HNSW_TABLES = ("chunk_vectors",)


def register(session: Session, spec: ModelSpec) -> EmbeddingModel:
    """The space for this spec, created (status building) if new."""
    session.execute(
        insert(EmbeddingModel)
        .values(
            fingerprint=spec.fingerprint,
            name=spec.name,
            revision=spec.revision,
            weights=spec.weights or None,
            dimension=spec.dimension,
            pooling=spec.pooling,
            normalize=spec.normalize,
            params=spec.params,
            status="building",
        )
        .on_conflict_do_nothing(index_elements=["fingerprint"])
    )
    return session.execute(select(EmbeddingModel).where(EmbeddingModel.fingerprint == spec.fingerprint)).scalar_one()


def active(session: Session) -> EmbeddingModel | None:
    return session.execute(select(EmbeddingModel).where(EmbeddingModel.status == "active")).scalar_one_or_none()


def ensure_active(session: Session, spec: ModelSpec, graph: HnswGraph | None = None) -> EmbeddingModel:
    """Register the configured model; on a fresh database it becomes the active space at once (its HNSW index
    built with `graph`'s parameters)."""
    # Serialise first-time activation between processes starting together.
    session.execute(text("SELECT pg_advisory_xact_lock(727275)"))
    space = register(session, spec)
    current = active(session)
    if current is None:
        build_index(session, space, graph or HnswGraph())
        space.status = "active"
        session.execute(
            text("UPDATE embedding_models SET status = 'active', activated_at = now() WHERE id = :id"),
            {"id": space.id},
        )
        session.refresh(space)
        return space
    if current.id != space.id:
        log.warning(
            "configured embedding model %s differs from the active space %s (%s)",
            spec.fingerprint,
            current.fingerprint,
            current.name,
        )
    return current


def index_name(table: str, space_id: int) -> str:
    return f"ix_{table}_hnsw_m{int(space_id)}"


# pgvector's HNSW page layout (src/hnsw.h): an element tuple holds 10 heap TIDs and its neighbour tuple's TID
# ahead of the vector (72 bytes), its neighbour tuple (level + 2) * m TIDs of 6 bytes after 4 bytes, each tuple
# MAXALIGNed with a 4-byte line pointer, on 8 KB pages with a 24-byte header and 8 bytes of special space.
_PAGE_SPACE = 8192 - 24 - 8
_VALUE_BYTES = {"vector": 4, "halfvec": 2}
DEFAULT_M = 16
_FEWEST_M = 12


def _maxalign(n: int) -> int:
    return (n + 7) & ~7


def elements_per_page(kind: str, dimension: int, m: int) -> int:
    """How many bottom-layer elements (element tuple and its neighbour tuple, kept on one page) an 8 KB page of
    pgvector's HNSW index holds: the index's size is its element count over this."""
    element = _maxalign(72 + 8 + _VALUE_BYTES[kind] * int(dimension)) + 4
    neighbours = _maxalign(4 + 2 * int(m) * 6) + 4
    return _PAGE_SPACE // (element + neighbours)


def default_m(kind: str, dimension: int) -> int:
    """pgvector's default m (16), or the largest m down to 12 that packs more elements to a page. The vector
    dominates an element's bytes, so the page count barely moves with m, except where a few neighbours less
    let one more element fit: a 384-d halfvec element with m 16 leaves 7 to a page, with m 13, 8 (the index
    7% smaller as measured: upper-layer elements cost some pages their eighth).
    The graph keeps 2m links per element in its bottom layer either way (recall: BENCHMARKS.md)."""
    best = elements_per_page(kind, dimension, DEFAULT_M)
    for m in range(DEFAULT_M - 1, _FEWEST_M - 1, -1):
        if elements_per_page(kind, dimension, m) > best:
            return m
    return DEFAULT_M


@dataclass(frozen=True)
class HnswGraph:
    """An HNSW index's build parameters: links per node (m; None: default_m for the index's vector type and
    dimension) and the candidate list while inserting (ef_construction). They apply to the build and to every
    vector inserted after it."""

    m: int | None = None
    ef_construction: int = 256

    @classmethod
    def of(cls, settings: Settings) -> HnswGraph:
        return cls(settings.hnsw_m, settings.hnsw_ef_construction)

    def links(self, kind: str, dimension: int) -> int:
        return self.m if self.m is not None else default_m(kind, dimension)


def index_statement(table: str, space_id: int, dimension: int, kind: str = "vector", *,
                    graph: HnswGraph | None = None, concurrently: bool = False, name: str | None = None) -> str:
    """The DDL of a space's HNSW (cosine) index on one of the vector tables, over its vectors cast to `kind`
    (under `name` instead of the space's index name, for an index built beside it)."""
    if kind not in ("vector", "halfvec"):
        raise ValueError(f"unknown HNSW index type {kind!r}")
    graph = graph or HnswGraph()
    how = "CONCURRENTLY " if concurrently else ""
    return (
        f"CREATE INDEX {how}IF NOT EXISTS {name or index_name(table, space_id)} ON {table} "
        f"USING hnsw ((embedding::{kind}({int(dimension)})) {kind}_cosine_ops) "
        f"WITH (m = {int(graph.links(kind, dimension))}, ef_construction = {int(graph.ef_construction)}) "
        f"WHERE model_id = {int(space_id)}"
    )


def build_memory(conn: Connection | Session, memory: str) -> None:
    """Give this connection's HNSW builds `memory` (maintenance_work_mem, e.g. '1GB') for the rest of its session."""
    conn.execute(text("SELECT set_config('maintenance_work_mem', :m, false)"), {"m": memory})


def build_index(session: Session, space: EmbeddingModel, graph: HnswGraph) -> None:
    """Create the space's HNSW index on the chunk vector table (in this transaction)."""
    for table in HNSW_TABLES:
        session.execute(text(index_statement(table, space.id, space.dimension, space.index_type, graph=graph)))


def live(session: Session) -> list[EmbeddingModel]:
    """Spaces that new documents must be written to: the active one, the target of an open re-index, and the
    rollback target (the space the last switch retired, until it is dropped), so that after a rollback every
    document written since the switch is there too."""
    building = select(ReindexJob.target_model_id).where(ReindexJob.status.in_(("pending", "running")))
    return list(
        session.execute(
            select(EmbeddingModel)
            .where(EmbeddingModel.status.in_(("active", "retired")) | EmbeddingModel.id.in_(building))
            .order_by(EmbeddingModel.id)
        ).scalars()
    )


def rollback_target(session: Session) -> EmbeddingModel | None:
    """The one space a rollback can reach: the space the last switch retired, written beside the active one ever
    since (a unique index keeps one space retired at a time; a switch supersedes the one before)."""
    return session.execute(select(EmbeddingModel).where(EmbeddingModel.status == "retired")).scalar_one_or_none()


def rollback_targets(session: Session) -> list[dict[str, object]]:
    """What a client is shown of the spaces a rollback can reach (none, or the rollback target)."""
    space = rollback_target(session)
    if space is None:
        return []
    return [{"id": space.id, "name": space.name, "fingerprint": space.fingerprint, "retired_at": space.retired_at}]


def supersede_retired(session: Session) -> None:
    """A switch retires the active space: the one it retired before stops receiving writes, so it stops being a
    rollback target too (it is kept until its retention ends, and dropped like any retired space)."""
    session.execute(text("UPDATE embedding_models SET status = 'superseded' WHERE status = 'retired'"))


def by_id(session: Session, space_id: int) -> EmbeddingModel:
    return session.execute(select(EmbeddingModel).where(EmbeddingModel.id == space_id)).scalar_one()


def hold_writes(session: Session) -> None:
    """Stop document writes until this transaction ends (a switch or rollback decides on a fixed state).

    A writer holds ROW EXCLUSIVE on chunks from before it reads the live spaces (`unwritten`) until it
    commits, which this SHARE lock waits for and excludes; so a writer either commits before the switch
    looks (and the switch sees its chunks) or reads the spaces after it.
    """
    session.execute(text("LOCK TABLE chunks IN SHARE MODE"))


def unwritten(session: Session, written: set[int]) -> list[int]:
    """The live spaces a document write about to happen in this transaction would leave out.

    Takes the writer's lock first (see hold_writes), so the answer holds until the transaction commits."""
    session.execute(text("LOCK TABLE chunks IN ROW EXCLUSIVE MODE"))
    return [s.id for s in live(session) if s.id not in written]

"""Backfill: re-embed stored chunks into the new space in resumable batches (no source is re-read).

Every statement of the re-index path that touches vectors is here. Progress (a keyset cursor over
chunk ids) commits with each batch's vectors, so a killed worker resumes where it stopped, and
ON CONFLICT DO NOTHING plus the anti-join keep exactly one vector per chunk.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import numpy as np
from sqlalchemy import text
from sqlalchemy.orm import Session


@dataclass
class ChunkBatch:
    ids: list[int]
    texts: list[str]
    max_id: int


def next_batch(session: Session, target_id: int, cursor: int, limit: int) -> ChunkBatch | None:
    """The next chunks after the cursor that have no vector in the target space yet."""
    rows = session.execute(
        text("""
        SELECT c.id, c.text FROM chunks c
         WHERE c.id > :cursor
           AND NOT EXISTS (SELECT 1 FROM chunk_vectors v WHERE v.chunk_id = c.id AND v.model_id = :t)
         ORDER BY c.id LIMIT :n
        """),
        {"cursor": cursor, "t": target_id, "n": limit},
    ).all()
    if not rows:
        return None
    return ChunkBatch([r.id for r in rows], [r.text for r in rows], rows[-1].id)


def missing_count(session: Session, target_id: int) -> int:
    """Chunks of indexed documents still without a vector in the target space."""
    return int(
        session.execute(
            text("""
        SELECT count(*) FROM chunks c JOIN documents d ON d.id = c.document_id
         WHERE d.status = 'indexed'
           AND NOT EXISTS (SELECT 1 FROM chunk_vectors v WHERE v.chunk_id = c.id AND v.model_id = :t)
        """),
            {"t": target_id},
        ).scalar_one()
    )


def write_batch(
    session: Session, job_id: uuid.UUID, target_id: int, batch: ChunkBatch, vectors: np.ndarray, *, advance_cursor: bool
) -> int:
    """Insert the batch's vectors (skipping chunks deleted meanwhile) and record progress; returns rows added."""
    session.execute(
        text("CREATE TEMP TABLE IF NOT EXISTS reindex_batch (chunk_id bigint, embedding vector) ON COMMIT DELETE ROWS")
    )
    cursor = session.connection().connection.driver_connection.cursor()  # type: ignore[union-attr]
    with cursor.copy("COPY reindex_batch (chunk_id, embedding) FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types(["bigint", "vector"])
        for cid, vec in zip(batch.ids, vectors, strict=True):
            copy.write_row((cid, vec))
    result = session.execute(
        text("""
        INSERT INTO chunk_vectors (chunk_id, model_id, document_id, collection_id, embedding)
        SELECT b.chunk_id, :t, c.document_id, d.collection_id, b.embedding
          FROM reindex_batch b JOIN chunks c ON c.id = b.chunk_id JOIN documents d ON d.id = c.document_id
        ON CONFLICT (chunk_id, model_id) DO NOTHING
        """),
        {"t": target_id},
    )
    added = int(result.rowcount or 0)  # type: ignore[attr-defined]
    session.execute(
        text(
            "UPDATE reindex_jobs SET done_chunks = done_chunks + :a, heartbeat_at = now(), "
            "cursor = CASE WHEN :adv THEN greatest(cursor, :c) ELSE cursor END WHERE id = :id"
        ),
        {"a": added, "adv": advance_cursor, "c": batch.max_id, "id": job_id},
    )
    return added


def write_document_vectors(session: Session, target_id: int, dimension: int) -> None:
    """Each document's single vector in the target space: the normalised mean of its chunk vectors."""
    session.execute(
        text(f"""
        INSERT INTO document_vectors (document_id, model_id, embedding)
        SELECT document_id, :t, l2_normalize(avg(embedding::vector({int(dimension)})))
          FROM chunk_vectors WHERE model_id = :t GROUP BY document_id
        ON CONFLICT (document_id, model_id) DO UPDATE SET embedding = EXCLUDED.embedding
        """),
        {"t": target_id},
    )

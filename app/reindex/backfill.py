"""Backfill: fill the new space beside the old one in resumable batches (no source is re-read).

Two ways, by whether the new space reads the same chunk set (chunker) as the old one:
- same chunker: re-embed the stored chunks (and their sentences). Progress, a keyset cursor over
  chunk ids, commits with each batch's vectors, so a killed worker resumes where it stopped, and
  ON CONFLICT DO NOTHING plus the anti-join keep exactly one vector per chunk;
- another chunker: re-chunk each indexed document from its stored content into the new chunk set,
  with its vectors and passage postings, a document per transaction; a document that has its new
  chunks is done, so a restart carries on with the rest.

Every statement of the re-index path that touches chunks or vectors is here.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import numpy as np
from sqlalchemy import text
from sqlalchemy.orm import Session

from app.ingest.chunk import ChunkSpan, answer_sentences
from app.ingest.embed import Embedded
from app.ingest.store import ChunkSet, PendingDocument, copy_sentence_vectors, insert_chunks


@dataclass
class ChunkBatch:
    ids: list[int]
    chunks: list[ChunkSpan]  # text, heading path and sentence spans, as stored
    max_id: int

    @property
    def texts(self) -> list[str]:
        return [c.embed_text for c in self.chunks]


def next_batch(session: Session, target_id: int, chunker: str, cursor: int, limit: int) -> ChunkBatch | None:
    """The next chunks of the chunk set after the cursor that have no vector in the target space yet."""
    rows = session.execute(
        text("""
        SELECT c.id, c.ordinal, c.text, c.token_count, c.char_start, c.char_end, c.heading_path FROM chunks c
         WHERE c.id > :cursor AND c.chunker = :ck
           AND NOT EXISTS (SELECT 1 FROM chunk_vectors v WHERE v.chunk_id = c.id AND v.model_id = :t)
         ORDER BY c.id LIMIT :n
        """),
        {"cursor": cursor, "t": target_id, "ck": chunker, "n": limit},
    ).all()
    if not rows:
        return None
    chunks = [ChunkSpan(r.ordinal, r.text, r.token_count, r.char_start, r.char_end, tuple(r.heading_path or ()),
                        sentences=tuple(answer_sentences(r.text))) for r in rows]
    return ChunkBatch([r.id for r in rows], chunks, rows[-1].id)


def missing_count(session: Session, target_id: int, chunker: str, rechunk: bool) -> int:
    """What the target space still lacks: indexed documents without chunks in its chunk set (re-chunking),
    or chunks of indexed documents without a vector in it."""
    if rechunk:
        sql = """
        SELECT count(*) FROM documents d WHERE d.status = 'indexed'
           AND NOT EXISTS (SELECT 1 FROM chunks c WHERE c.document_id = d.id AND c.chunker = :ck)
        """
    else:
        sql = """
        SELECT count(*) FROM chunks c JOIN documents d ON d.id = c.document_id
         WHERE d.status = 'indexed' AND c.chunker = :ck
           AND NOT EXISTS (SELECT 1 FROM chunk_vectors v WHERE v.chunk_id = c.id AND v.model_id = :t)
        """
    return int(session.execute(text(sql), {"t": target_id, "ck": chunker}).scalar_one())


def documents_to_rechunk(session: Session, chunker: str, limit: int) -> list[PendingDocument]:
    """Indexed documents without chunks in the chunk set yet, with what is needed to chunk them."""
    rows = session.execute(
        text("""
        SELECT d.id, d.collection_id, d.content, d.content_hash, d.title, d.format FROM documents d
         WHERE d.status = 'indexed'
           AND NOT EXISTS (SELECT 1 FROM chunks c WHERE c.document_id = d.id AND c.chunker = :ck)
         ORDER BY d.id LIMIT :n
        """),
        {"ck": chunker, "n": limit},
    ).all()
    return [PendingDocument(r.id, r.collection_id, r.content, r.content_hash, 0, r.title, r.format) for r in rows]


def write_rechunked(session: Session, job_id: uuid.UUID, doc: PendingDocument, chunk_set: ChunkSet) -> int:
    """Add a document's chunks of the new chunk set, with their vectors; returns the chunks added.

    Nothing is written if the document changed or left meanwhile (ingest writes every live space's
    chunk set itself) or already has the set (a concurrent delivery of this job).
    """
    current = session.execute(
        text("SELECT content_hash FROM documents WHERE id = :id AND status = 'indexed' FOR UPDATE"), {"id": doc.id}
    ).scalar()
    if current != doc.content_hash or session.execute(
        text("SELECT 1 FROM chunks WHERE document_id = :id AND chunker = :ck LIMIT 1"),
        {"id": doc.id, "ck": chunk_set.chunker},
    ).first():
        return 0
    insert_chunks(session, [(doc.id, doc.collection_id, chunk_set)])
    session.execute(
        text("UPDATE reindex_jobs SET done_chunks = done_chunks + :a, heartbeat_at = now() WHERE id = :id"),
        {"a": len(chunk_set.chunks), "id": job_id},
    )
    return len(chunk_set.chunks)


def write_batch(
    session: Session, job_id: uuid.UUID, target_id: int, batch: ChunkBatch, vectors: Embedded, *, advance_cursor: bool
) -> int:
    """Insert the batch's vectors (skipping chunks deleted meanwhile) and record progress; returns rows added."""
    session.execute(
        text("CREATE TEMP TABLE IF NOT EXISTS reindex_batch (chunk_id bigint, embedding vector) ON COMMIT DELETE ROWS")
    )
    cursor = session.connection().connection.driver_connection.cursor()  # type: ignore[union-attr]
    with cursor.copy("COPY reindex_batch (chunk_id, embedding) FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types(["bigint", "vector"])
        for cid, vec in zip(batch.ids, vectors.chunks, strict=True):
            copy.write_row((cid, vec))
    # The chunks and documents are locked as they are read (what the foreign-key checks would lock anyway): a
    # delete or replace that removed them and commits while this waits on their rows drops them from the insert
    # (the rows are read again once the lock is granted, and a deleted one is skipped), where the foreign-key
    # check found them gone and failed the batch, and with it the re-index.
    result = session.execute(
        text("""
        INSERT INTO chunk_vectors (chunk_id, model_id, document_id, collection_id, embedding)
        SELECT b.chunk_id, :t, c.document_id, d.collection_id, b.embedding
          FROM reindex_batch b JOIN chunks c ON c.id = b.chunk_id JOIN documents d ON d.id = c.document_id
           FOR KEY SHARE OF c, d
        ON CONFLICT (chunk_id, model_id) DO NOTHING
        """),
        {"t": target_id},
    )
    added = int(result.rowcount or 0)  # type: ignore[attr-defined]
    # Sentence vectors of chunks that still exist and have none in the space yet (a batch redone after a
    # crash wrote them with its chunk vectors, in the same transaction); locked, as above, until the commit.
    present = session.execute(
        text("SELECT c.id FROM chunks c WHERE c.id = ANY(:ids) AND NOT EXISTS "
             "(SELECT 1 FROM sentence_vectors s WHERE s.chunk_id = c.id AND s.model_id = :t) FOR KEY SHARE OF c"),
        {"ids": batch.ids, "t": target_id},
    ).scalars().all()
    keep = set(present)
    rows = iter(vectors.sentences)
    ids, chunks, sentence_rows = [], [], []
    for cid, chunk in zip(batch.ids, batch.chunks, strict=True):
        mine = [next(rows) for _ in chunk.sentences]
        if cid in keep:
            ids.append(cid)
            chunks.append(chunk)
            sentence_rows.extend(mine)
    if ids:
        matrix = np.array(sentence_rows, dtype=np.float32).reshape(len(sentence_rows), vectors.chunks.shape[1])
        copy_sentence_vectors(cursor, ids, chunks, {target_id: matrix})
    session.execute(
        text(
            "UPDATE reindex_jobs SET done_chunks = done_chunks + :a, heartbeat_at = now(), "
            "cursor = CASE WHEN :adv THEN greatest(cursor, :c) ELSE cursor END WHERE id = :id"
        ),
        {"a": added, "adv": advance_cursor, "c": batch.max_id, "id": job_id},
    )
    return added


def write_document_vectors(session: Session, target_id: int, dimension: int) -> None:
    """Each document's single vector in the target space: the normalised mean of its chunk vectors.

    Each document is locked as it is read (see write_batch): one deleted meanwhile is skipped, not a failure."""
    session.execute(
        text(f"""
        INSERT INTO document_vectors (document_id, model_id, embedding)
        SELECT d.id, :t, g.embedding
          FROM (SELECT document_id, l2_normalize(avg(embedding::vector({int(dimension)}))) AS embedding
                  FROM chunk_vectors WHERE model_id = :t GROUP BY document_id) g
          JOIN documents d ON d.id = g.document_id
           FOR KEY SHARE OF d
        ON CONFLICT (document_id, model_id) DO UPDATE SET embedding = EXCLUDED.embedding
        """),
        {"t": target_id},
    )

"""Store: every SQL statement of the ingest path (documents, chunks, vectors, jobs)."""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from psycopg.types.json import Jsonb
from sqlalchemy import text
from sqlalchemy.orm import Session

from app.errors import BadInput, NotFound
from app.ingest.chunk import ChunkSpan
from app.ingest.embed import Embedded
from app.ingest.load import LoadedDocument

# Collection names: 1-64 characters, letters, digits, '_', '.', '-' (the API schema uses the same rule).
COLLECTION_RULE = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
COLLECTION_NAME = re.compile(COLLECTION_RULE)


def check_collection_name(name: str) -> str:
    if not isinstance(name, str) or not COLLECTION_NAME.fullmatch(name):
        raise BadInput("collection names are 1-64 characters: letters, digits, '_', '.', '-'")
    return name


def collection_id(session: Session, name: str, *, create: bool = False) -> int:
    """The id of a collection by name; created on first ingest, 404 elsewhere."""
    check_collection_name(name)
    if create:
        session.execute(text("INSERT INTO collections (name) VALUES (:n) ON CONFLICT (name) DO NOTHING"), {"n": name})
    cid = session.execute(text("SELECT id FROM collections WHERE name = :n"), {"n": name}).scalar()
    if cid is None:
        raise NotFound(f"collection {name!r} does not exist")
    return int(cid)


def create_job(session: Session, kind: str, collection: int | None, params: dict[str, Any]) -> uuid.UUID:
    job_id = uuid.uuid4()
    session.execute(
        text("INSERT INTO jobs (id, kind, collection_id, params) VALUES (:id, :k, :c, :p)"),
        {"id": job_id, "k": kind, "c": collection, "p": Jsonb(params)},
    )
    return job_id


@dataclass
class UpsertResult:
    queued: list[uuid.UUID]
    unchanged: int


# The title of a document's latest version: a queued version's own (pending) until its chunks are written.
_EFFECTIVE_TITLE = "CASE WHEN d.pending IS NULL THEN d.title ELSE d.pending->>'title' END"


def upsert_documents(
    session: Session, collection: int, docs: Sequence[LoadedDocument], job_id: uuid.UUID
) -> UpsertResult:
    """Insert new documents, requeue changed (or failed) ones, and leave identical ones alone.

    Identity is (collection, external id); the content hash decides whether there is work to do. The title is
    part of every chunk's heading path, so a new title is work too; new metadata or source alone is not (applied
    at once: the chunks do not depend on them).

    A document with an indexed version keeps that version's title, source and metadata while a new one waits for
    the worker: the new ones wait in `pending` and switch with its chunks, in the transaction that writes them
    (write_documents), so a search never shows old text under new metadata, nor the reverse, and a version that
    fails leaves the old one whole. The latest request's values win. One statement for the whole batch, so a
    5,000-line JSONL upload is one round trip.
    """
    # Whether the stored row is (or stays) queued after this request, and whether it has an indexed version.
    requeue = ("(d.content_hash <> EXCLUDED.content_hash OR d.status = 'failed' "
               f"OR {_EFFECTIVE_TITLE} IS DISTINCT FROM EXCLUDED.title)")
    defer = f"(d.indexed_at IS NOT NULL AND ({requeue} OR d.status = 'queued'))"
    rows = session.execute(
        text(f"""
        WITH incoming AS (
            SELECT * FROM unnest(CAST(:ext AS text[]), CAST(:title AS text[]), CAST(:source AS text[]),
                                 CAST(:meta AS jsonb[]), CAST(:content AS text[]), CAST(:hash AS text[]),
                                 CAST(:format AS text[]))
                AS t(external_id, title, source, metadata, content, content_hash, format)
        ), upserted AS (
            INSERT INTO documents AS d (id, collection_id, external_id, title, source, metadata,
                                        content, content_hash, format, status)
            SELECT gen_random_uuid(), :cid, external_id, title, source, metadata, content, content_hash, format,
                   'queued'
            FROM incoming
            ON CONFLICT (collection_id, external_id) DO UPDATE
               SET title = CASE WHEN {defer} THEN d.title ELSE EXCLUDED.title END,
                   source = CASE WHEN {defer} THEN d.source ELSE EXCLUDED.source END,
                   metadata = CASE WHEN {defer} THEN d.metadata ELSE EXCLUDED.metadata END,
                   pending = CASE WHEN {defer} THEN jsonb_build_object('title', EXCLUDED.title,
                                       'source', EXCLUDED.source, 'metadata', EXCLUDED.metadata) END,
                   format = CASE WHEN d.content_hash = EXCLUDED.content_hash THEN d.format ELSE EXCLUDED.format END,
                   content = CASE WHEN d.content_hash = EXCLUDED.content_hash THEN d.content
                                  ELSE EXCLUDED.content END,
                   content_hash = EXCLUDED.content_hash,
                   status = CASE WHEN {requeue} THEN 'queued' ELSE d.status END,
                   error = CASE WHEN {requeue} THEN NULL ELSE d.error END,
                   attempts = CASE WHEN {requeue} THEN 0 ELSE d.attempts END,
                   claimed_at = CASE WHEN {requeue} THEN NULL ELSE d.claimed_at END,
                   updated_at = now()
            RETURNING d.id, d.status, d.content_hash
        )
        SELECT id, status FROM upserted
        """),
        {
            "cid": collection,
            "ext": [d.external_id for d in docs],
            "title": [d.title for d in docs],
            "source": [d.source for d in docs],
            "meta": [Jsonb(d.metadata) for d in docs],
            "content": [d.content for d in docs],
            "hash": [d.content_hash for d in docs],
            "format": [d.format for d in docs],
        },
    ).all()
    queued = [r.id for r in rows if r.status == "queued"]
    unchanged = [r.id for r in rows if r.status != "queued"]
    session.execute(
        text("""
        INSERT INTO job_documents (job_id, document_id, status)
        SELECT :job, unnest(CAST(:q AS uuid[])), 'pending'
        UNION ALL
        SELECT :job, unnest(CAST(:u AS uuid[])), 'unchanged'
        """),
        {"job": job_id, "q": queued, "u": unchanged},
    )
    return UpsertResult(queued=queued, unchanged=len(unchanged))


@dataclass
class PendingDocument:
    id: uuid.UUID
    collection_id: int
    content: str
    content_hash: str
    attempts: int = 0
    title: str | None = None
    format: str = "text"


def pending_documents(session: Session, ids: Sequence[uuid.UUID]) -> list[PendingDocument]:
    """The documents among ids that still wait for chunks and vectors (under the title they are to have)."""
    rows = session.execute(
        text(
            f"SELECT id, collection_id, content, content_hash, attempts, {_EFFECTIVE_TITLE} AS title, format "
            "FROM documents d WHERE id = ANY(:ids) AND status = 'queued'"
        ),
        {"ids": list(ids)},
    ).all()
    return [PendingDocument(r.id, r.collection_id, r.content, r.content_hash, r.attempts, r.title, r.format)
            for r in rows]


def hold(session: Session, ids: Sequence[uuid.UUID]) -> None:
    """Stamp a worker's claim on queued documents it will reach soon (renewed as it goes), so that if it
    dies they are sent again once the claim is older than the lease."""
    if ids:
        session.execute(
            text("UPDATE documents SET claimed_at = now() WHERE id = ANY(:ids) AND status = 'queued'"),
            {"ids": list(ids)},
        )


def claim(session: Session, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, int]:
    """Take queued documents up: count the attempt and stamp the claim. Their attempt numbers; a document
    missing from the answer is no longer queued (indexed by another delivery, deleted, failed)."""
    rows = session.execute(
        text(
            "UPDATE documents SET attempts = attempts + 1, claimed_at = now() "
            "WHERE id = ANY(:ids) AND status = 'queued' RETURNING id, attempts"
        ),
        {"ids": list(ids)},
    ).all()
    return {r.id: int(r.attempts) for r in rows}


def claim_stalled(session: Session, older_than_minutes: int, lease_seconds: int, limit: int) -> list[uuid.UUID]:
    """Queued documents to send again: claimed by a worker that has not finished them within the lease (it
    died: a crash, a kill, a time limit), or never claimed long after their upload (their task was lost).
    Touched so that one sweep sends each once."""
    rows = (
        session.execute(
            text("""
        UPDATE documents SET updated_at = now(), claimed_at = NULL
         WHERE id IN (SELECT id FROM documents
                       WHERE status = 'queued'
                         AND CASE WHEN claimed_at IS NULL THEN updated_at < now() - make_interval(mins => :m)
                                  ELSE claimed_at < now() - make_interval(secs => :lease) END
                       ORDER BY updated_at LIMIT :n FOR UPDATE SKIP LOCKED)
        RETURNING id
        """),
            {"m": older_than_minutes, "lease": lease_seconds, "n": limit},
        )
        .scalars()
        .all()
    )
    return list(rows)


def settle_job_items(session: Session, job_id: uuid.UUID, ids: Sequence[uuid.UUID]) -> None:
    """Copy each document's final state onto this job's items (for redelivered or superseded work)."""
    session.execute(
        text("""
        UPDATE job_documents j
           SET status = CASE d.status WHEN 'indexed' THEN 'done' ELSE 'failed' END,
               error = d.error, updated_at = now()
          FROM documents d
         WHERE j.job_id = :job AND j.document_id = d.id AND d.id = ANY(:ids)
           AND j.status = 'pending' AND d.status IN ('indexed', 'failed')
        """),
        {"job": job_id, "ids": list(ids)},
    )


@dataclass
class ChunkSet:
    """A document's chunks as one chunker made them, and their vectors in each space that reads that set."""

    chunker: str
    chunks: Sequence[ChunkSpan]
    vectors: dict[int, Embedded]  # embedding-space id -> a row per chunk and a row per sentence


@dataclass
class DocumentWrite:
    """One document's new chunk sets (the active space's first: the document's BM25 postings come from it)."""

    doc: PendingDocument
    sets: Sequence[ChunkSet]


def write_documents(session: Session, writes: Sequence[DocumentWrite]) -> dict[uuid.UUID, bool]:
    """Replace documents' chunks, vectors and postings in the caller's transaction, a statement per kind of row
    for all of them, and switch each to the title, source and metadata its version was sent with; per document,
    False if it changed meanwhile (its text or title: nothing of it is written).

    Writing a group at once pays the per-statement work (round trips, the statistics triggers, the commit)
    once per group instead of once per document (measured on the scale benchmark's store path, BENCHMARKS.md).
    The row locks, taken in id order so two writers cannot deadlock, make a concurrent change of the same
    documents wait, and the hash check drops work made stale by it.
    """
    if not writes:
        return {}
    current: dict[uuid.UUID, tuple[str, str | None]] = {r.id: (r.content_hash, r.title) for r in session.execute(
        text(f"SELECT id, content_hash, {_EFFECTIVE_TITLE} AS title FROM documents d WHERE id = ANY(:ids) "
             "ORDER BY id FOR UPDATE"),
        {"ids": sorted({w.doc.id for w in writes})},
    )}
    # The chunks carry the title in their heading path: a title sent since they were made makes them stale too.
    live = [w for w in writes if current.get(w.doc.id) == (w.doc.content_hash, w.doc.title)]
    written = {w.doc.id: False for w in writes} | {w.doc.id: True for w in live}
    if not live:
        return written
    ids = [w.doc.id for w in live]
    session.execute(text("DELETE FROM chunks WHERE document_id = ANY(:ids)"), {"ids": ids})
    insert_chunks(session, [(w.doc.id, w.doc.collection_id, s) for w in live for s in w.sets])
    lengths = write_postings(session, [(w.doc.id, w.sets[0].chunker) for w in live if w.sets])
    vectors = [(w.doc.id, model_id, _document_vector(embedded.chunks))
               for w in live for s in w.sets for model_id, embedded in s.vectors.items()]
    if vectors:
        session.execute(
            text("""
            INSERT INTO document_vectors (document_id, model_id, embedding)
            SELECT * FROM unnest(CAST(:d AS uuid[]), CAST(:m AS integer[]), CAST(:v AS vector[]))
            ON CONFLICT (document_id, model_id) DO UPDATE SET embedding = EXCLUDED.embedding
            """),
            {"d": [v[0] for v in vectors], "m": [v[1] for v in vectors], "v": [v[2] for v in vectors]},
        )
    session.execute(
        text("""
        UPDATE documents d SET status = 'indexed', error = NULL, chunk_count = t.n, lexical_length = t.len,
               indexed_at = now(), updated_at = now(),
               -- the version's own title, source and metadata switch with its chunks (see upsert_documents)
               title = CASE WHEN d.pending IS NULL THEN d.title ELSE d.pending->>'title' END,
               source = CASE WHEN d.pending IS NULL THEN d.source ELSE d.pending->>'source' END,
               metadata = CASE WHEN d.pending IS NULL THEN d.metadata ELSE d.pending->'metadata' END,
               pending = NULL
          FROM unnest(CAST(:ids AS uuid[]), CAST(:n AS integer[]), CAST(:len AS integer[])) AS t(id, n, len)
         WHERE d.id = t.id
        """),
        {"ids": ids, "n": [len(w.sets[0].chunks) if w.sets else 0 for w in live],
         "len": [lengths.get(i, 0) for i in ids]},
    )
    # Every job waiting on these documents is settled, including one whose content was superseded.
    session.execute(
        text("UPDATE job_documents SET status = 'done', error = NULL, updated_at = now() "
             "WHERE document_id = ANY(:ids) AND status = 'pending'"),
        {"ids": ids},
    )
    return written


def write_document(session: Session, doc: PendingDocument, sets: Sequence[ChunkSet]) -> bool:
    """write_documents for one document."""
    return write_documents(session, [DocumentWrite(doc, sets)])[doc.id]


def insert_chunks(session: Session, items: Sequence[tuple[uuid.UUID, int, ChunkSet]]) -> None:
    """COPY chunk sets of documents ((document, collection, set)), their vectors in every space given, and their
    passage postings."""
    total = sum(len(s.chunks) for _, _, s in items)
    if not total:
        return
    ids = iter(
        session.execute(text("SELECT nextval('chunks_id_seq') FROM generate_series(1, :n)"), {"n": total})
        .scalars()
        .all()
    )
    numbered = [(doc_id, collection, chunk_set, [next(ids) for _ in chunk_set.chunks])
                for doc_id, collection, chunk_set in items]
    cursor = session.connection().connection.driver_connection.cursor()  # type: ignore[union-attr]
    with cursor.copy(
        "COPY chunks (id, document_id, collection_id, chunker, ordinal, text, token_count, char_start, char_end, "
        "heading_path, page_start, page_end) FROM STDIN"
    ) as copy:
        for doc_id, collection, chunk_set, chunk_ids in numbered:
            for cid, ch in zip(chunk_ids, chunk_set.chunks, strict=True):
                copy.write_row((cid, doc_id, collection, chunk_set.chunker, ch.ordinal, ch.text, ch.token_count,
                                ch.char_start, ch.char_end, list(ch.heading_path), ch.page_start, ch.page_end))
    with cursor.copy(
        "COPY chunk_vectors (chunk_id, model_id, document_id, collection_id, embedding) FROM STDIN (FORMAT BINARY)"
    ) as copy:
        copy.set_types(["bigint", "integer", "uuid", "integer", "vector"])
        for doc_id, collection, chunk_set, chunk_ids in numbered:
            for model_id, embedded in chunk_set.vectors.items():
                for cid, vec in zip(chunk_ids, embedded.chunks, strict=True):
                    copy.write_row((cid, model_id, doc_id, collection, vec))
    with cursor.copy(SENTENCE_COPY) as copy:
        copy.set_types(SENTENCE_TYPES)
        for _doc_id, _collection, chunk_set, chunk_ids in numbered:
            write_sentence_rows(copy, chunk_ids, chunk_set.chunks,
                                {m: e.sentences for m, e in chunk_set.vectors.items()})
    write_chunk_postings(session, [(doc_id, chunk_set.chunker) for doc_id, _, chunk_set, _ in numbered])


SENTENCE_COPY = ("COPY sentence_vectors (chunk_id, model_id, ordinal, char_start, char_end, embedding) FROM STDIN "
                 "(FORMAT BINARY)")
SENTENCE_TYPES = ["bigint", "integer", "integer", "integer", "integer", "vector"]


def copy_sentence_vectors(
    cursor: Any, chunk_ids: Sequence[int], chunks: Sequence[ChunkSpan], vectors: dict[int, np.ndarray]
) -> None:
    """COPY the sentence vectors of these chunks: per space, one row per sentence, chunks in order."""
    with cursor.copy(SENTENCE_COPY) as copy:
        copy.set_types(SENTENCE_TYPES)
        write_sentence_rows(copy, chunk_ids, chunks, vectors)


def write_sentence_rows(copy: Any, chunk_ids: Sequence[int], chunks: Sequence[ChunkSpan],
                        vectors: dict[int, np.ndarray]) -> None:
    for model_id, matrix in vectors.items():
        rows = iter(matrix)
        for cid, chunk in zip(chunk_ids, chunks, strict=True):
            for ordinal, (start, end) in enumerate(chunk.sentences):
                copy.write_row((cid, model_id, ordinal, start, end, next(rows)))


def write_chunk_postings(session: Session, sets: Sequence[tuple[uuid.UUID, str]]) -> None:
    """BM25 postings of each chunk of these chunk sets ((document, chunker): heading path and text), and each
    chunk's length in terms."""
    session.execute(
        text("""
        WITH tf AS (
            SELECT c.id AS chunk_id, c.collection_id, c.chunker, l.lexeme AS term,
                   coalesce(array_length(l.positions, 1), 1) AS tf
              FROM unnest(CAST(:ids AS uuid[]), CAST(:cks AS text[])) AS s(document_id, chunker)
              JOIN chunks c ON c.document_id = s.document_id AND c.chunker = s.chunker,
                   unnest(to_tsvector('pg_catalog.english', array_to_string(c.heading_path, ' ') || ' ' || c.text)) l
        ), ins AS (
            INSERT INTO chunk_postings (collection_id, chunker, term, chunk_id, tf, chunk_length)
            SELECT collection_id, chunker, term, chunk_id, tf, sum(tf) OVER (PARTITION BY chunk_id) FROM tf
            RETURNING chunk_id, chunk_length
        )
        UPDATE chunks c SET lexical_length = s.len
          FROM (SELECT chunk_id, max(chunk_length) AS len FROM ins GROUP BY 1) s
         WHERE c.id = s.chunk_id
        """),
        {"ids": [s[0] for s in sets], "cks": [s[1] for s in sets]},
    )


def write_postings(session: Session, docs: Sequence[tuple[uuid.UUID, str]]) -> dict[uuid.UUID, int]:
    """Replace documents' BM25 postings ((document, the chunker whose chunks delimit its pieces)); returns each
    one's length in terms (a document without terms is missing).

    Terms come from Postgres's English analyser (stop-words, Snowball stems) over the content piece by
    piece: each piece runs from the previous chunk's end to this chunk's end, so headings between
    chunks count and the chunk overlap is not counted twice, and no single to_tsvector call sees more
    than one chunk's worth of text (a tsvector is limited to 1 MB and 256 positions a term).
    """
    if not docs:
        return {}
    ids, cks = [d[0] for d in docs], [d[1] for d in docs]
    session.execute(text("DELETE FROM lexical_postings WHERE document_id = ANY(:ids)"), {"ids": ids})
    rows = session.execute(
        text("""
        WITH seg AS (
            SELECT c.document_id, c.collection_id,
                   substr(d.content, coalesce(lag(c.char_end) OVER w, 0) + 1,
                          greatest(0, c.char_end - coalesce(lag(c.char_end) OVER w, 0))) AS txt
              FROM unnest(CAST(:ids AS uuid[]), CAST(:cks AS text[])) AS s(document_id, chunker)
              JOIN chunks c ON c.document_id = s.document_id AND c.chunker = s.chunker
              JOIN documents d ON d.id = c.document_id
            WINDOW w AS (PARTITION BY c.document_id ORDER BY c.ordinal)
        ), tf AS (
            SELECT s.document_id, s.collection_id, l.lexeme AS term, sum(array_length(l.positions, 1))::int AS tf
              FROM seg s, unnest(to_tsvector('pg_catalog.english', s.txt)) l
             GROUP BY 1, 2, 3
        ), ins AS (
            INSERT INTO lexical_postings (collection_id, term, document_id, tf, doc_length)
            SELECT collection_id, term, document_id, tf, sum(tf) OVER (PARTITION BY document_id) FROM tf
            RETURNING document_id, doc_length
        )
        SELECT document_id, max(doc_length) AS len FROM ins GROUP BY 1
        """),
        {"ids": ids, "cks": cks},
    ).all()
    return {r.document_id: int(r.len) for r in rows}


def _document_vector(matrix: np.ndarray) -> str:
    """The document's single vector: the normalised mean of its chunk vectors."""
    mean = matrix.mean(axis=0)
    mean = mean / max(float(np.linalg.norm(mean)), 1e-12)
    return "[" + ",".join(f"{x:.7g}" for x in mean) + "]"


def mark_failed(session: Session, doc_id: uuid.UUID, error: str, content_hash: str | None = None) -> None:
    """Record why a document could not be indexed; its previous chunks, if any, stay searchable under their own
    title and metadata (the failed version's stay pending, replaced by the next one sent).

    With content_hash, only that version fails: a newer version sent meanwhile stays queued, and so does
    its job item."""
    failed = session.execute(
        text("UPDATE documents SET status = 'failed', error = :e, updated_at = now() WHERE id = :id "
             "AND (CAST(:h AS text) IS NULL OR content_hash = :h) RETURNING id"),
        {"id": doc_id, "e": error[:2000], "h": content_hash},
    ).first()
    if failed is None:
        return
    session.execute(
        text(
            "UPDATE job_documents SET status = 'failed', error = :e, updated_at = now() "
            "WHERE document_id = :d AND status = 'pending'"
        ),
        {"d": doc_id, "e": error[:2000]},
    )


# A collection being deleted is renamed to this prefix at once (no name a client can send starts with it),
# so its name is free again and nothing reaches its documents while a worker removes them in batches.
DELETING = "~deleting~"
LIVE = f"(c.name IS NULL OR c.name NOT LIKE '{DELETING}%')"

# Reads and writes by id are limited to the collections the caller's key reaches (None: all); a
# document or job elsewhere is reported as not existing, so ids leak nothing across collections.
VISIBLE = "(CAST(:visible AS text[]) IS NULL OR c.name = ANY(CAST(:visible AS text[]))) AND " + LIVE


def _job_visible(job: str) -> str:
    """VISIBLE for jobs: a collection-delete job outlives its collection and keeps the name in its params."""
    return (f"(CAST(:visible AS text[]) IS NULL OR coalesce(c.name, {job}.params->>'collection') "
            f"= ANY(CAST(:visible AS text[]))) AND {LIVE}")


def get_document(session: Session, doc_id: uuid.UUID, visible: Sequence[str] | None = None) -> dict[str, Any]:
    row = (
        session.execute(
            text("""
        SELECT d.id, c.name AS collection, d.external_id, d.title, d.source, d.metadata, d.status,
               d.error, d.chunk_count, d.content_hash, d.created_at, d.updated_at, d.indexed_at,
               length(d.content) AS characters
          FROM documents d JOIN collections c ON c.id = d.collection_id
         WHERE d.id = :id AND """
                + VISIBLE
            ),
            {"id": doc_id, "visible": visible},
        )
        .mappings()
        .first()
    )
    if row is None:
        raise NotFound(f"document {doc_id} does not exist")
    return dict(row)


def delete_document(session: Session, doc_id: uuid.UUID, visible: Sequence[str] | None = None) -> None:
    """Delete a document; chunks, vectors and job items go with it (ON DELETE CASCADE)."""
    deleted = session.execute(
        text(
            "DELETE FROM documents d USING collections c WHERE c.id = d.collection_id AND d.id = :id AND "
            + VISIBLE
            + " RETURNING d.id"
        ),
        {"id": doc_id, "visible": visible},
    ).scalar()
    if deleted is None:
        raise NotFound(f"document {doc_id} does not exist")


def job_progress(session: Session, job_id: uuid.UUID, visible: Sequence[str] | None = None) -> dict[str, Any]:
    """A job's state and counts, derived from its items, plus every failed document's error."""
    job = (
        session.execute(
            text(
                "SELECT j.id, j.kind, j.created_at, j.params, coalesce(c.name, j.params->>'collection') "
                "AS collection FROM jobs j LEFT JOIN collections c ON c.id = j.collection_id "
                "WHERE j.id = :id AND " + _job_visible("j")
            ),
            {"id": job_id, "visible": visible},
        )
        .mappings()
        .first()
    )
    if job is None:
        raise NotFound(f"job {job_id} does not exist")
    if job["kind"] == "delete":
        return {**_delete_summary(session, job), "errors": []}
    counts = (
        session.execute(
            text(
                "SELECT count(*) AS total, "
                "count(*) FILTER (WHERE status = 'done') AS done, "
                "count(*) FILTER (WHERE status = 'unchanged') AS unchanged, "
                "count(*) FILTER (WHERE status = 'failed') AS failed, "
                "max(updated_at) AS updated_at FROM job_documents WHERE job_id = :id"
            ),
            {"id": job_id},
        )
        .mappings()
        .one()
    )
    errors = (
        session.execute(
            text(
                "SELECT j.document_id, d.external_id, j.error FROM job_documents j "
                "JOIN documents d ON d.id = j.document_id "
                "WHERE j.job_id = :id AND j.status = 'failed' ORDER BY d.external_id LIMIT 1000"
            ),
            {"id": job_id},
        )
        .mappings()
        .all()
    )
    return {**_job_summary(job, counts), "errors": [dict(e) for e in errors]}


def _job_summary(job: Any, counts: Any) -> dict[str, Any]:
    """A job's state and counts from its items' counts."""
    total, failed = counts["total"], counts["failed"]
    finished = counts["done"] + counts["unchanged"] + failed
    if finished < total:
        state = "running" if finished else "queued"
    elif failed == 0:
        state = "succeeded"
    else:
        state = "failed" if failed == total else "completed_with_errors"
    return {
        "id": job["id"],
        "kind": job["kind"],
        "collection": job["collection"],
        "created_at": job["created_at"],
        "state": state,
        "total": total,
        "done": counts["done"] + counts["unchanged"],
        "indexed": counts["done"],
        "unchanged": counts["unchanged"],
        "failed": failed,
        "updated_at": counts["updated_at"] or job["created_at"],
    }


def _delete_summary(session: Session, job: Any) -> dict[str, Any]:
    """A collection-delete job's progress: its documents at the start, and how many are left."""
    params = job["params"]
    left = 0
    if "finished_at" not in params:
        left = session.execute(text("SELECT count(*) FROM documents WHERE collection_id = :c"),
                               {"c": params["collection_id"]}).scalar_one()
    total = int(params["documents"])
    done = max(0, total - left)
    finished = "finished_at" in params
    return {
        "id": job["id"],
        "kind": job["kind"],
        "collection": params["collection"],
        "created_at": job["created_at"],
        "state": "succeeded" if finished else ("running" if done else "queued"),
        "total": total,
        "done": total if finished else done,
        "indexed": 0,
        "unchanged": 0,
        "failed": 0,
        "updated_at": datetime.fromisoformat(params.get("updated_at") or job["created_at"].isoformat()),
    }


def start_collection_delete(session: Session, name: str, visible: Sequence[str] | None) -> uuid.UUID:
    """Take a collection out of reach at once and record a job to remove its contents.

    The collection is renamed to a DELETING name in this transaction: its name is free for a new collection
    at once, and no search, ask, upload or listing reaches it; the worker deletes the rest in batches.
    """
    row = session.execute(
        text(f"SELECT c.id, (SELECT count(*) FROM documents d WHERE d.collection_id = c.id) AS documents "
             f"FROM collections c WHERE c.name = :n AND {VISIBLE} FOR UPDATE OF c"),
        {"n": name, "visible": visible},
    ).mappings().first()
    if row is None:
        raise NotFound(f"collection {name!r} does not exist")
    session.execute(text("UPDATE collections SET name = :tomb WHERE id = :id"),
                    {"id": row["id"], "tomb": f"{DELETING}{row['id']}~{name}"})
    return create_job(session, "delete", None, {"collection": name, "collection_id": row["id"],
                                                "documents": row["documents"]})


def delete_collection_batch(session: Session, job_id: uuid.UUID, batch: int) -> int:
    """Delete up to `batch` documents of the job's collection (chunks, vectors and postings cascade), or,
    once none is left, the collection itself (its ingest jobs cascade) and mark the job finished.
    Returns the documents deleted; 0 means the job is done. Safe to run again after a crash."""
    params = session.execute(text("SELECT params FROM jobs WHERE id = :id AND kind = 'delete' FOR UPDATE"),
                             {"id": job_id}).scalar()
    if params is None or "finished_at" in params:
        return 0
    cid = params["collection_id"]
    deleted = session.execute(
        text("DELETE FROM documents WHERE id IN (SELECT id FROM documents WHERE collection_id = :c LIMIT :n)"),
        {"c": cid, "n": batch},
    ).rowcount  # type: ignore[attr-defined]
    now = "now()" if deleted else "now(), 'finished_at', now()"
    if not deleted:
        session.execute(text("DELETE FROM collections WHERE id = :c AND name LIKE :tomb"),
                        {"c": cid, "tomb": f"{DELETING}%"})
    session.execute(text(f"UPDATE jobs SET params = params || jsonb_build_object('updated_at', {now}) "
                         "WHERE id = :id"), {"id": job_id})
    return int(deleted)


def stalled_collection_deletes(session: Session, older_than_minutes: int) -> list[uuid.UUID]:
    """Collection-delete jobs not finished and not advanced for a while (their task was lost)."""
    rows = session.execute(
        text("SELECT id FROM jobs WHERE kind = 'delete' AND NOT params ? 'finished_at' "
             "AND coalesce((params->>'updated_at')::timestamptz, created_at) "
             "    < now() - make_interval(mins => :m)"),
        {"m": older_than_minutes},
    ).scalars().all()
    return list(rows)


# Compactions take this transaction-level advisory lock: one at a time, the others skip.
LEXICAL_COMPACTION_LOCK = 0x70677361  # "pgsa"


def compact_lexical_statistics(session: Session) -> bool:
    """Fold the BM25 statistics' deltas (appended by triggers on the postings and lengths, migration 0008) into
    their base rows; drop the deltas of collections gone and the base rows that fell to zero. One compaction at
    a time: returns False at once when another runs. Deltas committed meanwhile wait for the next one."""
    if not session.execute(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": LEXICAL_COMPACTION_LOCK}).scalar():
        return False
    emptied = session.execute(text("""
        WITH moved AS (DELETE FROM lexical_df_deltas RETURNING *),
        summed AS (
            SELECT m.collection_id, m.scope, m.term, sum(m.delta) AS delta FROM moved m
             WHERE EXISTS (SELECT 1 FROM collections c WHERE c.id = m.collection_id)
             GROUP BY 1, 2, 3 HAVING sum(m.delta) <> 0
        )
        INSERT INTO lexical_df AS b (collection_id, scope, term, df)
        SELECT collection_id, scope, term, delta FROM summed ORDER BY 1, 2, 3
        ON CONFLICT (collection_id, scope, term) DO UPDATE SET df = b.df + EXCLUDED.df
        RETURNING b.collection_id, b.scope, b.term, b.df""")).all()
    emptied = [r for r in emptied if r.df <= 0]
    if emptied:  # terms no item of the scope holds any more
        session.execute(
            text("DELETE FROM lexical_df WHERE (collection_id, scope, term) IN (SELECT * FROM unnest("
                 "CAST(:c AS integer[]), CAST(:s AS text[]), CAST(:t AS text[]))) AND df <= 0"),
            {"c": [r.collection_id for r in emptied], "s": [r.scope for r in emptied], "t": [r.term for r in emptied]},
        )
    session.execute(text("""
        WITH moved AS (DELETE FROM lexical_size_deltas RETURNING *),
        summed AS (
            SELECT m.collection_id, m.scope, sum(m.n) AS n, sum(m.total) AS total FROM moved m
             WHERE EXISTS (SELECT 1 FROM collections c WHERE c.id = m.collection_id)
             GROUP BY 1, 2
        )
        INSERT INTO lexical_size AS b (collection_id, scope, n, total)
        SELECT collection_id, scope, n, total FROM summed ORDER BY 1, 2
        ON CONFLICT (collection_id, scope) DO UPDATE SET n = b.n + EXCLUDED.n, total = b.total + EXCLUDED.total"""))
    session.execute(text("DELETE FROM lexical_size WHERE n <= 0 AND total <= 0"))  # one row per scope: small
    return True


# The tables the question path plans over: their statistics must follow their growth.
SEARCHED_TABLES = ("documents", "chunks", "chunk_postings", "lexical_postings", "chunk_vectors", "sentence_vectors",
                   "document_vectors", "lexical_df")


def analyze_grown(session: Session) -> list[str]:
    """ANALYZE the searched tables that grew by a fifth (or were never analysed) since their last ANALYZE; returns
    them. Autovacuum gets there too, but up to a minute or more after an ingest, and until then the planner plans
    a new collection's questions as if its tables were empty (measured: 60 ms searches that took 10 ms after;
    BENCHMARKS.md, skew). A table another ANALYZE or VACUUM holds is skipped (the other one is doing it)."""
    grown = session.execute(text("""
        SELECT relname FROM pg_stat_user_tables
         WHERE relname = ANY(:t) AND n_live_tup + n_mod_since_analyze > 0
           AND (coalesce(last_analyze, last_autoanalyze) IS NULL
                OR n_mod_since_analyze > 1000 + 0.2 * n_live_tup)
         ORDER BY relname"""), {"t": list(SEARCHED_TABLES)}).scalars().all()
    if grown:
        session.execute(text(f"ANALYZE (SKIP_LOCKED) {', '.join(grown)}"))
    return list(grown)


def _page_after(cursor: tuple[datetime, uuid.UUID] | None, column: str, params: dict[str, Any]) -> str:
    """The keyset condition of a newest-first page: rows strictly after the cursor's (time, id)."""
    if cursor is None:
        return ""
    params["after_t"], params["after_id"] = cursor
    return f" AND ({column}, x.id) < (:after_t, :after_id)"


def list_collections(session: Session, visible: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The collections the key reaches, with their documents by status and chunks."""
    return status_summary(session, visible, collections_only=True)["collections"]  # type: ignore[no-any-return]


def list_documents(
    session: Session,
    visible: Sequence[str] | None,
    *,
    collection: str | None,
    status: str | None,
    q: str | None,
    limit: int,
    cursor: tuple[datetime, uuid.UUID] | None,
) -> list[dict[str, Any]]:
    """A page of documents, newest change first (keyset on (updated_at, id)); q matches title or external id."""
    params: dict[str, Any] = {"visible": visible, "coll": collection, "status": status, "limit": limit,
                              "q": None if q is None else "%" + q.replace("\\", "\\\\").replace("%", "\\%")
                              .replace("_", "\\_") + "%"}
    rows = session.execute(
        text(f"""
        SELECT x.id, c.name AS collection, x.external_id, x.title, x.status, x.error, x.chunk_count,
               x.created_at, x.updated_at, x.indexed_at
          FROM documents x JOIN collections c ON c.id = x.collection_id
         WHERE {VISIBLE}
           AND (CAST(:coll AS text) IS NULL OR c.name = :coll)
           AND (CAST(:status AS text) IS NULL OR x.status = :status)
           AND (CAST(:q AS text) IS NULL OR x.title ILIKE :q OR x.external_id ILIKE :q)
           {_page_after(cursor, "x.updated_at", params)}
         ORDER BY x.updated_at DESC, x.id DESC
         LIMIT :limit"""),
        params,
    ).mappings().all()
    return [dict(r) for r in rows]


def list_jobs(
    session: Session,
    visible: Sequence[str] | None,
    *,
    collection: str | None,
    limit: int,
    cursor: tuple[datetime, uuid.UUID] | None,
) -> list[dict[str, Any]]:
    """A page of ingest jobs, newest first (keyset on (created_at, id)), each with its state and counts."""
    params: dict[str, Any] = {"visible": visible, "coll": collection, "limit": limit}
    rows = session.execute(
        text(f"""
        SELECT x.id, x.kind, x.created_at, x.params, coalesce(c.name, x.params->>'collection') AS collection, i.*
          FROM jobs x LEFT JOIN collections c ON c.id = x.collection_id
          CROSS JOIN LATERAL (
              SELECT count(*) AS total,
                     count(*) FILTER (WHERE status = 'done') AS done,
                     count(*) FILTER (WHERE status = 'unchanged') AS unchanged,
                     count(*) FILTER (WHERE status = 'failed') AS failed,
                     max(updated_at) AS updated_at
                FROM job_documents WHERE job_id = x.id) i
         WHERE {_job_visible("x")}
           AND (CAST(:coll AS text) IS NULL OR coalesce(c.name, x.params->>'collection') = :coll)
           {_page_after(cursor, "x.created_at", params)}
         ORDER BY x.created_at DESC, x.id DESC
         LIMIT :limit"""),
        params,
    ).mappings().all()
    return [_delete_summary(session, r) if r["kind"] == "delete" else _job_summary(r, r) for r in rows]


def status_summary(
    session: Session, visible: Sequence[str] | None = None, *, collections_only: bool = False
) -> dict[str, Any]:
    """Counts for `pgsage status`: collections, documents by status, chunks, jobs, spaces (within visible)."""
    collections = (
        session.execute(
            text("""
        SELECT c.name,
               count(d.id) AS documents,
               count(d.id) FILTER (WHERE d.status = 'indexed') AS indexed,
               count(d.id) FILTER (WHERE d.status = 'queued') AS queued,
               count(d.id) FILTER (WHERE d.status = 'failed') AS failed,
               coalesce(sum(d.chunk_count) FILTER (WHERE d.status = 'indexed'), 0) AS chunks
          FROM collections c LEFT JOIN documents d ON d.collection_id = c.id
         WHERE """
                + VISIBLE
                + " GROUP BY c.name ORDER BY c.name"
            ),
            {"visible": visible},
        )
        .mappings()
        .all()
    )
    if collections_only:
        return {"collections": [dict(c) for c in collections]}
    jobs = (
        session.execute(
            text("""
        SELECT count(*) AS total,
               count(*) FILTER (WHERE EXISTS (SELECT 1 FROM job_documents i
                                               WHERE i.job_id = j.id AND i.status = 'pending')) AS running
          FROM jobs j LEFT JOIN collections c ON c.id = j.collection_id
         WHERE """
                + _job_visible("j")
            ),
            {"visible": visible},
        )
        .mappings()
        .one()
    )
    spaces = (
        session.execute(
            text(
                "SELECT id, name, revision, dimension, pooling, normalize, status, fingerprint, activated_at, "
                # Only the collections the key reaches: another tenant's counts would show its activity.
                "(SELECT count(*) FROM chunk_vectors v JOIN collections c ON c.id = v.collection_id "
                " WHERE v.model_id = m.id AND " + VISIBLE + ") AS vectors "
                "FROM embedding_models m WHERE status <> 'dropped' ORDER BY id"
            ),
            {"visible": visible},
        )
        .mappings()
        .all()
    )
    return {
        "collections": [dict(c) for c in collections],
        "documents": sum(c["documents"] for c in collections),
        "chunks": int(sum(c["chunks"] for c in collections)),
        "jobs": dict(jobs),
        "models": [dict(s) for s in spaces],
        "active_model": next((dict(s) for s in spaces if s["status"] == "active"), None),
    }

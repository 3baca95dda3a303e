"""Documents are stored a group per transaction (store.write_documents), and still succeed or fail one by one.

The worker writes each embedded group of documents in one transaction, a statement per kind of row for all of
them (the per-document statements, triggers and commits were most of the store path's cost: BENCHMARKS.md).
Here the real pipeline, model and database: a group is one transaction; a document whose storing fails (a
trigger in the test database refuses its chunk) fails alone with the reason while its group-mates are
indexed; a document changed while it was embedded is skipped, not overwritten with the stale version.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

from app.config import Settings
from app.db.session import make_engine, make_sessionmaker, session_scope
from app.embedding import EmbedderPool, chunker_key
from app.ingest import store
from app.ingest.embed import embed_documents
from app.ingest.load import LoadedDocument
from app.ingest.pipeline import IngestPipeline, chunker_for, split_document
from app.reindex import spaces
from tests.fixtures.services import migrate, scratch_database

POISON = "pgsage-test-refuses-this-chunk"
TOPICS = ["granite breakwaters shelter the moorings", "the keeper lit the paraffin lamp at dusk",
          "tide tables are printed each spring", "fog horns sound every thirty seconds",
          "the ferry crosses twice a day in summer", "gulls nest on the old pier"]


@pytest.fixture(scope="module")
def engine(database_url: str, settings: Settings) -> Iterator[Engine]:
    """A database of its own, so its refusing trigger touches no other test."""
    server = make_url(database_url).set(database="postgres").render_as_string(hide_password=False)
    with scratch_database(server) as url:
        migrate(url)
        engine = make_engine(settings.model_copy(update={"database_url": url}))
        with engine.begin() as conn:
            conn.execute(text(f"""
                CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                    IF NEW.text LIKE '%{POISON}%' THEN
                        RAISE EXCEPTION 'this test refuses chunk %', NEW.ordinal;
                    END IF;
                    RETURN NEW;
                END $$;
                CREATE TRIGGER refuse_poison BEFORE INSERT ON chunks FOR EACH ROW EXECUTE FUNCTION refuse_poison();
            """))
        try:
            yield engine
        finally:
            engine.dispose()


@pytest.fixture(scope="module")
def pool(settings: Settings) -> EmbedderPool:
    return EmbedderPool(settings)


def _upload(engine: Engine, pool: EmbedderPool, texts: dict[str, str]) -> tuple[uuid.UUID, list[uuid.UUID]]:
    factory = make_sessionmaker(engine)
    with session_scope(factory) as session:
        spaces.ensure_active(session, pool.configured.spec)
        cid = store.collection_id(session, f"groups-{uuid.uuid4().hex[:8]}", create=True)
        job = store.create_job(session, "ingest", cid, {})
        queued = store.upsert_documents(
            session, cid, [LoadedDocument(name, None, body) for name, body in texts.items()], job).queued
    return job, queued


def _states(engine: Engine, ids: list[uuid.UUID]) -> dict[str, tuple[str, str | None, int, int]]:
    """Per document: status, error, chunks and the number of transactions its chunks were written in."""
    with engine.connect() as conn:
        rows = conn.execute(text("""
            SELECT d.external_id, d.status, d.error, count(c.id) AS chunks,
                   count(DISTINCT c.xmin::text) AS transactions
              FROM documents d LEFT JOIN chunks c ON c.document_id = d.id
             WHERE d.id = ANY(:ids) GROUP BY 1, 2, 3"""), {"ids": ids}).all()
    return {r.external_id: (r.status, r.error, r.chunks, r.transactions) for r in rows}


def test_a_group_is_one_transaction_and_a_bad_document_fails_alone(engine: Engine, pool: EmbedderPool) -> None:
    texts = {f"note-{i}.txt": f"Harbour note {i}: {topic}." for i, topic in enumerate(TOPICS)}
    texts["note-3.txt"] += f" {POISON}"
    job, ids = _upload(engine, pool, texts)
    outcome = IngestPipeline(make_sessionmaker(engine), pool).process(job, ids)

    assert (outcome.indexed, outcome.failed, outcome.skipped) == (5, 1, 0)
    states = _states(engine, ids)
    status, error, chunks, _ = states.pop("note-3.txt")
    assert (status, chunks) == ("failed", 0)
    assert "storing failed" in (error or "")
    assert "this test refuses chunk 0" in (error or "")
    assert all(s[0] == "indexed" and s[1] is None and s[2] == 1 for s in states.values()), states
    with engine.connect() as conn:
        items = dict(conn.execute(text("SELECT status, count(*) FROM job_documents WHERE job_id = :j GROUP BY 1"),
                                  {"j": job}).all())
        postings = conn.execute(text("SELECT count(DISTINCT document_id) FROM lexical_postings "
                                     "WHERE document_id = ANY(:ids)"), {"ids": ids}).scalar_one()
    assert items == {"done": 5, "failed": 1}
    assert postings == 5  # the failed document left nothing behind

    # Without the bad document, the whole group is written by one transaction.
    job, ids = _upload(engine, pool, {f"clean-{i}.txt": f"Quay record {i}: {t}." for i, t in enumerate(TOPICS)})
    outcome = IngestPipeline(make_sessionmaker(engine), pool).process(job, ids)
    assert outcome.indexed == len(TOPICS)
    with engine.connect() as conn:
        written_in = conn.execute(text("SELECT count(DISTINCT xmin::text) FROM chunks WHERE document_id = ANY(:ids)"),
                                  {"ids": ids}).scalar_one()
    assert written_in == 1


def test_a_document_changed_meanwhile_is_skipped_and_its_group_written(engine: Engine, pool: EmbedderPool) -> None:
    factory = make_sessionmaker(engine)
    _, ids = _upload(engine, pool, {"a.txt": "The lock gates open at high water.",
                                      "b.txt": "Pilots board the ships outside the bar."})
    with session_scope(factory) as session:
        pending = store.pending_documents(session, ids)
        space = spaces.active(session)
        assert space is not None
        space_id = space.id
    embedder = pool.configured
    chunker = chunker_for(embedder)
    key = chunker_key(space.params or {})
    chunk_lists = [split_document(chunker, d) for d in pending]
    vectors = embed_documents(embedder, chunk_lists)
    # b.txt is sent again, changed, after it was embedded: the write must not store the old version.
    changed = next(d for d in pending if d.content.startswith("Pilots"))
    with session_scope(factory) as session:
        store.upsert_documents(session, changed.collection_id,
                               [LoadedDocument("b.txt", None, "Pilots now board inside the harbour.")],
                               store.create_job(session, "ingest", changed.collection_id, {}))
    with session_scope(factory) as session:
        written = store.write_documents(session, [
            store.DocumentWrite(d, [store.ChunkSet(key, c, {space_id: v})])
            for d, c, v in zip(pending, chunk_lists, vectors, strict=True)])
    assert written == {d.id: d is not changed for d in pending}
    states = _states(engine, ids)
    assert states["a.txt"][:3] == ("indexed", None, 1)
    assert states["b.txt"][:3] == ("queued", None, 0)

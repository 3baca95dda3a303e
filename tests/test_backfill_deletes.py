"""The backfill tolerates documents deleted under it (issue 27, point 6a).

A re-index reads a batch of chunks, embeds them, and inserts their vectors into the new space. A delete (DELETE
/v1/documents/{id}, a collection-delete batch, or a replace, which deletes the old chunks) that is open while
the insert reads, and commits while it waits on the deleted rows' locks, made the insert's foreign-key check
fail, and the job and its space were marked failed. Here the delete's transaction is held open on a second
connection until the backfill's statement waits on it, then committed: the order is forced, not hoped for.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.db.session import make_engine, make_sessionmaker, session_scope
from app.embedding import EmbedderPool, chunker_key
from app.ingest import store
from app.ingest.embed import embed_documents
from app.ingest.load import LoadedDocument
from app.ingest.pipeline import IngestPipeline, chunker_for, split_document
from app.reindex import backfill, spaces
from app.reindex.pipeline import ReindexPipeline
from app.reindex.plan import plan
from tests.fixtures.services import migrate, scratch_database

TEXTS = {
    "harbour.md": "# Harbours\n\nA breakwater of granite blocks shelters the moorings from the winter swell.\n",
    "lighthouse.md": "# Lighthouses\n\nThe keeper climbed the tower at dusk to light the paraffin lamp.\n\n"
                     "Its beam turned once every ten seconds and could be seen twenty miles out at sea.\n",
    "tides.md": "# Tides\n\nSpring tides follow the new and the full moon; neap tides the quarters.\n",
}
DOOMED = "lighthouse.md"
REPLACED = "# Lighthouses\n\nThe lamp is electric now and the keeper has gone; a sensor lights it at dusk.\n"


@dataclasses.dataclass
class Scene:
    settings: Settings
    engine: Engine
    factory: sessionmaker[Session]
    pool: EmbedderPool
    job_id: uuid.UUID
    target: int


@pytest.fixture
def scene(database_url: str, settings: Settings) -> Iterator[Scene]:
    """A database of its own with three documents in two collections and a re-index opened, not yet run."""
    server = make_url(database_url).set(database="postgres").render_as_string(hide_password=False)
    with scratch_database(server) as url:
        migrate(url)
        local = settings.model_copy(update={"database_url": url})
        engine = make_engine(local)
        try:
            factory = make_sessionmaker(engine)
            pool = EmbedderPool(local)
            with session_scope(factory) as session:
                spaces.ensure_active(session, pool.configured.spec)
            pipeline = IngestPipeline(factory, pool)
            for collection, names in (("coast", ["harbour.md"]), ("lights", [DOOMED, "tides.md"])):
                with session_scope(factory) as session:
                    cid = store.collection_id(session, collection, create=True)
                    job = store.create_job(session, "ingest", cid, {})
                    docs = [LoadedDocument(n, None, TEXTS[n], format="markdown") for n in names]
                    queued = store.upsert_documents(session, cid, docs, job).queued
                assert pipeline.process(job, queued).indexed == len(names)
            with session_scope(factory) as session:
                opened = plan(session, dataclasses.replace(pool.configured.spec, pooling="max"))
                assert opened.job_id is not None, opened
                target = session.execute(text("SELECT target_model_id FROM reindex_jobs WHERE id = :j"),
                                         {"j": opened.job_id}).scalar_one()
            yield Scene(local, engine, factory, pool, opened.job_id, int(target))
        finally:
            engine.dispose()


def _doomed(session: Session) -> uuid.UUID:
    return session.execute(text("SELECT id FROM documents WHERE external_id = :e"), {"e": DOOMED}).scalar_one()


def _delete_document(scene: Scene, session: Session) -> None:
    store.delete_document(session, _doomed(session))


def _delete_collection(scene: Scene, session: Session) -> None:
    with session_scope(scene.factory) as first:
        job = store.start_collection_delete(first, "lights", None)
    assert store.delete_collection_batch(session, job, 10) == 2  # a batch as the worker runs it: both documents


def _replace(scene: Scene, session: Session) -> None:
    """What an ingest worker's write of a new version does: its old chunks go, its new ones (with vectors in every
    live space, the re-index's target too) come, in one transaction."""
    with session_scope(scene.factory) as first:
        cid = store.collection_id(first, "lights")
        job = store.create_job(first, "ingest", cid, {})
        [doc_id] = store.upsert_documents(first, cid, [LoadedDocument(DOOMED, None, REPLACED, format="markdown")],
                                          job).queued
        [doc] = store.pending_documents(first, [doc_id])
        live = spaces.live(first)
    chunks = split_document(chunker_for(scene.pool.configured), doc)
    vectors = {s.id: embed_documents(scene.pool.for_space(s), [chunks])[0] for s in live}
    key = chunker_key(live[0].params or {})
    written = store.write_documents(session, [store.DocumentWrite(doc, [store.ChunkSet(key, chunks, vectors)])])
    assert written == {doc_id: True}


DELETERS: dict[str, Callable[[Scene, Session], None]] = {
    "document": _delete_document, "collection": _delete_collection, "replace": _replace}


def _waiting(engine: Engine, table: str) -> bool:
    """Whether a statement writing `table` waits on a lock."""
    with engine.connect() as conn:
        return bool(conn.execute(text(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query ILIKE :q"),
            {"q": f"%INSERT INTO {table}%"}).scalar_one())


def _while_open(scene: Scene, deleter: Callable[[Scene, Session], None], table: str,
                work: Callable[[], Any]) -> list[Any]:
    """Run `work` in a thread while the delete's transaction is open; commit the delete once `work` waits on it
    to write `table` (or has finished). What `work` returned or raised."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(work())
        except BaseException as exc:  # shown by the caller's assertions
            out.append(exc)

    with scene.factory() as deleting:
        deleter(scene, deleting)
        deleting.flush()
        worker = threading.Thread(target=run)
        worker.start()
        deadline = time.monotonic() + 300  # a hang guard: the model loads and embeds meanwhile
        while worker.is_alive() and not _waiting(scene.engine, table):
            assert time.monotonic() < deadline, "the backfill never reached the deleted rows"
            time.sleep(0.05)
        deleting.commit()
    worker.join(timeout=300)
    assert not worker.is_alive(), "the backfill hung after the delete committed"
    return out


def _counts(engine: Engine, space: int) -> tuple[int, int, int, int]:
    """Indexed chunks of the space's chunk set, and the space's chunk, sentence and document vectors, that
    belong to indexed documents."""
    with engine.connect() as conn:
        params = conn.execute(text("SELECT params FROM embedding_models WHERE id = :m"), {"m": space}).scalar_one()
        return conn.execute(text("""
            SELECT (SELECT count(*) FROM chunks c JOIN documents d ON d.id = c.document_id
                     WHERE d.status = 'indexed' AND c.chunker = :ck),
                   (SELECT count(*) FROM chunk_vectors WHERE model_id = :m),
                   (SELECT count(DISTINCT chunk_id) FROM sentence_vectors WHERE model_id = :m),
                   (SELECT count(*) FROM document_vectors WHERE model_id = :m)"""),
                            {"m": space, "ck": chunker_key(params or {})}).one()._tuple()


@pytest.mark.parametrize("kind", list(DELETERS))
def test_a_delete_committed_during_a_backfill_batch_does_not_fail_the_reindex(scene: Scene, kind: str) -> None:
    pipeline = ReindexPipeline(scene.settings, scene.engine, scene.factory, scene.pool)
    [outcome] = _while_open(scene, DELETERS[kind], "chunk_vectors", lambda: pipeline.run(scene.job_id))
    with scene.engine.connect() as conn:
        job = conn.execute(text("SELECT status, error FROM reindex_jobs WHERE id = :j"),
                           {"j": scene.job_id}).one()
        active = conn.execute(text("SELECT id FROM embedding_models WHERE status = 'active'")).scalar_one()
    assert (getattr(outcome, "status", outcome), tuple(job)) == ("succeeded", ("succeeded", None))
    assert active == scene.target
    chunks, vectors, sentenced, documents = _counts(scene.engine, scene.target)
    left = {"document": 2, "collection": 1, "replace": 3}[kind]
    assert (vectors, sentenced, documents) == (chunks, chunks, left)


@pytest.mark.parametrize("kind", ["document", "collection"])
def test_a_delete_committed_while_document_vectors_are_written(scene: Scene, kind: str) -> None:
    with session_scope(scene.factory) as session:
        batch = backfill.next_batch(session, scene.target, scene.pool.configured.spec.chunker, 0, 1000)
        assert batch is not None
        target = spaces.by_id(session, scene.target)
    [vectors] = embed_documents(scene.pool.for_space(target), [batch.chunks])
    with session_scope(scene.factory) as session:
        assert backfill.write_batch(session, scene.job_id, scene.target, batch, vectors, advance_cursor=True) \
            == len(batch.ids)

    def document_vectors() -> None:
        with session_scope(scene.factory) as session:
            backfill.write_document_vectors(session, scene.target, target.dimension)

    assert _while_open(scene, DELETERS[kind], "document_vectors", document_vectors) == [None]
    chunks, vectors, _, documents = _counts(scene.engine, scene.target)
    assert (vectors, documents) == (chunks, {"document": 2, "collection": 1}[kind])

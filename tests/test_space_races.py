"""Races between document writes, re-index switches, rollbacks and retirement (issue 11, defects 2 and 3).

Defect 2: a document write covers the embedding spaces live when it commits.

An ingest task reads its target spaces at its start and used to keep them for its whole batch (up to 256
documents, up to an hour). A re-index that opened (or switched, or was rolled back) meanwhile then got
documents with no vectors in its space. Here the real pipeline, model and database: a switch-like SHARE
lock on chunks holds the write back after its vectors were made for the old space alone, a re-index job
opens while it waits, and the write must end with the document's vectors in both spaces.
(tests/test_reindex.py has the same with two worker processes and a whole re-index.)

Defect 3: retiring an old space used DROP INDEX (ACCESS EXCLUSIVE on chunk_vectors: every search and write
queued behind it) and a bulk DELETE, and checked the space's status once, without the plan lock: a rollback
committed meanwhile made the space active and retirement then emptied it.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

from app.config import Settings
from app.db.session import make_engine, make_sessionmaker, session_scope
from app.embedding import EmbedderPool
from app.errors import Conflict
from app.ingest import store
from app.ingest.load import LoadedDocument
from app.ingest.pipeline import IngestOutcome, IngestPipeline
from app.reindex import spaces
from app.reindex.pipeline import ReindexPipeline
from app.reindex.plan import plan
from app.reindex.switch import retire_expired, rollback
from tests.fixtures.helpers import ingest_texts
from tests.fixtures.services import migrate, scratch_database

HARBOUR = """# Harbours

A breakwater of granite blocks shelters the moorings from the winter swell.
"""
TEXT = """# Lighthouses

The keeper climbed the tower at dusk to light the paraffin lamp behind the Fresnel lens.

Its beam turned once every ten seconds and could be seen twenty miles out at sea.
"""


@pytest.fixture
def engine(database_url: str, settings: Settings) -> Iterator[Engine]:
    """A database of its own: this test opens a re-index job, which the session's database must not see."""
    server = make_url(database_url).set(database="postgres").render_as_string(hide_password=False)
    with scratch_database(server) as url:
        migrate(url)
        engine = make_engine(settings.model_copy(update={"database_url": url}))
        try:
            yield engine
        finally:
            engine.dispose()


def _waiting_on_chunks(engine: Engine) -> bool:
    with engine.connect() as conn:
        return bool(conn.execute(text(
            "SELECT count(*) FROM pg_locks WHERE relation = 'chunks'::regclass AND NOT granted")).scalar_one())


def test_a_write_held_up_by_a_reindex_opening_writes_its_space_too(engine: Engine, settings: Settings) -> None:
    factory = make_sessionmaker(engine)
    pool = EmbedderPool(settings)
    pipeline = IngestPipeline(factory, pool)
    with session_scope(factory) as session:
        old = spaces.ensure_active(session, pool.configured.spec).id
        cid = store.collection_id(session, "lights", create=True)
        job = store.create_job(session, "ingest", cid, {})
        [doc] = store.upsert_documents(session, cid, [LoadedDocument("lighthouse.md", None, TEXT,
                                                                     format="markdown")], job).queued

    outcome: list[IngestOutcome | BaseException] = []

    def ingest() -> None:
        try:
            outcome.append(pipeline.process(job, [doc]))
        except BaseException as exc:  # shown by the assertions below
            outcome.append(exc)

    with factory() as holder:
        # What a switch or a rollback holds while it decides: document writes wait for it.
        spaces.hold_writes(holder)
        writer = threading.Thread(target=ingest)
        writer.start()
        deadline = time.monotonic() + 120
        while not _waiting_on_chunks(engine):  # embedded for the old space alone, now waiting to write
            assert writer.is_alive(), "the write never waited on the lock"
            assert time.monotonic() < deadline, "the write never waited on the lock"
            time.sleep(0.05)
        opened = plan(holder, dataclasses.replace(pool.configured.spec, pooling="max"))
        assert opened.created, opened
        holder.commit()
    writer.join(timeout=300)
    assert len(outcome) == 1
    assert isinstance(outcome[0], IngestOutcome), outcome
    assert outcome[0].indexed == 1, outcome

    with engine.connect() as conn:
        new = conn.execute(text("SELECT target_model_id FROM reindex_jobs WHERE id = :j"),
                           {"j": opened.job_id}).scalar_one()
        chunks = conn.execute(text("SELECT count(*) FROM chunks WHERE document_id = :d"), {"d": doc}).scalar_one()
        assert chunks > 0
        for space in (old, new):
            vectors = conn.execute(text("SELECT count(*) FROM chunk_vectors WHERE document_id = :d AND model_id = :m"),
                                   {"d": doc, "m": space}).scalar_one()
            whole = conn.execute(text("SELECT count(*) FROM document_vectors WHERE document_id = :d "
                                      "AND model_id = :m"), {"d": doc, "m": space}).scalar_one()
            assert (vectors, whole) == (chunks, 1), f"space {space}"
        # The new space's vectors are its own model's (max pooling), not a copy of the old ones.
        same = conn.execute(text("""
            SELECT bool_and(a.embedding = b.embedding) FROM chunk_vectors a JOIN chunk_vectors b USING (chunk_id)
             WHERE a.document_id = :d AND a.model_id = :o AND b.model_id = :n"""),
                            {"d": doc, "o": old, "n": new}).scalar_one()
        assert same is False


def _blocked(engine: Engine, statement: str) -> bool:
    with engine.connect() as conn:
        return bool(conn.execute(text(
            "SELECT count(*) FROM pg_stat_activity WHERE query ILIKE :q AND wait_event_type = 'Lock'"),
            {"q": statement + "%"}).scalar_one())


def test_retirement_blocks_no_query_and_loses_to_a_rollback(engine: Engine, settings: Settings) -> None:
    factory = make_sessionmaker(engine)
    pool = EmbedderPool(settings)
    with session_scope(factory) as session:
        old = spaces.ensure_active(session, pool.configured.spec).id
    ingest_texts(IngestPipeline(factory, pool), factory, {"lighthouse.md": TEXT, "harbour.md": HARBOUR})
    with session_scope(factory) as session:
        opened = plan(session, dataclasses.replace(pool.configured.spec, pooling="max"))
    assert opened.job_id is not None
    assert ReindexPipeline(settings, engine, factory, pool).run(opened.job_id).status == "succeeded"
    with engine.connect() as conn:
        new = conn.execute(text("SELECT id FROM embedding_models WHERE status = 'active'")).scalar_one()
    assert new != old

    result: list[list[int] | BaseException] = []

    def retire() -> None:
        try:
            result.append(retire_expired(engine, 0))
        except BaseException as exc:  # shown by the assertions below
            result.append(exc)

    with engine.connect() as reader:
        # A long read of the vector table (a search, a backup) is open when the retirement starts.
        reader.execute(text("SELECT count(*) FROM chunk_vectors"))
        retiring = threading.Thread(target=retire)
        retiring.start()
        deadline = time.monotonic() + 60
        while not _blocked(engine, "DROP INDEX"):
            assert retiring.is_alive(), result
            assert time.monotonic() < deadline, "the retirement never waited on the open read"
            time.sleep(0.05)
        # Meanwhile queries of the active space are answered (they used to queue behind DROP INDEX's lock).
        with engine.connect() as conn:
            conn.execute(text("SET lock_timeout = '3s'"))
            served = conn.execute(text("SELECT count(*) FROM chunk_vectors WHERE model_id = :m"), {"m": new})
            assert served.scalar_one() > 0
        # And an operator rolls back to the space being retired: either the rollback wins (and the space is
        # kept) or it is refused; never both.
        refused = None
        try:
            with session_scope(factory) as session:
                rollback(session)
        except Conflict as exc:
            refused = str(exc)
        reader.commit()
    retiring.join(timeout=120)
    assert len(result) == 1
    assert isinstance(result[0], list), result

    with engine.connect() as conn:
        active = conn.execute(text("SELECT id FROM embedding_models WHERE status = 'active'")).scalar_one()
        chunks = conn.execute(text("SELECT count(*) FROM chunks c JOIN documents d ON d.id = c.document_id "
                                   "WHERE d.status = 'indexed'")).scalar_one()
        vectors = conn.execute(text("SELECT count(*) FROM chunk_vectors WHERE model_id = :m"),
                               {"m": active}).scalar_one()
        documents = conn.execute(text("SELECT count(*) FROM document_vectors WHERE model_id = :m"),
                                 {"m": active}).scalar_one()
        index_valid = conn.execute(text(
            "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname = :n"),
            {"n": spaces.index_name("chunk_vectors", active)}).scalar()
        assert (vectors, documents, index_valid) == (chunks, 2, True), f"active space {active}"
        assert (active == new) == (refused is not None), refused
        if active == new:  # the rollback was refused: the old space is gone, rows and index
            assert result[0] == [old]
            assert conn.execute(text("SELECT count(*) FROM chunk_vectors WHERE model_id = :m"),
                                {"m": old}).scalar_one() == 0
            assert conn.execute(text("SELECT status FROM embedding_models WHERE id = :m"),
                                {"m": old}).scalar_one() == "dropped"

"""A failure belongs to the version of a document that failed (issue 11, defect 9).

A worker that fails an old version of a document (its chunking, its storing, its attempts) must not mark
failed the newer version uploaded meanwhile, nor that upload's job item.
"""

from __future__ import annotations

import uuid

from sqlalchemy import create_engine, text

from app.db.session import make_sessionmaker, session_scope
from app.ingest import store
from app.ingest.load import LoadedDocument


def test_failing_an_old_version_leaves_the_new_one_queued(database_url: str) -> None:
    engine = create_engine(database_url)
    factory = make_sessionmaker(engine)
    try:
        with session_scope(factory) as session:
            cid = store.collection_id(session, f"versions-{uuid.uuid4().hex[:8]}", create=True)
            first_job = store.create_job(session, "ingest", cid, {})
            store.upsert_documents(session, cid, [LoadedDocument("manual.md", None, "Version one.")], first_job)
        with session_scope(factory) as session:
            [old] = store.pending_documents(session, _ids(session, cid))
        # The same document sent again, changed, while a worker still holds the first version.
        with session_scope(factory) as session:
            second_job = store.create_job(session, "ingest", cid, {})
            store.upsert_documents(session, cid, [LoadedDocument("manual.md", None, "Version two.")], second_job)

        with session_scope(factory) as session:
            store.mark_failed(session, old.id, "chunking failed: something about version one", old.content_hash)

        with engine.connect() as conn:
            doc = conn.execute(text("SELECT status, error, content FROM documents WHERE id = :d"),
                               {"d": old.id}).one()
            items = dict(conn.execute(text("SELECT job_id, status FROM job_documents WHERE document_id = :d"),
                                      {"d": old.id}).all())
        assert (doc.status, doc.error, doc.content) == ("queued", None, "Version two.")
        assert items[second_job] == "pending"

        # The version that is current does fail when it fails.
        with session_scope(factory) as session:
            [new] = store.pending_documents(session, [old.id])
            store.mark_failed(session, new.id, "chunking failed: version two", new.content_hash)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT status FROM documents WHERE id = :d"), {"d": old.id}).scalar() == "failed"
            assert conn.execute(text("SELECT status FROM job_documents WHERE document_id = :d AND job_id = :j"),
                                {"d": old.id, "j": second_job}).scalar() == "failed"
    finally:
        engine.dispose()


def _ids(session: object, cid: int) -> list[uuid.UUID]:
    return list(session.execute(text("SELECT id FROM documents WHERE collection_id = :c"), {"c": cid}).scalars())  # type: ignore[attr-defined]

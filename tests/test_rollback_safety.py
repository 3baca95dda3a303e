"""A rollback never reaches a space that stopped receiving writes (issue 27, point 5).

Only the space the last switch retired is written beside the active one. Two re-indexes (A -> B -> C), a
document written after the second, and two rollbacks in a row used to land on A, where that document has no
vectors: dense and hybrid search lost it, and /v1/ask could not find it. Here with the real model, pipelines
and database, and the API on a database of this test's own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

from app.config import Settings
from app.db.session import make_engine, make_sessionmaker, session_scope
from app.embedding import EmbedderPool, chunker_key
from app.ingest.pipeline import IngestPipeline
from app.main import create_app
from app.reindex import spaces
from app.reindex.pipeline import ReindexPipeline
from app.reindex.plan import plan
from tests.fixtures.helpers import as_admin, ingest_texts
from tests.fixtures.services import migrate, scratch_database

HARBOUR = """# Harbours

A breakwater of granite blocks shelters the moorings from the winter swell.
"""
LATE = """# Lighthouses

The keeper climbed the tower at dusk to light the paraffin lamp behind the Fresnel lens.
"""


@pytest.fixture
def database(database_url: str) -> Iterator[str]:
    """A database of its own: this test re-indexes, which the session's database must not see."""
    server = make_url(database_url).set(database="postgres").render_as_string(hide_password=False)
    with scratch_database(server) as url:
        migrate(url)
        yield url


def _unvectored(engine: Engine, space: int) -> list[str]:
    """Indexed documents with a chunk of the space's chunk set that has no vector in the space."""
    with engine.connect() as conn:
        params = conn.execute(text("SELECT params FROM embedding_models WHERE id = :m"), {"m": space}).scalar_one()
        return list(conn.execute(text("""
            SELECT DISTINCT d.external_id FROM documents d JOIN chunks c ON c.document_id = d.id
             WHERE d.status = 'indexed' AND c.chunker = :ck
               AND NOT EXISTS (SELECT 1 FROM chunk_vectors v WHERE v.chunk_id = c.id AND v.model_id = :m)
             ORDER BY 1"""), {"m": space, "ck": chunker_key(params or {})}).scalars())


def _active(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT id FROM embedding_models WHERE status = 'active'")).scalar_one())


def test_two_rollbacks_never_reach_a_space_that_missed_writes(database: str, settings: Settings) -> None:
    local = settings.model_copy(update={"database_url": database})
    engine = make_engine(local)
    try:
        factory = make_sessionmaker(engine)
        pool = EmbedderPool(local)
        ingest = IngestPipeline(factory, pool)
        with session_scope(factory) as session:
            a = spaces.ensure_active(session, pool.configured.spec).id
        ingest_texts(ingest, factory, {"harbour.md": HARBOUR})
        built = [a]
        for pooling in ("max", "cls"):  # A -> B -> C
            with session_scope(factory) as session:
                opened = plan(session, dataclasses.replace(pool.configured.spec, pooling=pooling))
            assert opened.job_id is not None, opened
            assert ReindexPipeline(local, engine, factory, pool).run(opened.job_id).status == "succeeded"
            built.append(_active(engine))
        a, b, c = built
        # Written after the second switch: to C, and to B (the space a rollback would restore), not to A.
        ingest_texts(ingest, factory, {"lighthouse.md": LATE})

        with TestClient(create_app(local)) as client:
            as_admin(client)
            before = client.get("/v1/admin/reindex").json()
            first = client.post("/v1/admin/reindex/rollback")
            assert first.status_code == 200, first.text
            assert _active(engine) == b
            assert _unvectored(engine, b) == []
            second = client.post("/v1/admin/reindex/rollback")
            if second.status_code == 200:  # wherever a rollback lands, every document is in its space
                assert _unvectored(engine, _active(engine)) == [], second.json()
            assert second.status_code == 409, second.text
            assert _active(engine) == b
            after = client.get("/v1/admin/reindex").json()
            # A question about the late document is answered from the restored space.
            found = client.post("/v1/search", json={"query": "paraffin lamp Fresnel lens", "collection": "lights",
                                                    "mode": "dense", "k": 1}).json()

        # What a client sees: the spaces a rollback can reach, before and after it.
        targets: list[dict[str, Any]] = before["rollback_targets"]
        assert [t["id"] for t in targets] == [b], before
        assert first.json() == {"from_space": c, "to_space": b, "rollback_targets": []}
        assert after["rollback_targets"] == [], after
        assert "no previous embedding space" in second.json()["detail"], second.json()
        assert (found["space"]["id"], found["results"][0]["external_id"]) == (b, "lighthouse.md"), found
        with engine.connect() as conn:
            statuses = dict(conn.execute(text("SELECT id, status FROM embedding_models")).all())
        # A stopped receiving writes at the second switch: no longer a rollback target, dropped in time.
        assert statuses == {a: "superseded", b: "active", c: "rolled_back"}
    finally:
        engine.dispose()

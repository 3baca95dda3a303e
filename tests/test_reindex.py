"""Re-indexing when the embedding model changes, with every part real.

A seed database is ingested once with the old configuration (a real worker and API), then copied
(CREATE DATABASE ... TEMPLATE) into a fresh database per scenario: the active space is global per
database, and a copy is much cheaper than ingesting again. Each scenario restarts the services with
a new configuration of the packaged model: a worker process with the new environment and a new API
app (create_app(settings)), and checks what happens with SQL and through /v1/search.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import sessionmaker

from app import keys
from app.db.session import session_scope
from app.embedding import CHUNKER_VERSION, Embedder, ModelSpec, chunker_key, resolve_model_path
from app.ingest.chunk import with_context
from app.ingest.pipeline import chunker_for, split_document
from app.ingest.store import PendingDocument
from app.main import create_app
from app.reindex.plan import cancel, plan
from app.reindex.switch import retire_expired, switch
from tests.fixtures.helpers import as_admin, upload, wait_for_job
from tests.fixtures.services import (
    WorkerProcess,
    api_process,
    migrate,
    postgres_server,
    scratch_database,
    settings_of,
)

# Whole re-indexes with real workers (about 9 minutes): kept behind the slow marker, run by .ci/run.
pytestmark = pytest.mark.slow

CORPUS = Path(__file__).parent / "data" / "corpus"
SCIFACT = Path(__file__).parents[2] / "shared" / "data" / "scifact" / "corpus.jsonl"
SCIFACT_DOCS = 300

# The old configuration names its revision, so the revision scenario can move it from v1 to v2.
OLD = {"PGSAGE_EMBEDDING_REVISION": "v1"}
CHANGES = {
    "pooling": {"PGSAGE_EMBEDDING_POOLING": "cls"},
    "dimension": {"PGSAGE_EMBEDDING_DIMENSION": "256"},
    "revision": {"PGSAGE_EMBEDDING_REVISION": "v2"},
    # A half-precision HNSW index (issue 14): a new space like any other change.
    "index_type": {"PGSAGE_VECTOR_INDEX_TYPE": "halfvec"},
}
# Small batches, so a re-index of the SciFact sample spans many batches (and many queries).
SLOW = {"PGSAGE_REINDEX_BATCH_CHUNKS": "16"}

DOCS_QUERIES = [
    "how long should espresso extraction take and how fine to grind",
    "why does magma rise and cause explosive eruptions",
    "when should I replace a worn bike chain",
    "overnight proofing and baking in a dutch oven",
]
SCIFACT_QUERIES = [
    "diffusion tensor imaging of white matter in newborn brains",
    "vitamin D and bone mineral density",
    "mutations of tumour suppressor genes in cancer",
    "antibiotic resistance of bacteria",
]
FINISHED = ("succeeded", "failed", "cancelled")
# Specs for the tests of planning alone (no model is loaded): the old one and a changed pooling.
OLD_SPEC = ModelSpec("all-MiniLM-L6-v2", "v1", 384, "mean", True, 254, 32, CHUNKER_VERSION)
NEW_SPEC = ModelSpec("all-MiniLM-L6-v2", "v1", 384, "max", True, 254, 32, CHUNKER_VERSION)

Results = list[tuple[int, float]]


# ---------------------------------------------------------------------------------------------
# Services and databases


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@contextmanager
def cloned_database(server_url: str, template_url: str) -> Iterator[str]:
    """A fresh database copied from the template database (which must have no other sessions)."""
    source = make_url(template_url).database
    name = f"pgsage_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(_libpq(server_url), autocommit=True) as conn:
        for attempt in range(20):
            # Idle pooled connections of a still-running worker or API would block the copy; their
            # pools notice the closed connections (pre-ping) and reconnect.
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (source,),
            )
            try:
                conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{source}"')
                break
            except psycopg.errors.ObjectInUse:
                if attempt == 19:
                    raise
                time.sleep(0.25)
    url = make_url(template_url).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with psycopg.connect(_libpq(server_url), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def engine_on(url: str) -> Iterator[Engine]:
    engine = create_engine(url, pool_pre_ping=True)
    try:
        yield engine
    finally:
        engine.dispose()


def service_env(url: str, redis_url: str, **knobs: str) -> dict[str, str]:
    """The environment of a worker process: this database, a queue of its own, the model knobs."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("PGSAGE_")}
    return {
        **base,
        "PGSAGE_DATABASE_URL": url,
        "PGSAGE_REDIS_URL": redis_url,
        "PGSAGE_QUEUE_NAME": f"pgsage-reindex-{uuid.uuid4().hex[:8]}",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **knobs,
    }


@contextmanager
def running_worker(env: dict[str, str], log_path: Path, *, new_session: bool = False) -> Iterator[WorkerProcess]:
    worker = WorkerProcess(env, log_path, new_session=new_session)
    try:
        worker.start()
        yield worker
    finally:
        worker.stop()


@contextmanager
def worker_and_api(env: dict[str, str], log_path: Path) -> Iterator[tuple[WorkerProcess, TestClient]]:
    """Restart both with env: the worker process loads while the API app starts in this process."""
    worker = WorkerProcess(env, log_path)
    try:
        with ThreadPoolExecutor(1) as pool:
            started = pool.submit(worker.start)
            with TestClient(create_app(settings_of(env))) as client:
                as_admin(client)
                started.result()
                yield worker, client
    finally:
        worker.stop()


def latest_job(engine: Engine) -> dict[str, Any] | None:
    with engine.connect() as conn:
        row = conn.execute(text("SELECT * FROM reindex_jobs ORDER BY created_at DESC LIMIT 1")).mappings().first()
    return dict(row) if row else None


def wait_job(
    engine: Engine, until: Callable[[dict[str, Any]], bool], what: str, timeout: float = 900
) -> dict[str, Any]:
    """Poll the latest re-index job until the condition holds."""
    deadline = time.monotonic() + timeout
    job = None
    while time.monotonic() < deadline:
        job = latest_job(engine)
        if job is not None and until(job):
            return job
        time.sleep(0.2)
    raise AssertionError(f"re-index job not {what} after {timeout}s: {job}")


def finished(job: dict[str, Any]) -> bool:
    return job["status"] in FINISHED


def active_space(engine: Engine) -> tuple[int, str]:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT id, fingerprint FROM embedding_models WHERE status = 'active'")).all()
    assert len(rows) == 1, rows
    return int(rows[0].id), str(rows[0].fingerprint)


def search(client: TestClient, collection: str, query: str, k: int = 5) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    r = client.post("/v1/search", json={"query": query, "k": k, "collection": collection})
    assert r.status_code == 200, r.text
    body = r.json()
    return body["space"], body["results"]


def ranked(results: list[dict[str, Any]]) -> Results:
    return [(int(h["chunk_id"]), float(h["score"])) for h in results]


def search_all(client: TestClient, collection: str, queries: list[str]) -> tuple[set[int], dict[str, Results]]:
    """Results of each query, and the spaces that served them."""
    spaces: set[int] = set()
    out: dict[str, Results] = {}
    for q in queries:
        space, results = search(client, collection, q)
        spaces.add(int(space["id"]))
        out[q] = ranked(results)
    return spaces, out


def assert_all_vectors_in(engine: Engine, space_id: int) -> None:
    """Every chunk and document of the indexed documents has its one vector in the space."""
    with engine.connect() as conn:

        def scalar(sql: str) -> int:
            return int(conn.execute(text(sql), {"m": space_id}).scalar_one())

        chunks = scalar("SELECT count(*) FROM chunks")
        assert chunks > 0
        chunks_without = scalar(
            "SELECT count(*) FROM chunks c JOIN documents d ON d.id = c.document_id WHERE d.status = 'indexed' "
            "AND NOT EXISTS (SELECT 1 FROM chunk_vectors v WHERE v.chunk_id = c.id AND v.model_id = :m)"
        )
        documents_without = scalar(
            "SELECT count(*) FROM documents d WHERE d.status = 'indexed' "
            "AND NOT EXISTS (SELECT 1 FROM document_vectors v WHERE v.document_id = d.id AND v.model_id = :m)"
        )
        assert chunks_without == documents_without == 0
        assert scalar("SELECT count(*) FROM chunk_vectors WHERE model_id = :m") == chunks
        assert scalar("SELECT count(DISTINCT chunk_id) FROM chunk_vectors WHERE model_id = :m") == chunks
        documents = scalar("SELECT count(*) FROM documents WHERE status = 'indexed'")
        assert scalar("SELECT count(*) FROM document_vectors WHERE model_id = :m") == documents
        assert scalar("SELECT count(DISTINCT document_id) FROM document_vectors WHERE model_id = :m") == documents


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


# ---------------------------------------------------------------------------------------------
# The seed: ingested once with the old configuration


@dataclass
class Seed:
    server: str
    small: str  # the shipped corpus in collection "docs"
    large: str  # the same plus the SciFact sample in collection "scifact"
    old_space_id: int
    old_fingerprint: str
    docs_before: dict[str, Results] = field(default_factory=dict)
    scifact_before: dict[str, Results] = field(default_factory=dict)


def _ingest(client: TestClient, name: str, data: bytes, collection: str, documents: int) -> None:
    r = upload(client, name, data, collection)
    assert r.status_code == 202, r.text
    job = wait_for_job(client, r.json()["job_id"], timeout=600)
    assert job["state"] == "succeeded", job
    assert job["indexed"] == documents, job


@pytest.fixture(scope="module")
def pg_server() -> Iterator[str]:
    with postgres_server() as server:
        yield server


@pytest.fixture(scope="module")
def seed(pg_server: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seed]:
    if not SCIFACT.exists():
        pytest.skip(f"the SciFact corpus is absent ({SCIFACT})")
    lines = SCIFACT.read_text().splitlines()[:SCIFACT_DOCS]
    logs = tmp_path_factory.mktemp("seed")
    with ExitStack() as stack:
        large = stack.enter_context(scratch_database(pg_server))
        migrate(large)
        env = service_env(large, redis_url, **OLD)
        with worker_and_api(env, logs / "worker.log") as (_, client):
            for path in sorted(CORPUS.iterdir()):
                _ingest(client, path.name, path.read_bytes(), "docs", 1)
            spaces, docs_before = search_all(client, "docs", DOCS_QUERIES)
            small = stack.enter_context(cloned_database(pg_server, large))
            _ingest(client, "scifact.jsonl", ("\n".join(lines) + "\n").encode(), "scifact", len(lines))
            _, scifact_before = search_all(client, "scifact", SCIFACT_QUERIES)
        with engine_on(large) as engine:  # disposed on leaving: a template database must have no sessions
            space_id, fingerprint = active_space(engine)
        assert spaces == {space_id}
        yield Seed(pg_server, small, large, space_id, fingerprint, docs_before, scifact_before)


# ---------------------------------------------------------------------------------------------
# 1. A configuration change re-indexes by itself, and search moves to the new model


@pytest.mark.parametrize("change", list(CHANGES))
def test_config_change_reindexes_by_itself(seed: Seed, redis_url: str, tmp_path: Path, change: str) -> None:
    with cloned_database(seed.server, seed.small) as url, engine_on(url) as engine:
        env = service_env(url, redis_url, **{**OLD, **CHANGES[change]})
        embedder = Embedder(settings_of(env))
        new_fingerprint = embedder.spec.fingerprint
        assert new_fingerprint != seed.old_fingerprint
        assert embedder.dimension == (256 if change == "dimension" else 384)
        assert latest_job(engine) is None

        with worker_and_api(env, tmp_path / "worker.log") as (_, client):  # a restart, and no command
            job = wait_job(engine, finished, "finished")
            assert job["status"] == "succeeded", job
            assert job["reason"] == "detected"
            new_id, active_fingerprint = active_space(engine)
            assert active_fingerprint == new_fingerprint
            assert new_id == job["target_model_id"] != seed.old_space_id
            assert_all_vectors_in(engine, new_id)
            with engine.connect() as conn:
                dims = conn.execute(
                    text(
                        "SELECT DISTINCT vector_dims(embedding) FROM chunk_vectors WHERE model_id = :m UNION "
                        "SELECT DISTINCT vector_dims(embedding) FROM document_vectors WHERE model_id = :m"
                    ),
                    {"m": new_id},
                )
                assert dims.scalars().all() == [embedder.dimension]
                index = conn.execute(text("SELECT indexdef FROM pg_indexes WHERE indexname = :n"),
                                     {"n": f"ix_chunk_vectors_hnsw_m{new_id}"}).scalar_one()
                kind = "halfvec" if change == "index_type" else "vector"
                assert f"(embedding)::{kind}({embedder.dimension})) {kind}_cosine_ops" in index, index

            for query in DOCS_QUERIES:
                space, results = search(client, "docs", query)
                assert space == {"id": new_id, "fingerprint": new_fingerprint}
                # The chunk is embedded under its heading path.
                q, top = embedder.encode([query, with_context(" > ".join(results[0]["heading_path"]),
                                                             results[0]["text"])])
                # int8 quantises activations with one scale per batch: a chunk embedded alone here differs a little
                # from the same chunk embedded among others by the worker.
                tolerance = 0.03 if embedder.backend == "onnx-int8" else 1e-5
                assert results[0]["similarity"] == pytest.approx(cosine(q, top), abs=tolerance)
            # The dense leg's statement can walk the new space's index (its expression, in the index's vector
            # type): with the other plans ruled out, the plan walks it even on this small collection.
            assert f"ix_chunk_vectors_hnsw_m{new_id}" in _dense_plan(engine, new_id, q)


def _dense_plan(engine: Engine, space_id: int, query: np.ndarray) -> str:
    """EXPLAIN of the dense leg's statement (retrieve.dense_chunks) in the space, with the plans that could not use
    its index ruled out: on a collection this small the planner rightly prefers them otherwise."""
    from sqlalchemy import event
    from sqlalchemy.orm import Session

    from app.models import EmbeddingModel
    from app.query import retrieve

    statements: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        statements.append((statement, parameters))

    with Session(engine) as session:
        space = session.get(EmbeddingModel, space_id)
        assert space is not None
        cid = session.execute(text("SELECT id FROM collections WHERE name = 'docs'")).scalar_one()
        # Ruled out: sequential scans, and sorts (the HNSW walk is the one path that yields the rows in order).
        session.execute(text("SET LOCAL enable_seqscan = off"))
        session.execute(text("SET LOCAL enable_sort = off"))
        event.listen(engine, "before_cursor_execute", capture)
        try:
            retrieve.dense_chunks(session, space, query, cid, 5, filters=None, ef_search=40, max_scan_tuples=20_000)
        finally:
            event.remove(engine, "before_cursor_execute", capture)
        sql, parameters = statements[-1]
        return "\n".join(r[0] for r in session.connection().exec_driver_sql("EXPLAIN " + sql, parameters))


def _chunk_sets(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {r.chunker: int(r.n) for r in conn.execute(text("SELECT chunker, count(*) AS n FROM chunks GROUP BY 1"))}


def test_chunker_change_rechunks_every_document(seed: Seed, redis_url: str, tmp_path: Path) -> None:
    """A new chunker (here a smaller chunk budget; a new CHUNKER_VERSION takes the same path) re-chunks every
    document from its stored content beside the old chunks, switches, and the old chunks go with the old space."""
    with cloned_database(seed.server, seed.small) as url, engine_on(url) as engine:
        env = service_env(url, redis_url, **OLD, PGSAGE_CHUNK_MAX_TOKENS="96")
        embedder = Embedder(settings_of(env))
        new_key = chunker_key(embedder.spec.params)
        [old_key] = _chunk_sets(engine)
        assert new_key != old_key
        with worker_and_api(env, tmp_path / "worker.log") as (_, client):
            job = wait_job(engine, finished, "finished")
            assert job["status"] == "succeeded", job
            new_id, _ = active_space(engine)
            sets = _chunk_sets(engine)
            assert set(sets) == {old_key, new_key}  # the old chunks stay while the old space can be rolled back
            chunker = chunker_for(embedder)
            with engine.connect() as conn:
                docs = conn.execute(text(
                    "SELECT id, collection_id, content, content_hash, title, format FROM documents "
                    "WHERE status = 'indexed'"
                )).all()
                assert docs
                for d in docs:
                    expected = split_document(chunker, PendingDocument(d.id, d.collection_id, d.content,
                                                                       d.content_hash, 0, d.title, d.format))
                    stored = conn.execute(text(
                        "SELECT c.ordinal, c.text, c.char_start, c.char_end, c.heading_path, c.token_count, "
                        "(SELECT count(*) FROM chunk_vectors v WHERE v.chunk_id = c.id AND v.model_id = :m) AS vecs, "
                        "(SELECT count(*) FROM sentence_vectors v WHERE v.chunk_id = c.id AND v.model_id = :m) AS sv "
                        "FROM chunks c WHERE c.document_id = :d AND c.chunker = :k ORDER BY c.ordinal"
                    ), {"d": d.id, "k": new_key, "m": new_id}).all()
                    assert [(r.ordinal, r.text, r.char_start, r.char_end, tuple(r.heading_path), r.token_count)
                            for r in stored] == [(c.ordinal, c.text, c.char_start, c.char_end, c.heading_path,
                                                  c.token_count) for c in expected]
                    assert [(r.vecs, r.sv) for r in stored] == [(1, len(c.sentences)) for c in expected]
                    assert max(c.token_count for c in expected) <= 96
            # Queries are served from the new chunks.
            with engine.connect() as conn:
                new_ids = set(conn.execute(text("SELECT id FROM chunks WHERE chunker = :k"), {"k": new_key}).scalars())
            for query in DOCS_QUERIES:
                space, results = search(client, "docs", query)
                assert space["id"] == new_id
                assert {int(r["chunk_id"]) for r in results} <= new_ids
            # Retirement drops the old space's vectors and, with them, its chunk set.
            retired = retire_expired(engine, 0)
            assert retired == [seed.old_space_id]
            assert set(_chunk_sets(engine)) == {new_key}


# ---------------------------------------------------------------------------------------------
# 2. A steady query load through the re-index and its switch; 6. rollback


@dataclass
class Response:
    started: float
    query: str
    status: int | None
    body: Any


@dataclass
class UnderLoad:
    client: TestClient
    engine: Engine
    old_id: int
    new_id: int
    running_at: float  # when the job was first seen running with progress
    switched_at: float
    before: dict[str, Results]
    after: dict[str, Results]
    responses: list[Response]


def _query_load(client: TestClient, stop: threading.Event, out: list[Response]) -> None:
    i = 0
    while not stop.is_set():
        query = SCIFACT_QUERIES[i % len(SCIFACT_QUERIES)]
        i += 1
        started = time.monotonic()
        try:
            r = client.post("/v1/search", json={"query": query, "k": 5, "collection": "scifact"})
            out.append(Response(started, query, r.status_code, r.json()))
        except Exception as exc:  # a failed request is a finding, recorded for the test
            out.append(Response(started, query, None, repr(exc)))
        stop.wait(0.02)  # steady, but leaving the worker some of the two cores


@pytest.fixture(scope="module")
def under_load(seed: Seed, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[UnderLoad]:
    """The SciFact sample re-indexed (mean -> cls) while a thread queries an API that runs the new config."""
    logs = tmp_path_factory.mktemp("load")
    with cloned_database(seed.server, seed.large) as url, engine_on(url) as engine:
        env = service_env(url, redis_url, **OLD, **CHANGES["pooling"], **SLOW)
        # The API restarts first: it opens the job (and queues it) but keeps serving from the old space.
        with TestClient(create_app(settings_of(env))) as client:
            as_admin(client)
            job = latest_job(engine)
            assert job is not None
            assert job["status"] == "pending"
            spaces, before = search_all(client, "scifact", SCIFACT_QUERIES)
            assert spaces == {seed.old_space_id}
            assert before == seed.scifact_before  # the old model still embeds the queries

            responses: list[Response] = []
            stop = threading.Event()
            load = threading.Thread(target=_query_load, args=(client, stop, responses), daemon=True)
            load.start()
            try:
                with running_worker(env, logs / "worker.log"):
                    running = wait_job(engine, lambda j: j["done_chunks"] > 0 or finished(j), "running")
                    running_at = time.monotonic()
                    job = wait_job(engine, finished, "finished")
                    switched_at = time.monotonic()
                    # Keep querying the new space for a moment.
                    deadline = time.monotonic() + 60
                    while time.monotonic() < deadline and sum(r.started > switched_at for r in responses) < 8:
                        time.sleep(0.1)
            finally:
                stop.set()
                load.join(60)
            assert running["status"] == "running", running
            assert job["status"] == "succeeded", job
            new_id = int(job["target_model_id"])
            spaces, after = search_all(client, "scifact", SCIFACT_QUERIES)
            assert spaces == {new_id}
            yield UnderLoad(
                client, engine, seed.old_space_id, new_id, running_at, switched_at, before, after, responses
            )


def test_queries_during_reindex_never_fail_nor_mix_spaces(under_load: UnderLoad) -> None:
    responses = under_load.responses
    assert responses
    failed = [(r.status, r.body) for r in responses if r.status != 200]
    assert not failed, failed[:3]
    served = {"old": 0, "new": 0, "old while running": 0}
    for r in responses:
        space, results = int(r.body["space"]["id"]), ranked(r.body["results"])
        assert space in (under_load.old_id, under_load.new_id)
        if space == under_load.old_id:
            assert results == under_load.before[r.query]
            served["old"] += 1
            served["old while running"] += r.started > under_load.running_at
        else:
            assert results == under_load.after[r.query]
            served["new"] += 1
    assert served["old while running"] >= 1, served
    assert served["new"] >= 1, served
    # Once served from the new space, never from the old one again.
    spaces = [int(r.body["space"]["id"]) for r in sorted(responses, key=lambda r: r.started)]
    assert under_load.old_id not in spaces[spaces.index(under_load.new_id) :]


def test_rollback_restores_the_previous_results_exactly(under_load: UnderLoad) -> None:
    client = under_load.client
    assert under_load.after != under_load.before
    for query in SCIFACT_QUERIES:
        assert under_load.after[query] != under_load.before[query], query

    r = client.post("/v1/admin/reindex/rollback")
    assert r.status_code == 200, r.text
    assert r.json() == {"from_space": under_load.new_id, "to_space": under_load.old_id, "rollback_targets": []}

    spaces, restored = search_all(client, "scifact", SCIFACT_QUERIES)
    assert spaces == {under_load.old_id}
    assert restored == under_load.before
    assert active_space(under_load.engine)[0] == under_load.old_id


LATE_DOC = """# Lighthouse keeping

The keeper climbed the spiral stair at dusk to light the paraffin lamp behind the Fresnel lens.
"""
CHANGED_CHESS = """# Chess openings

The Zukertort gambit sacrifices a knight on the fourth move for an attack on the black king.
"""


def test_documents_written_after_a_switch_survive_a_rollback(seed: Seed, redis_url: str, tmp_path: Path) -> None:
    """Issue 11, defect 1: a document added, and one changed, after a re-index switched are still found in
    every mode and grouping once the old space is rolled back to (each has its vectors there too)."""
    with cloned_database(seed.server, seed.small) as url, engine_on(url) as engine:
        env = service_env(url, redis_url, **{**OLD, **CHANGES["pooling"]})
        with worker_and_api(env, tmp_path / "worker.log") as (_, client):
            job = wait_job(engine, finished, "finished")
            assert job["status"] == "succeeded", job
            _ingest(client, "lighthouse.md", LATE_DOC.encode(), "docs", 1)
            _ingest(client, "chess.md", CHANGED_CHESS.encode(), "docs", 1)

            r = client.post("/v1/admin/reindex/rollback")
            assert r.status_code == 200, r.text
            assert active_space(engine)[0] == seed.old_space_id
            assert_all_vectors_in(engine, seed.old_space_id)
            for query, expected, words in (("keeper lights the paraffin lamp of the lighthouse", "lighthouse.md",
                                            "Fresnel lens"),
                                           ("Zukertort gambit knight sacrifice", "chess.md", "Zukertort")):
                for mode in ("hybrid", "dense", "lexical"):
                    for group in ("passage", "document"):
                        r = client.post("/v1/search", json={"query": query, "k": 3, "collection": "docs",
                                                            "mode": mode, "group": group})
                        assert r.status_code == 200, r.text
                        body = r.json()
                        assert body["space"]["id"] == seed.old_space_id
                        top = body["results"][0]
                        assert (top["external_id"], words in top["text"]) == (expected, True), (mode, group, top)


# ---------------------------------------------------------------------------------------------
# 3. A worker killed mid-way; a restart finishes the job


def test_killed_worker_resumes_after_restart(seed: Seed, redis_url: str, tmp_path: Path) -> None:
    with cloned_database(seed.server, seed.large) as url, engine_on(url) as engine:
        # The restarted worker re-sends a job whose heartbeat is older than this (the minimum).
        env = service_env(url, redis_url, **OLD, **CHANGES["dimension"], **SLOW, PGSAGE_REINDEX_STALE_SECONDS="10")
        first = WorkerProcess(env, tmp_path / "worker-1.log", new_session=True)
        try:
            first.start()  # its start opens the job
            job = wait_job(engine, lambda j: j["done_chunks"] > 0 or finished(j), "under way")
            assert first.proc is not None
            os.killpg(first.proc.pid, signal.SIGKILL)  # the celery main process and its pool child
            first.proc.wait(30)
        finally:
            first.stop()
        assert job["status"] == "running", job
        killed = latest_job(engine)
        assert killed is not None
        assert killed["status"] == "running", killed
        assert 0 < killed["done_chunks"] < killed["total_chunks"], killed

        # Start again once the job looks stalled, so the restart's model check sends it again.
        deadline = time.monotonic() + 60
        with engine.connect() as conn:
            while not conn.execute(
                text("SELECT heartbeat_at < now() - interval '11 seconds' FROM reindex_jobs WHERE id = :id"),
                {"id": job["id"]},
            ).scalar_one():
                conn.rollback()  # a new transaction, so now() moves on
                assert time.monotonic() < deadline, "the killed job's heartbeat does not age"
                time.sleep(0.5)
        with running_worker(env, tmp_path / "worker-2.log"):
            done = wait_job(engine, finished, "finished")
        assert done["status"] == "succeeded", done
        assert done["id"] == job["id"]

        target = int(done["target_model_id"])
        assert active_space(engine)[0] == target
        with engine.connect() as conn:
            chunks = conn.execute(text("SELECT count(*) FROM chunks")).scalar_one()
            vectors, distinct = conn.execute(
                text("SELECT count(*), count(DISTINCT chunk_id) FROM chunk_vectors WHERE model_id = :m"),
                {"m": target},
            ).one()
            documents = conn.execute(text("SELECT count(*) FROM documents")).scalar_one()
            doc_vectors, doc_distinct = conn.execute(
                text("SELECT count(*), count(DISTINCT document_id) FROM document_vectors WHERE model_id = :m"),
                {"m": target},
            ).one()
        assert vectors == chunks == distinct
        assert doc_vectors == documents == doc_distinct
        assert_all_vectors_in(engine, target)


# ---------------------------------------------------------------------------------------------
# Cancel


def test_cancel_keeps_the_old_space(seed: Seed, redis_url: str, tmp_path: Path) -> None:
    with cloned_database(seed.server, seed.large) as url, engine_on(url) as engine:
        env = service_env(url, redis_url, **OLD, **CHANGES["pooling"], **SLOW)
        with TestClient(create_app(settings_of(env))) as client:
            as_admin(client)
            _, before = search_all(client, "scifact", SCIFACT_QUERIES)
            assert before == seed.scifact_before
            with running_worker(env, tmp_path / "worker.log") as worker:
                job = wait_job(engine, lambda j: j["done_chunks"] > 0 or finished(j), "under way")
                assert job["status"] == "running", job
                r = client.post("/v1/admin/reindex/cancel")
                assert r.status_code == 200, r.text
                assert r.json() == {"cancelled": str(job["id"])}

                # The worker stops at its next batch.
                deadline = time.monotonic() + 60
                while not any(
                    line in worker.log_path.read_text(errors="replace")
                    for line in ("stopped: cancelled", "was stopped before its switch")
                ):
                    assert time.monotonic() < deadline, "the worker did not stop the cancelled job"
                    time.sleep(0.2)

                progress = client.get("/v1/admin/reindex").json()
                assert progress["job"]["status"] == "cancelled"
                assert progress["active_space"]["id"] == seed.old_space_id
                spaces, now = search_all(client, "scifact", SCIFACT_QUERIES)
                assert spaces == {seed.old_space_id}
                assert now == before
        assert active_space(engine) == (seed.old_space_id, seed.old_fingerprint)
        with engine.connect() as conn:
            target = conn.execute(
                text("SELECT status FROM embedding_models WHERE id = :t"), {"t": job["target_model_id"]}
            ).scalar_one()
        assert target == "cancelled"


def test_cancel_and_switch_do_not_both_win(pg_server: str) -> None:
    """A cancel that commits first stops the switch; a switch that commits first makes the cancel a no-op."""
    with scratch_database(pg_server) as url, engine_on(url) as engine:
        migrate(url)
        factory = sessionmaker(engine)

        def running_job(*, requested: bool = False) -> tuple[uuid.UUID, int, int]:
            with session_scope(factory) as session:
                planned = plan(session, NEW_SPEC, requested=requested)
                assert planned.created, planned
                job = session.execute(
                    text(
                        "UPDATE reindex_jobs SET status = 'running' WHERE id = :id RETURNING source_model_id, "
                        "target_model_id"
                    ),
                    {"id": planned.job_id},
                ).one()
            assert planned.job_id is not None
            return planned.job_id, int(job.source_model_id), int(job.target_model_id)

        with session_scope(factory) as session:
            plan(session, OLD_SPEC)
        old_id = active_space(engine)[0]

        job_id, source, target = running_job()
        with session_scope(factory) as session:
            assert cancel(session) == job_id
        with session_scope(factory) as session:
            assert switch(session, job_id, source, target) is False
        assert active_space(engine)[0] == old_id
        assert latest_job(engine)["status"] == "cancelled"  # type: ignore[index]

        with session_scope(factory) as session:  # a cancel sticks: the next check does not reopen it
            assert plan(session, NEW_SPEC).created is False
        job_id, source, target = running_job(requested=True)  # an explicit request opens a new job
        with session_scope(factory) as session:
            assert switch(session, job_id, source, target) is True
        with session_scope(factory) as session:
            assert cancel(session) is None
        assert active_space(engine)[0] == target
        assert latest_job(engine)["status"] == "succeeded"  # type: ignore[index]


# ---------------------------------------------------------------------------------------------
# 4. Processes that notice the same change at once open one job


def _plan_at_once(url: str, spec: dict[str, Any], barrier: Any, results: Any) -> None:
    """In a process of its own: plan the re-index as soon as every process is ready."""
    engine = create_engine(url)
    try:
        with engine.connect():  # connected before the barrier, so the calls race
            pass
        barrier.wait(60)
        with session_scope(sessionmaker(engine)) as session:
            planned = plan(session, ModelSpec(**spec))
        results.put((os.getpid(), planned.created, str(planned.job_id)))
    except Exception as exc:
        results.put((os.getpid(), None, repr(exc)))
    finally:
        engine.dispose()


def test_racing_processes_open_exactly_one_job(pg_server: str) -> None:
    old, new = OLD_SPEC, NEW_SPEC
    with scratch_database(pg_server) as url, engine_on(url) as engine:
        migrate(url)
        with session_scope(sessionmaker(engine)) as session:
            assert plan(session, old).job_id is None  # the first start: old becomes the active space

        ctx = multiprocessing.get_context("spawn")
        barrier, results = ctx.Barrier(3), ctx.Queue()
        fields = asdict(new)
        procs = [ctx.Process(target=_plan_at_once, args=(url, fields, barrier, results)) for _ in range(3)]
        for p in procs:
            p.start()
        outcomes = [results.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(30)

        assert all(created is not None for _, created, _ in outcomes), outcomes
        assert sum(created for _, created, _ in outcomes) == 1, outcomes
        assert len({job_id for _, _, job_id in outcomes}) == 1, outcomes
        with engine.connect() as conn:
            jobs = conn.execute(text("SELECT id, status FROM reindex_jobs")).all()
            target = conn.execute(
                text("SELECT id FROM embedding_models WHERE fingerprint = :f"), {"f": new.fingerprint}
            ).scalar_one()
        assert len(jobs) == 1, jobs
        assert str(jobs[0].id) == outcomes[0][2]
        assert jobs[0].status == "pending"
        assert active_space(engine)[1] == old.fingerprint
        assert target != active_space(engine)[0]


# ---------------------------------------------------------------------------------------------
# 5. The optional quality gate: switch only if nDCG@10 does not drop by more than the margin

GATE_QUERIES = {
    "how long should espresso extraction take and how fine to grind": "coffee.txt",
    "why does magma rise and cause explosive eruptions": "volcanoes.md",
    "when should I replace a worn bike chain": "bicycle.html",
    "which enzyme fixes carbon dioxide in plants": "photosynthesis.txt",
    "overnight proofing and baking in a dutch oven": "sourdough.md",
    "a good first move for white and developing the bishop": "chess.md",
}


def _eval_folder(root: Path) -> Path:
    """A BEIR-format labelled set over the shipped corpus (collection "docs" of the seed)."""
    (root / "qrels").mkdir(parents=True)
    lines, qrels = [], ["query-id\tcorpus-id\tscore"]
    for i, (query, doc) in enumerate(GATE_QUERIES.items()):
        lines.append(f'{{"_id": "q{i}", "text": "{query}"}}')
        qrels.append(f"q{i}\t{doc}\t1")
    (root / "queries.jsonl").write_text("\n".join(lines) + "\n")
    (root / "qrels" / "test.tsv").write_text("\n".join(qrels) + "\n")
    return root


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"PGSAGE_EMBEDDING_DIMENSION": "8"}, "refused"),  # 8 dimensions of 384: retrieval collapses
        ({"PGSAGE_EMBEDDING_REVISION": "v2"}, "succeeded"),  # same vectors: same quality
    ],
)
def test_quality_gate(seed: Seed, redis_url: str, tmp_path: Path, change: dict[str, str], expected: str) -> None:
    gate = {
        "PGSAGE_REINDEX_EVAL_DIR": str(_eval_folder(tmp_path / "eval")),
        "PGSAGE_REINDEX_EVAL_SPLIT": "test",
        "PGSAGE_REINDEX_EVAL_COLLECTION": "docs",
        "PGSAGE_REINDEX_EVAL_MARGIN": "0.01",
    }
    with cloned_database(seed.server, seed.small) as url, engine_on(url) as engine:
        env = service_env(url, redis_url, **{**OLD, **change, **gate})
        with running_worker(env, tmp_path / "worker.log"):
            job = wait_job(engine, lambda j: j["status"] not in ("pending", "running"), "finished")
        quality = job["quality"]
        assert job["status"] == expected, job
        assert quality["old"]["ndcg@10"] > 0.9  # the old space finds the right document for these queries
        assert quality["old"]["queries"] == len(GATE_QUERIES)
        if expected == "refused":
            assert quality["passed"] is False
            assert quality["new"]["ndcg@10"] < quality["old"]["ndcg@10"] - 0.01
            assert "nDCG@10" in job["error"]
            assert "margin" in job["error"]
            assert active_space(engine)[0] == seed.old_space_id  # nothing switched
            with session_scope(sessionmaker(engine)) as session:  # and the next check does not retry it
                assert plan(session, Embedder(settings_of(env)).spec).created is False
        else:
            assert quality["passed"] is True
            assert quality["new"]["ndcg@10"] == pytest.approx(quality["old"]["ndcg@10"])
            assert active_space(engine)[0] != seed.old_space_id


def test_a_permanent_error_fails_the_job_with_its_reason(seed: Seed, redis_url: str, tmp_path: Path) -> None:
    """Issue 11, defect 6: a quality gate whose evaluation collection does not exist is an error no retry can
    mend: the job fails with the reason (it used to die and be sent again every 120 s, for ever), and the
    old space stays active."""
    gate = {
        "PGSAGE_REINDEX_EVAL_DIR": str(_eval_folder(tmp_path / "eval")),
        "PGSAGE_REINDEX_EVAL_SPLIT": "test",
        "PGSAGE_REINDEX_EVAL_COLLECTION": "no-such-collection",
    }
    with cloned_database(seed.server, seed.small) as url, engine_on(url) as engine:
        env = service_env(url, redis_url, **{**OLD, **CHANGES["revision"], **gate})
        with running_worker(env, tmp_path / "worker.log"):
            job = wait_job(engine, lambda j: j["status"] not in ("pending", "running"), "finished", timeout=300)
        assert job["status"] == "failed", job
        assert "no-such-collection" in job["error"], job
        assert active_space(engine)[0] == seed.old_space_id
        with engine.connect() as conn:
            target = conn.execute(text("SELECT status FROM embedding_models WHERE id = :t"),
                                  {"t": job["target_model_id"]}).scalar_one()
        assert target == "failed"


SQUAD = Path(__file__).parents[2] / "shared" / "data" / "squad-articles" / "corpus"


def test_an_ingest_begun_before_a_reindex_writes_the_new_space_too(seed: Seed, redis_url: str, tmp_path: Path) -> None:
    """Issue 11, defect 2, with two workers: worker A (the old configuration) takes up a long batch (16 long
    articles in one task) and reads its target spaces; then worker B starts with a new configuration, opens
    the re-index and runs it while A is still writing. Every document A writes after the job opened must get
    its vectors in the new space too (A used to keep the spaces it read at its start for the whole batch, so
    the switch either never found the new space complete or left documents without vectors in it)."""
    if not SQUAD.exists():
        pytest.skip(f"the squad articles are absent ({SQUAD})")
    lines = [json.dumps({"_id": p.stem, "title": p.stem.replace("_", " "), "text": p.read_text()})
             for p in sorted(SQUAD.glob("*.md"))[:16]]
    with cloned_database(seed.server, seed.small) as url, engine_on(url) as engine:
        old_env = service_env(url, redis_url, **OLD)
        new_env = service_env(url, redis_url, **{**OLD, **CHANGES["pooling"]})  # a queue of its own
        with worker_and_api(old_env, tmp_path / "a.log") as (_, client):
            r = upload(client, "articles.jsonl", ("\n".join(lines) + "\n").encode(), "articles")
            assert r.status_code == 202, r.text

            def held() -> int:
                with engine.connect() as conn:
                    return int(conn.execute(text(
                        "SELECT count(*) FROM documents d JOIN collections c ON c.id = d.collection_id "
                        "WHERE c.name = 'articles' AND d.claimed_at IS NOT NULL")).scalar_one())

            deadline = time.monotonic() + 120
            while held() == 0:  # A has taken the batch up (and reads its target spaces right after)
                assert time.monotonic() < deadline, "worker A never took the batch up"
                time.sleep(0.1)
            time.sleep(1.0)
            assert latest_job(engine) is None
            with running_worker(new_env, tmp_path / "b.log"):
                job = wait_job(engine, finished, "finished")
                ingest = wait_for_job(client, r.json()["job_id"], timeout=900)
            assert ingest["state"] == "succeeded", ingest
            assert ingest["indexed"] == len(lines), ingest
            assert job["status"] == "succeeded", job
            new_id = active_space(engine)[0]
            assert new_id == job["target_model_id"] != seed.old_space_id
            with engine.connect() as conn:  # the switch came while A was writing, not after it
                last_write = conn.execute(text("SELECT max(indexed_at) FROM documents")).scalar_one()
            assert job["finished_at"] < last_write, (job["finished_at"], last_write)
            assert_all_vectors_in(engine, new_id)


def test_a_process_on_an_older_configuration_leaves_the_reindex_alone(
    seed: Seed, redis_url: str, tmp_path: Path
) -> None:
    """Issue 11, defect 4, with two API processes: in a rolling deploy, the API process still configured with
    the old model starts while the re-index to the new one is pending, and again after it switched. It used
    to cancel the job (its target was not its own configuration), and then to open a job back to its model,
    flipping the active space. Now it leaves both alone, serves the active space and says why in /readyz."""
    with cloned_database(seed.server, seed.small) as url, engine_on(url) as engine:
        new_env = service_env(url, redis_url, **{**OLD, **CHANGES["pooling"]})
        old_env = {**service_env(url, redis_url, **OLD), "PGSAGE_QUEUE_NAME": new_env["PGSAGE_QUEUE_NAME"]}
        with engine.begin() as conn:
            factory = sessionmaker(bind=conn)
            with factory() as session:
                _, key = keys.create(session, "deploy", "admin", ["*"])
                session.commit()
        auth = {"Authorization": f"Bearer {key}"}

        with api_process(new_env, tmp_path / "api-new.log"):  # deployed first: opens the re-index (no worker yet)
            job = latest_job(engine)
            assert job is not None
            assert job["status"] == "pending", job
            with api_process(old_env, tmp_path / "api-old.log") as old_api:  # not yet redeployed
                assert latest_job(engine)["status"] == "pending"  # type: ignore[index]
                model = httpx.get(f"{old_api}/readyz", timeout=10).json()["model"]
                assert model["state"] == "stale", model
                assert f"space {job['target_model_id']}" in model["message"], model
            with running_worker(new_env, tmp_path / "worker.log"):
                done = wait_job(engine, finished, "finished")
        assert done["id"] == job["id"]
        assert done["status"] == "succeeded", done
        new_id = active_space(engine)[0]
        assert new_id == job["target_model_id"]

        with api_process(old_env, tmp_path / "api-old.log") as old_api:  # a stale process restarted
            assert latest_job(engine)["id"] == job["id"]  # type: ignore[index]
            assert active_space(engine)[0] == new_id
            model = httpx.get(f"{old_api}/readyz", timeout=10).json()["model"]
            assert model["state"] == "stale", model
            assert (model["configured_space"], model["active_space"]) == (seed.old_space_id, new_id)
            r = httpx.post(f"{old_api}/v1/search", json={"query": DOCS_QUERIES[0], "collection": "docs"},
                           headers=auth, timeout=30)
            assert r.status_code == 200, r.text
            assert r.json()["space"]["id"] == new_id


def test_reindex_into_a_named_model(seed: Seed, redis_url: str, tmp_path: Path) -> None:
    """Issue 11, point 10: `pgsage reindex --model NAME` (POST /v1/admin/reindex {"model": ...}) re-indexes into a
    model the configuration does not name; the switch makes it the model queries use, the drift shows in
    /v1/status, and processes on the (older) configuration do not re-index back."""
    folder = tmp_path / "minilm-copy"
    shutil.copytree(resolve_model_path("all-MiniLM-L6-v2"), folder)
    with cloned_database(seed.server, seed.small) as url, engine_on(url) as engine:
        env = service_env(url, redis_url, **OLD)
        with worker_and_api(env, tmp_path / "worker.log") as (_, client):
            r = client.post("/v1/admin/reindex", json={"model": str(tmp_path / "no-such-model")})
            assert r.status_code == 404, r.text
            assert "no-such-model" in r.json()["detail"]
            assert latest_job(engine) is None

            r = client.post("/v1/admin/reindex", json={"model": str(folder)})
            assert r.status_code == 202, r.text
            job = wait_job(engine, finished, "finished")
            assert job["status"] == "succeeded", job
            assert job["reason"] == "requested"
            new_id = active_space(engine)[0]
            assert new_id == job["target_model_id"] != seed.old_space_id
            with engine.connect() as conn:
                assert conn.execute(text("SELECT name FROM embedding_models WHERE id = :i"),
                                    {"i": new_id}).scalar_one() == str(folder)
            assert_all_vectors_in(engine, new_id)
            space, _ = search(client, "docs", DOCS_QUERIES[0])
            assert space["id"] == new_id
            configuration = client.get("/v1/status").json()["configuration"]
            assert configuration["state"] == "stale", configuration
            assert (configuration["configured_space"], configuration["active_space"]) == (seed.old_space_id, new_id)
        # Processes restarted on the configuration keep the named model (no job back to the configured one).
        with worker_and_api(env, tmp_path / "worker.log") as (_, client):
            assert latest_job(engine)["id"] == job["id"]  # type: ignore[index]
            assert active_space(engine)[0] == new_id
            r = client.post("/v1/admin/reindex", json={"model": str(folder)})
            assert r.status_code == 409, r.text  # already the active one

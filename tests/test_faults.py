"""Faults, each with real processes: a worker SIGKILLed mid-ingest, Redis killed and started again during
ingestion, Postgres stopped under the API, and a poison document that kills its worker every time.

Every test ends by counting, in SQL, what the collection holds: documents by state, chunks against the
count the chunker gives for each text, one vector per chunk, one document vector and BM25 postings per
indexed document. "Complete, none twice" means those numbers are exact.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, create_engine, text

from app.config import Settings
from app.embedding import EmbedderPool
from app.ingest.chunk import Chunker
from app.ingest.pipeline import chunker_for
from app.main import create_app
from tests.fixtures.helpers import as_admin, wait_for_job
from tests.fixtures.services import OwnPostgres, OwnRedis, WorkerProcess, migrate, settings_of

# Real processes killed and restarted (about 5 minutes): kept behind the slow marker, run by .ci/run.
pytestmark = pytest.mark.slow

SCIFACT = Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact" / "corpus.jsonl"


def _texts(n: int, offset: int = 0) -> list[dict[str, str]]:
    """n real abstracts (BEIR SciFact) when the shared data is there, else varied generated prose."""
    if SCIFACT.is_file():
        rows = []
        with SCIFACT.open(encoding="utf-8") as f:
            for i, line in enumerate(f):
                if i >= offset + n:
                    break
                if i >= offset:
                    doc = json.loads(line)
                    rows.append({"_id": doc["_id"], "title": doc.get("title", ""), "text": doc["text"]})
        return rows
    words = ["tide", "moon", "orbit", "gravity", "ocean", "basin", "current", "salt", "wind", "wave", "shore",
             "reef", "delta", "glacier"]
    return [{"_id": f"g{offset + i}", "title": "",
             "text": " ".join(words[(i * 7 + j) % len(words)] + ("." if j % 11 == 10 else "")
                              for j in range(150 + 40 * (i % 9)))} for i in range(n)]


def _jsonl(rows: list[dict[str, str]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@dataclass
class Census:
    documents: int
    indexed: int
    failed: int
    queued: int
    chunks: int
    distinct_chunks: int
    chunk_vectors: int
    vectored_chunks: int
    document_vectors: int
    with_postings: int


def census(engine: Engine, collection: str) -> Census:
    with engine.connect() as conn:
        row = conn.execute(text("""
            WITH d AS (SELECT d.* FROM documents d JOIN collections c ON c.id = d.collection_id WHERE c.name = :n),
                 ch AS (SELECT ch.* FROM chunks ch JOIN d ON d.id = ch.document_id),
                 active AS (SELECT id FROM embedding_models WHERE status = 'active')
            SELECT (SELECT count(*) FROM d) AS documents,
                   (SELECT count(*) FROM d WHERE status = 'indexed') AS indexed,
                   (SELECT count(*) FROM d WHERE status = 'failed') AS failed,
                   (SELECT count(*) FROM d WHERE status = 'queued') AS queued,
                   (SELECT count(*) FROM ch) AS chunks,
                   (SELECT count(DISTINCT (document_id, ordinal)) FROM ch) AS distinct_chunks,
                   (SELECT count(*) FROM chunk_vectors v JOIN ch ON ch.id = v.chunk_id
                     WHERE v.model_id IN (SELECT id FROM active)) AS chunk_vectors,
                   (SELECT count(DISTINCT v.chunk_id) FROM chunk_vectors v JOIN ch ON ch.id = v.chunk_id
                     WHERE v.model_id IN (SELECT id FROM active)) AS vectored_chunks,
                   (SELECT count(*) FROM document_vectors v JOIN d ON d.id = v.document_id
                     WHERE v.model_id IN (SELECT id FROM active)) AS document_vectors,
                   (SELECT count(DISTINCT p.document_id) FROM lexical_postings p JOIN d ON d.id = p.document_id)
                     AS with_postings
        """), {"n": collection}).mappings().one()
    return Census(**{k: int(v) for k, v in row.items()})


@pytest.fixture(scope="module")
def chunker(settings: Settings) -> Chunker:
    """The chunker the worker uses, to know independently how many chunks each text must give."""
    return chunker_for(EmbedderPool(settings).configured)


def assert_complete(engine: Engine, collection: str, rows: list[dict[str, str]], chunker: Chunker,
                    failed: int = 0) -> Census:
    """Every document indexed (or the expected number failed), each chunk once, each with one vector.

    The expected number of chunks is the chunker's, run here on each indexed document's stored text."""
    with engine.connect() as conn:
        stored = conn.execute(text(
            "SELECT d.content, d.format, d.title FROM documents d JOIN collections c ON c.id = d.collection_id "
            "WHERE c.name = :n AND d.status = 'indexed'"), {"n": collection}).all()
    expected_chunks = sum(len(chunker.split(r.content, kind=r.format, title=r.title)) for r in stored)
    c = census(engine, collection)
    assert c.documents == len(rows) + failed, c
    assert c.indexed == len(rows), c
    assert c.failed == failed, c
    assert c.queued == 0, c
    assert c.chunks == c.distinct_chunks == expected_chunks, (c, expected_chunks)
    assert c.chunk_vectors == c.vectored_chunks == c.chunks, c
    assert c.document_vectors == c.with_postings == len(rows), c
    return c


def _fault_env(service_env: dict[str, str], **extra: str) -> dict[str, str]:
    return {**service_env, "PGSAGE_QUEUE_NAME": f"pgsage-fault-{uuid.uuid4().hex[:8]}", **extra}


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="module")
def engine(settings: Settings) -> Iterator[Engine]:
    e = create_engine(settings.database_url or "")
    yield e
    e.dispose()


# ---------------------------------------------------------------- 1. a worker SIGKILLed mid-ingest


def test_worker_killed_mid_ingest_then_restarted(
    service_env: dict[str, str], engine: Engine, chunker: Chunker, tmp_path: Path
) -> None:
    # A task the killed worker had taken but not begun (its documents never claimed) comes back by the stall
    # sweep after PGSAGE_INGEST_STALL_MINUTES (one here; the broker would return it only after an hour); a
    # begun one after the lease. Which of the two the kill hits depends on the model's speed.
    env = _fault_env(service_env, PGSAGE_INGEST_LEASE_SECONDS="10", PGSAGE_INGEST_BATCH_DOCUMENTS="24",
                     PGSAGE_INGEST_STALL_MINUTES="1")
    collection = f"kill-{uuid.uuid4().hex[:8]}"
    rows = _texts(96)
    with TestClient(create_app(settings_of(env))) as client:
        as_admin(client)
        first = WorkerProcess(env, tmp_path / "worker.log", new_session=True, beat=True)
        first.start()
        try:
            r = client.post("/v1/documents", files={"file": ("docs.jsonl", _jsonl(rows))},
                            data={"collection": collection})
            assert r.status_code == 202, r.text
            job_id = r.json()["job_id"]
            _wait(lambda: census(engine, collection).indexed >= 10, 300, "the first documents")
        finally:
            assert first.proc is not None
            os.killpg(first.proc.pid, signal.SIGKILL)  # the celery main process, its pool child and beat
            first.proc.wait(10)
        mid = census(engine, collection)
        assert 0 < mid.indexed < len(rows), mid  # killed in the middle

        second = WorkerProcess(env, tmp_path / "worker.log", beat=True)
        second.start()
        try:
            job = wait_for_job(client, job_id, timeout=600)
        finally:
            second.stop()
    assert job["state"] == "succeeded", job
    assert job["indexed"] == len(rows)
    assert_complete(engine, collection, rows, chunker)


# ---------------------------------------------------------------- 2. Redis killed and started again


def test_redis_restarted_during_ingestion(
    service_env: dict[str, str], engine: Engine, chunker: Chunker, tmp_path: Path
) -> None:
    redis = OwnRedis(tmp_path)
    redis.start()
    env = _fault_env(service_env, PGSAGE_REDIS_URL=redis.url, PGSAGE_INGEST_BATCH_DOCUMENTS="8",
                     PGSAGE_INGEST_LEASE_SECONDS="20")
    collection = f"redis-{uuid.uuid4().hex[:8]}"
    parts = [_texts(32, offset=200 + 32 * i) for i in range(3)]
    worker = WorkerProcess(env, tmp_path / "worker.log", beat=True)
    worker.start()
    try:
        with TestClient(create_app(settings_of(env))) as client:
            as_admin(client)
            jobs = []
            for i, part in enumerate(parts[:2]):
                r = client.post("/v1/documents", files={"file": (f"p{i}.jsonl", _jsonl(part))},
                                data={"collection": collection})
                assert r.status_code == 202, r.text
                jobs.append(r.json()["job_id"])
            _wait(lambda: census(engine, collection).indexed >= 4, 300, "the first documents")
            redis.kill()
            assert census(engine, collection).indexed < 64

            # While the broker is down: uploads are stored and refused with 503 + Retry-After (send again),
            # and questions are still answered (search needs only Postgres).
            down = client.post("/v1/documents", files={"file": ("p2.jsonl", _jsonl(parts[2]))},
                               data={"collection": collection})
            assert down.status_code == 503, down.text
            assert int(down.headers["retry-after"]) > 0
            assert "send the same request again" in down.json()["detail"]
            found = client.post("/v1/search", json={"query": "cells", "collection": collection})
            assert found.status_code == 200, found.text
            ready = client.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["detail"]["info"]["broker"].startswith("unreachable")
            time.sleep(3)

            redis.start()
            _wait(lambda: client.get("/readyz").status_code == 200, 60, "readiness after Redis returned")
            again = client.post("/v1/documents", files={"file": ("p2.jsonl", _jsonl(parts[2]))},
                                data={"collection": collection})
            assert again.status_code == 202, again.text
            jobs.append(again.json()["job_id"])
            for job_id in jobs:
                job = wait_for_job(client, job_id, timeout=600)
                assert job["state"] == "succeeded", job
    finally:
        worker.stop()
        redis.kill()
    assert_complete(engine, collection, [r for p in parts for r in p], chunker)


# ---------------------------------------------------------------- 3. Postgres stopped under the API


def test_postgres_stopped_gives_503_and_the_api_recovers_by_itself(
    service_env: dict[str, str], chunker: Chunker, tmp_path: Path
) -> None:
    pg = OwnPostgres(tmp_path / "db")
    try:
        migrate(pg.url)
        env = _fault_env(service_env, PGSAGE_DATABASE_URL=pg.url)
        worker = WorkerProcess(env, tmp_path / "worker.log")
        worker.start()
        try:
            with TestClient(create_app(settings_of(env))) as client:
                as_admin(client)
                rows = _texts(6)
                r = client.post("/v1/documents", files={"file": ("d.jsonl", _jsonl(rows))},
                                data={"collection": "pg"})
                assert wait_for_job(client, r.json()["job_id"])["state"] == "succeeded"
                query = {"query": rows[0]["text"][:200], "collection": "pg"}
                before = client.post("/v1/search", json=query)
                assert before.status_code == 200
                job_url = f"/v1/jobs/{r.json()['job_id']}"

                pg.stop()
                for method, path, body in (("POST", "/v1/search", query),
                                           ("POST", "/v1/ask", {"question": "what?", "collection": "pg"}),
                                           ("GET", "/v1/status", None), ("GET", job_url, None),
                                           ("POST", "/v1/documents", {"text": "new", "collection": "pg"})):
                    down = client.request(method, path, json=body)
                    # 503, not 401: the key cannot be checked, which is not the caller's fault.
                    assert down.status_code == 503, (path, down.text)
                    assert down.json()["error"] == "unavailable"
                    assert int(down.headers["retry-after"]) > 0
                ready = client.get("/readyz")
                assert ready.status_code == 503
                assert ready.json()["detail"]["info"]["database"].startswith("unreachable")
                assert client.get("/healthz").status_code == 200  # the process itself is fine

                time.sleep(2)
                pg.start()
                # No restart of the API: its pool notices the new server by itself.
                _wait(lambda: client.post("/v1/search", json=query).status_code == 200, 60, "recovery")
                after = client.post("/v1/search", json=query)
                assert [h["chunk_id"] for h in after.json()["results"]] == [
                    h["chunk_id"] for h in before.json()["results"]
                ]
                assert client.get("/readyz").status_code == 200
                assert client.get(job_url).json()["state"] == "succeeded"
            # Exactly what was there before the outage; the upload refused during it left nothing.
            own = create_engine(pg.url)
            try:
                assert_complete(own, "pg", rows, chunker)
            finally:
                own.dispose()
        finally:
            worker.stop()
    finally:
        pg.close()


# ---------------------------------------------------------------- 4. a poison document


# Three hard-time-limit kills plus a worker restart each: on a busy 2-core machine this outlasts the default.
@pytest.mark.timeout(1500)
def test_poison_document_fails_alone_after_bounded_attempts(
    service_env: dict[str, str], engine: Engine, chunker: Chunker, tmp_path: Path
) -> None:
    """A document that kills its worker each time it is processed: here one too big to embed within the
    task's hard time limit, so Celery kills the process running it. It is tried PGSAGE_INGEST_MAX_ATTEMPTS
    times, on its own after the first, then fails with the reason recorded; its batch-mates are indexed."""
    env = _fault_env(service_env, PGSAGE_INGEST_LEASE_SECONDS="5", PGSAGE_INGEST_BATCH_DOCUMENTS="4",
                     PGSAGE_INGEST_TASK_TIME_LIMIT="8", PGSAGE_INGEST_MAX_ATTEMPTS="3")
    collection = f"poison-{uuid.uuid4().hex[:8]}"
    good = _texts(11, offset=400)
    # ~1,500 chunks: a minute or more of embedding on this machine, far past the 8 s limit.
    poison_text = " ".join(f"Sentence {i} of an endless report on sediment cores and isotope ratios." for i in range(
        16_000))
    rows = [*good[:5], {"_id": "poison", "title": "", "text": poison_text}, *good[5:]]
    worker = WorkerProcess(env, tmp_path / "worker.log", beat=True)
    worker.start()
    try:
        with TestClient(create_app(settings_of(env))) as client:
            as_admin(client)
            r = client.post("/v1/documents", files={"file": ("docs.jsonl", _jsonl(rows))},
                            data={"collection": collection})
            assert r.status_code == 202, r.text
            job = wait_for_job(client, r.json()["job_id"], timeout=600)
            # The queue kept moving: a later upload is indexed as usual.
            later = client.post("/v1/documents", json={"text": "A short note after the poison.",
                                                      "external_id": "later", "collection": collection})
            assert wait_for_job(client, later.json()["job_id"], timeout=300)["state"] == "succeeded"
        assert worker.proc is not None
        assert worker.proc.poll() is None  # the worker survived (only its pool child was replaced)
    finally:
        worker.stop()
    assert job["state"] == "completed_with_errors", job
    assert job["indexed"] == len(good), json.dumps(job, default=str)
    assert job["failed"] == 1
    [error] = job["errors"]
    assert error["external_id"] == "poison"
    assert "gave up after 3 attempts" in error["error"]
    with engine.connect() as conn:
        attempts = conn.execute(text("SELECT attempts FROM documents WHERE id = :id"),
                                {"id": error["document_id"]}).scalar_one()
    assert attempts == 4  # three runs, then the fourth claim found it spent
    log = (tmp_path / "worker.log").read_text()
    assert log.count("Hard time limit (8s) exceeded") == 3, log[-3000:]
    later_row = {"_id": "later", "title": "", "text": "A short note after the poison."}
    assert_complete(engine, collection, [*good, later_row], chunker, failed=1)

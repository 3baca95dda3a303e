"""Hostile strings in collection names, external ids, queries and API keys: refused or treated as plain data.

(Hostile metadata filters are in test_filtered_search.py.) After each, every table is still there and the
counts are what the test expects: nothing was dropped, nothing matched that should not have.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, create_engine, text

from app.config import Settings
from tests.fixtures.helpers import upload, wait_for_job

HOSTILE = [
    "x'); DROP TABLE documents; --",
    "' OR '1'='1",
    "1; SELECT pg_sleep(5); --",
    "$$; DROP TABLE chunks; $$",
    "\\'; TRUNCATE api_keys; --",
    "Robert'); DELETE FROM collections WHERE ('a'='a",
    "%' OR name LIKE '%",
    "\" OR \"\"=\"",
    "x\x00y",
    "é' || (SELECT string_agg(key_hash, ',') FROM api_keys) || '",
]
# Full-text-search operators and odd characters in queries (the lexical leg parses the query).
QUERIES = [
    *HOSTILE,
    "tea & !leaves | (gardens",
    "tea:* <-> leaves:A",
    "!!!", "&|!()<>:*", "''''", "\\", "-- comment", "/* c */", "🍵 thé ☕", "a" * 1999,
]
TABLES = ("collections", "documents", "chunks", "chunk_vectors", "document_vectors", "lexical_postings", "jobs",
          "job_documents", "api_keys", "embedding_models")


@pytest.fixture(scope="module")
def engine(settings: Settings) -> Iterator[Engine]:
    e = create_engine(settings.database_url or "")
    yield e
    e.dispose()


def _intact(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one() for t in TABLES}


@pytest.fixture(scope="module")
def corpus(client: TestClient, worker: Any) -> str:
    name = f"hostile-{uuid.uuid4().hex[:8]}"
    r = upload(client, "tea.txt", b"Tea gardens: the picking of leaves on steep hills, by hand, in spring.", name)
    assert wait_for_job(client, r.json()["job_id"])["state"] == "succeeded"
    return name


@pytest.mark.parametrize("name", [*HOSTILE, "a/b", "../etc", " default", "x" * 65])
def test_hostile_collection_names_are_refused(client: TestClient, engine: Engine, name: str) -> None:
    before = _intact(engine)
    for r in (
        client.post("/v1/search", json={"query": "tea", "collection": name}),
        client.post("/v1/ask", json={"question": "tea?", "collection": name}),
        client.post("/v1/documents", json={"text": "planted", "collection": name}),
        upload(client, "x.txt", b"planted", name),
        client.post("/v1/admin/keys", json={"name": "x", "role": "read", "collections": [name]}),
    ):
        # 404 for a well-formed name that does not exist; 422 for a malformed one. Never a 5xx.
        assert r.status_code in (404, 422), (name, r.status_code, r.text)
    assert _intact(engine) == before


def test_hostile_external_ids_are_stored_verbatim(client: TestClient, worker: Any, engine: Engine) -> None:
    name = f"hostile-ids-{uuid.uuid4().hex[:8]}"
    ids = [h for h in HOSTILE if "\x00" not in h]
    jobs = []
    for i, external_id in enumerate(ids):
        r = client.post("/v1/documents", json={"text": f"Document number {i} about kites and wind.",
                                               "external_id": external_id, "collection": name})
        assert r.status_code == 202, r.text
        jobs.append(r.json()["job_id"])
    for job in jobs:
        assert wait_for_job(client, job)["state"] == "succeeded"
    hits = client.post("/v1/search", json={"query": "kites and wind", "collection": name, "k": 50}).json()["results"]
    assert sorted(h["external_id"] for h in hits) == sorted(ids)
    for hit in hits:
        assert client.get(f"/v1/documents/{hit['document_id']}").json()["external_id"] == hit["external_id"]
    nul = client.post("/v1/documents", json={"text": "t", "external_id": "x\x00y", "collection": name})
    assert nul.status_code == 422
    counts = _intact(engine)
    with engine.connect() as conn:
        n = conn.execute(text("SELECT count(*) FROM documents d JOIN collections c ON c.id = d.collection_id "
                              "WHERE c.name = :n"), {"n": name}).scalar_one()
    assert n == len(ids)
    assert counts["api_keys"] > 0
    assert counts["documents"] >= n


@pytest.mark.parametrize("mode", ["hybrid", "lexical", "dense"])
def test_hostile_queries_are_plain_text(client: TestClient, engine: Engine, corpus: str, mode: str) -> None:
    before = _intact(engine)
    for query in QUERIES:
        if "\x00" in query:
            r = client.post("/v1/search", json={"query": query, "collection": corpus, "mode": mode})
            assert r.status_code == 422, r.text
            assert "NUL" in r.text
            continue
        r = client.post("/v1/search", json={"query": query, "collection": corpus, "mode": mode})
        assert r.status_code == 200, (query, r.text)
        assert all(h["external_id"] == "tea.txt" for h in r.json()["results"])
        a = client.post("/v1/ask", json={"question": query, "collection": corpus, "mode": mode})
        assert a.status_code == 200, (query, a.text)
    assert _intact(engine) == before


BAD_KEYS = [f"pgs_{h}_x" for h in HOSTILE if h.isascii() and "\x00" not in h] + ["pgs_", "pgs__", "' OR 1=1 --"]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_hostile_keys_are_just_wrong(anonymous: TestClient, engine: Engine, key: str) -> None:
    before = _intact(engine)
    r = anonymous.get("/v1/status", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 401, r.text
    assert _intact(engine) == before

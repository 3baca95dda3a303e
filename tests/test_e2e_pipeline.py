"""End to end with every part real: API -> Redis -> Celery worker -> real model -> pgvector -> search/ask."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from app.query.answer import QUOTE_GAP
from tests.fixtures.helpers import make_pdf, upload, wait_for_job

CORPUS = Path(__file__).parent / "data" / "corpus"
TIDES_PDF = make_pdf(
    [
        "Ocean tides.",
        "Tides are the rise and fall of sea level caused by the gravitational pull of the Moon and the Sun.",
        "Spring tides, with the largest range, happen at new and full moon when Sun and Moon line up.",
    ]
)

QUERIES = {
    "how long should espresso extraction take and how fine to grind": "coffee.txt",
    "why does magma rise and cause explosive eruptions": "volcanoes.md",
    "when should I replace a worn bike chain": "bicycle.html",
    "which enzyme fixes carbon dioxide in plants": "photosynthesis.txt",
    "overnight proofing and baking in a dutch oven": "sourdough.md",
    "what causes spring tides": "tides.pdf",
    "a good first move for white and developing the bishop": "chess.md",
}


@pytest.fixture(scope="module")
def corpus(client: TestClient, worker: Any) -> str:
    """The shipped corpus (md, txt, html) plus a PDF, ingested through the worker."""
    name = "e2e-corpus"
    files = [(p.name, p.read_bytes()) for p in sorted(CORPUS.iterdir())] + [("tides.pdf", TIDES_PDF)]
    for fname, data in files:
        r = upload(client, fname, data, name)
        assert r.status_code == 202, r.text
        job = wait_for_job(client, r.json()["job_id"])
        assert job["state"] == "succeeded", job
        assert job["indexed"] == 1
    return name


def _search(client: TestClient, collection: str, query: str, k: int = 5) -> list[dict[str, Any]]:
    r = client.post("/v1/search", json={"query": query, "k": k, "collection": collection})
    assert r.status_code == 200, r.text
    return r.json()["results"]  # type: ignore[no-any-return]


@pytest.mark.parametrize(("query", "expected"), QUERIES.items())
def test_search_ranks_the_right_document_first(client: TestClient, corpus: str, query: str, expected: str) -> None:
    results = _search(client, corpus, query)
    assert results, "no results"
    assert results[0]["external_id"] == expected, [(r["external_id"], r["score"]) for r in results]
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize(
    ("question", "expected"),
    [
        ("Which enzyme fixes carbon dioxide during photosynthesis?", "photosynthesis.txt"),
        ("At what elongation should a bicycle chain be replaced?", "bicycle.html"),
        ("What pressure is used to brew espresso?", "coffee.txt"),
    ],
)
def test_ask_cites_the_right_document(client: TestClient, corpus: str, question: str, expected: str) -> None:
    r = client.post("/v1/ask", json={"question": question, "collection": corpus})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["mode"] == "extractive"
    assert expected in {c["external_id"] for c in body["citations"]}
    # Every citation marker in the answer maps to a returned citation, and each quote is real text.
    for c in body["citations"]:
        assert f"[{c['n']}]" in body["answer"]
        assert all(sentence in c["text"] for sentence in c["quote"].split(QUOTE_GAP))


def test_ask_says_so_when_nothing_is_relevant(client: TestClient, corpus: str) -> None:
    r = client.post("/v1/ask", json={"question": "Who won the 1998 football world cup final?", "collection": corpus})
    assert r.status_code == 200
    body = r.json()
    assert body["mode"] == "none"
    assert body["citations"] == []
    assert "could not find" in body["answer"]


def test_document_shows_status_and_chunks(client: TestClient, corpus: str) -> None:
    hit = _search(client, corpus, "bicycle chain lubricant", k=1)[0]
    doc = client.get(f"/v1/documents/{hit['document_id']}").json()
    assert doc["status"] == "indexed"
    assert doc["title"] == "Maintaining a bicycle chain"
    assert doc["chunk_count"] >= 1
    assert "console.log" not in hit["text"]  # scripts are not text


def test_same_content_again_is_a_no_op(client: TestClient, corpus: str, settings: Any) -> None:
    engine = create_engine(settings.database_url)
    with engine.connect() as conn:
        before = conn.execute(text("SELECT count(*) FROM chunks")).scalar()
    r = upload(client, "volcanoes.md", (CORPUS / "volcanoes.md").read_bytes(), corpus)
    assert r.status_code == 202
    assert r.json()["queued"] == 0
    assert r.json()["unchanged"] == 1
    job = wait_for_job(client, r.json()["job_id"])
    assert job["state"] == "succeeded"
    assert job["unchanged"] == 1
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM chunks")).scalar() == before
    engine.dispose()


def test_changed_content_replaces_chunks_and_delete_removes_everything(
    client: TestClient, worker: Any, collection: str, settings: Any
) -> None:
    first = client.post(
        "/v1/documents",
        json={
            "text": "The lighthouse keeper climbs 200 steps every evening to light the lamp.",
            "external_id": "lighthouse",
            "collection": collection,
            "metadata": {"v": 1},
        },
    )
    assert first.status_code == 202
    assert wait_for_job(client, first.json()["job_id"])["state"] == "succeeded"
    old = _search(client, collection, "lighthouse lamp")[0]

    second = client.post(
        "/v1/documents",
        json={
            "text": "The lighthouse is automated now; a solar panel powers its LED beacon.",
            "external_id": "lighthouse",
            "collection": collection,
            "metadata": {"v": 2},
        },
    )
    assert second.json()["queued"] == 1
    assert wait_for_job(client, second.json()["job_id"])["state"] == "succeeded"
    results = _search(client, collection, "lighthouse lamp")
    assert len(results) == 1  # the old chunks are gone, not added to
    assert "solar panel" in results[0]["text"]
    assert results[0]["document_id"] == old["document_id"]
    assert results[0]["metadata"] == {"v": 2}

    doc_id = results[0]["document_id"]
    assert client.delete(f"/v1/documents/{doc_id}").status_code == 204
    assert client.get(f"/v1/documents/{doc_id}").status_code == 404
    assert _search(client, collection, "lighthouse") == []
    engine = create_engine(settings.database_url)
    with engine.connect() as conn:
        for table in ("chunks", "chunk_vectors", "document_vectors"):
            n = conn.execute(text(f"SELECT count(*) FROM {table} WHERE document_id = :d"), {"d": doc_id}).scalar()
            assert n == 0, table
    engine.dispose()

"""Browse endpoints (issue 12, point 1): collections with counts, documents and jobs in keyset pages."""

from __future__ import annotations

import json
import uuid
from typing import Any

from fastapi.testclient import TestClient

from tests.fixtures.helpers import upload, wait_for_job

TOPICS = ["glaciers", "falconry", "lacquer", "tidepools", "bookbinding", "beekeeping", "telescopes"]


def _pages(client: TestClient, path: str, **params: Any) -> list[list[dict[str, Any]]]:
    pages, cursor = [], None
    while True:
        r = client.get(path, params={**params, **({"cursor": cursor} if cursor else {})})
        assert r.status_code == 200, r.text
        body = r.json()
        pages.append(body["items"])
        cursor = body["next_cursor"]
        if cursor is None:
            return pages
        assert len(pages) < 20, "the pages never end"


def test_documents_and_jobs_page_newest_first(client: TestClient, worker: Any) -> None:
    name = f"browse-{uuid.uuid4().hex[:8]}"
    jobs = []
    for start in (0, 3, 6):  # three uploads: three jobs, seven documents
        lines = [json.dumps({"_id": f"{t}.md", "title": f"On {t}", "text": f"A short note about {t}."})
                 for t in TOPICS[start:start + 3]]
        r = upload(client, "notes.jsonl", ("\n".join(lines) + "\n").encode(), name)
        assert r.status_code == 202, r.text
        job = wait_for_job(client, r.json()["job_id"])
        assert job["state"] == "succeeded", job
        jobs.append(job["id"])

    [collection] = [c for c in client.get("/v1/collections").json() if c["name"] == name]
    assert (collection["documents"], collection["indexed"], collection["failed"]) == (7, 7, 0)
    assert collection["chunks"] >= 7

    pages = _pages(client, "/v1/documents", collection=name, limit=3)
    assert [len(p) for p in pages] == [3, 3, 1]
    items = [d for p in pages for d in p]
    assert sorted(d["external_id"] for d in items) == sorted(f"{t}.md" for t in TOPICS)
    keys = [(d["updated_at"], d["id"]) for d in items]
    assert keys == sorted(keys, reverse=True)  # newest change first, no repeats across pages
    assert all(d["status"] == "indexed" and d["chunk_count"] >= 1 and d["error"] is None for d in items)

    whole = client.get("/v1/documents", params={"collection": name, "limit": 7}).json()
    assert (len(whole["items"]), whole["next_cursor"]) == (7, None)  # an exact page says it is the last

    found = client.get("/v1/documents", params={"collection": name, "q": "FALCON"}).json()["items"]
    assert [d["external_id"] for d in found] == ["falconry.md"]
    assert client.get("/v1/documents", params={"collection": name, "q": "%"}).json()["items"] == []  # literal
    assert client.get("/v1/documents", params={"collection": name, "status": "failed"}).json()["items"] == []

    job_pages = _pages(client, "/v1/jobs", collection=name, limit=2)
    assert [len(p) for p in job_pages] == [2, 1]
    listed = [j for p in job_pages for j in p]
    assert [j["id"] for j in listed] == jobs[::-1]
    assert [(j["state"], j["total"], j["indexed"]) for j in listed] == [("succeeded", 1, 1), ("succeeded", 3, 3),
                                                                         ("succeeded", 3, 3)]


def test_bad_page_requests_are_refused(client: TestClient) -> None:
    for params in ({"cursor": "!!"}, {"limit": 0}, {"limit": 10_000}, {"status": "lost"},
                   {"collection": "no such"}):
        r = client.get("/v1/documents", params=params)
        assert r.status_code == 422, (params, r.text)
    for cursor in ("bm90LWEtY3Vyc29y", "0"):  # well-formed, but no page of ours
        r = client.get("/v1/documents", params={"cursor": cursor})
        assert r.status_code == 404, (cursor, r.text)
        assert "next_cursor" in r.json()["detail"]
    assert client.get("/v1/documents", params={"collection": "never-made-x"}).status_code == 404

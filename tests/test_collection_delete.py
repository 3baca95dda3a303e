"""DELETE /v1/collections/{name}: out of reach at once, its contents removed by a worker in batches, a job to follow."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from app.config import Settings
from tests.fixtures.helpers import make_key, upload, wait_for_job

TABLES = ("documents", "chunks", "chunk_vectors", "document_vectors", "lexical_postings", "chunk_postings",
          "sentence_vectors", "job_documents")


def _rows(settings: Settings, collection_id: int) -> dict[str, int]:
    """Rows left anywhere for this collection id."""
    engine = create_engine(settings.database_url or "")
    docs = "SELECT id FROM documents WHERE collection_id = :c"
    chunks = "SELECT id FROM chunks WHERE document_id IN (" + docs + ")"
    where = {
        "documents": "collection_id = :c",
        "chunks": f"document_id IN ({docs})",
        "chunk_vectors": "collection_id = :c",
        "document_vectors": f"document_id IN ({docs})",
        "lexical_postings": f"document_id IN ({docs})",
        "chunk_postings": f"chunk_id IN ({chunks})",
        "sentence_vectors": f"chunk_id IN ({chunks})",
        "job_documents": f"document_id IN ({docs})",
    }
    with engine.connect() as conn:
        counts = {t: conn.execute(text(f"SELECT count(*) FROM {t} WHERE {where[t]}"), {"c": collection_id}).scalar_one()
                  for t in TABLES}
        counts["collection"] = conn.execute(text("SELECT count(*) FROM collections WHERE id = :c"),
                                            {"c": collection_id}).scalar_one()
    engine.dispose()
    return counts


def test_deleting_a_collection_removes_everything_in_the_background(
    client: TestClient, worker: Any, settings: Settings
) -> None:
    name, other = f"del-{uuid.uuid4().hex[:8]}", f"keep-{uuid.uuid4().hex[:8]}"
    lines = [json.dumps({"_id": f"n{i}", "title": f"Note {i}", "text": f"Ferns and mosses of valley {i} grow "
                         f"in shade. " * 20}) for i in range(12)]
    r = upload(client, "notes.jsonl", ("\n".join(lines) + "\n").encode(), name)
    assert r.status_code == 202, r.text
    assert wait_for_job(client, r.json()["job_id"])["state"] == "succeeded"
    r = upload(client, "keep.txt", b"Ferns of the other collection stay where they are.", other)
    assert wait_for_job(client, r.json()["job_id"])["state"] == "succeeded"
    [before] = [c for c in client.get("/v1/collections").json() if c["name"] == name]
    assert before["documents"] == 12
    engine = create_engine(settings.database_url or "")
    with engine.connect() as conn:
        cid = conn.execute(text("SELECT id FROM collections WHERE name = :n"), {"n": name}).scalar_one()
    engine.dispose()
    assert all(n > 0 for t, n in _rows(settings, cid).items() if t not in ("sentence_vectors",)), _rows(settings, cid)

    # Refused to a write key and to an admin of another collection; allowed to an admin of this one.
    for key in (make_key(client, "write", [name]), make_key(client, "admin", [other])):
        r = client.delete(f"/v1/collections/{name}", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 403, r.text
    admin = {"Authorization": f"Bearer {make_key(client, 'admin', [name])}"}
    r = client.delete(f"/v1/collections/{name}", headers=admin)
    assert r.status_code == 202, r.text
    job = r.json()
    assert (job["kind"], job["collection"], job["total"]) == ("delete", name, 12)

    # Out of reach at once: not listed, not searchable, a second delete is a 404.
    assert name not in [c["name"] for c in client.get("/v1/collections").json()]
    listed = client.get("/v1/documents", params={"q": "Note", "limit": 200}).json()["items"]
    assert all(d["collection"] != name for d in listed)
    assert client.post("/v1/search", json={"query": "ferns", "collection": name}).status_code == 404
    assert client.delete(f"/v1/collections/{name}", headers=admin).status_code == 404

    # The job runs to the end; the key scoped to the deleted collection can follow it.
    deadline = time.monotonic() + 120
    while (job := client.get(f"/v1/jobs/{job['id']}", headers=admin).json())["state"] != "succeeded":
        assert time.monotonic() < deadline, job
        time.sleep(0.3)
    assert (job["done"], job["total"], job["errors"]) == (12, 12, [])
    assert job["id"] in [j["id"] for j in client.get("/v1/jobs", headers=admin).json()["items"]]
    assert all(n == 0 for n in _rows(settings, cid).values()), _rows(settings, cid)

    # The other collection is untouched, and the name can be used again.
    hits = client.post("/v1/search", json={"query": "ferns", "collection": other}).json()["results"]
    assert hits
    assert "other collection" in hits[0]["text"]
    r = upload(client, "again.txt", b"A new collection under the old name.", name)
    assert wait_for_job(client, r.json()["job_id"])["state"] == "succeeded"
    [again] = [c for c in client.get("/v1/collections").json() if c["name"] == name]
    assert again["documents"] == 1


def test_deleting_a_collection_that_does_not_exist_is_a_404(client: TestClient) -> None:
    r = client.delete(f"/v1/collections/none-{uuid.uuid4().hex[:6]}")
    assert r.status_code == 404, r.text
    assert client.delete("/v1/collections/~deleting~1~x").status_code == 422  # not a collection name

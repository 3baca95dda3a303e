"""API keys: every /v1 endpoint needs one, a key reaches only its collections with its role, revocation is immediate,
and each key is rate limited (in Redis) with 429 + Retry-After.

Two collections, A and B, each with an indexed document and a job. A key for A is sent at every endpoint,
aimed at B's collection, documents and jobs: it gets 403 or 404 and never a byte of B's data.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from app.config import Settings
from tests.fixtures.helpers import make_key, upload, wait_for_job

SECRET_B = "Zanzibar ledger: the vault code of collection B is 4417."


@dataclass
class World:
    a: str
    b: str
    doc_a: str
    doc_b: str
    job_a: str
    job_b: str
    reindex_job: str | None


@pytest.fixture(scope="module")
def world(client: TestClient, worker: Any, settings: Settings) -> World:
    suffix = uuid.uuid4().hex[:8]
    a, b = f"acc-a-{suffix}", f"acc-b-{suffix}"
    ids = {}
    engine = create_engine(settings.database_url or "")
    for name, body in ((a, "Collection A talks about tea gardens and the picking of leaves."), (b, SECRET_B)):
        r = upload(client, "doc.txt", body.encode(), name)
        assert r.status_code == 202, r.text
        job = wait_for_job(client, r.json()["job_id"])
        assert job["state"] == "succeeded", job
        with engine.connect() as conn:
            doc_id = conn.execute(
                text("SELECT d.id FROM documents d JOIN collections c ON c.id = d.collection_id WHERE c.name = :n"),
                {"n": name},
            ).scalar_one()
        ids[name] = (str(doc_id), job["id"])
    with engine.connect() as conn:
        reindex_job = conn.execute(text("SELECT id FROM jobs WHERE collection_id IS NULL LIMIT 1")).scalar()
    engine.dispose()
    return World(a, b, ids[a][0], ids[b][0], ids[a][1], ids[b][1], str(reindex_job) if reindex_job else None)


def _as(client: TestClient, key: str | None) -> TestClient:
    c = TestClient(client.app)
    if key:
        c.headers["Authorization"] = f"Bearer {key}"
    return c


def _v1_routes(client: TestClient) -> list[tuple[str, str]]:
    """Every operation of the published OpenAPI schema under /v1."""
    paths = client.app.openapi()["paths"]  # type: ignore[attr-defined]
    return sorted((m.upper(), p) for p, ops in paths.items() if p.startswith("/v1") for m in ops)


def _fill(path: str) -> str:
    return path.replace("{document_id}", str(uuid.uuid4())).replace("{job_id}", str(uuid.uuid4())).replace(
        "{key_id}", str(uuid.uuid4())
    ).replace("{name}", "no-such-collection")


def test_every_v1_endpoint_needs_a_key(client: TestClient, anonymous: TestClient) -> None:
    routes = _v1_routes(client)
    assert len(routes) >= 12, routes
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer nonsense"}, {"Authorization": "Basic dXNlcjpwYXNz"},
                        {"Authorization": "Bearer pgs_000000000000_" + "x" * 43}):
            r = anonymous.request(method, _fill(path), headers=headers, json={"query": "q", "question": "q"})
            assert r.status_code == 401, (method, path, headers, r.status_code, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
            assert r.json()["error"] == "unauthorized"
    # Health and readiness stay open for load balancers.
    assert anonymous.get("/healthz").status_code == 200
    assert anonymous.get("/readyz").status_code == 200


def _leaks(r: Any, world: World) -> bool:
    """B's content or name in a response (its ids may be echoed back in a 404: the caller sent them)."""
    return "Zanzibar" in r.text or "4417" in r.text or world.b in r.text.replace(f"collection {world.b!r}", "")


def test_a_key_for_collection_a_cannot_see_or_change_b(client: TestClient, world: World, settings: Settings) -> None:
    key = make_key(client, "write", [world.a])
    c = _as(client, key)
    # It works on A...
    assert c.post("/v1/search", json={"query": "tea gardens", "collection": world.a}).status_code == 200
    assert c.get(f"/v1/documents/{world.doc_a}").status_code == 200
    assert c.get(f"/v1/jobs/{world.job_a}").status_code == 200

    attempts = {
        "search": c.post("/v1/search", json={"query": "vault code", "collection": world.b}),
        "search-filters": c.post("/v1/search", json={"query": "vault code", "collection": world.b,
                                                      "filters": {"source": "doc.txt"}}),
        "ask": c.post("/v1/ask", json={"question": "What is the vault code?", "collection": world.b}),
        "ingest-json": c.post("/v1/documents", json={"text": "planted", "collection": world.b}),
        "ingest-file": upload(c, "x.txt", b"planted", world.b),
        "read-document": c.get(f"/v1/documents/{world.doc_b}"),
        "delete-document": c.delete(f"/v1/documents/{world.doc_b}"),
        "read-job": c.get(f"/v1/jobs/{world.job_b}"),
        "list-documents": c.get("/v1/documents", params={"collection": world.b}),
        "list-jobs": c.get("/v1/jobs", params={"collection": world.b}),
        "delete-collection": c.delete(f"/v1/collections/{world.b}"),
        "delete-collection-as-a-admin": _as(client, make_key(client, "admin", [world.a])).delete(
            f"/v1/collections/{world.b}"),
        "reindex": c.post("/v1/admin/reindex"),
        "reindex-status": c.get("/v1/admin/reindex"),
        "keys": c.get("/v1/admin/keys"),
        "make-key": c.post("/v1/admin/keys", json={"name": "x", "role": "admin", "collections": ["*"]}),
    }
    if world.reindex_job:
        attempts["read-reindex-job"] = c.get(f"/v1/jobs/{world.reindex_job}")
    for what, r in attempts.items():
        assert r.status_code in (403, 404), (what, r.status_code, r.text)
        assert not _leaks(r, world), (what, r.text)

    # The listings without a collection show A's alone.
    for path in ("/v1/collections", "/v1/documents", "/v1/jobs", "/v1/documents?q=doc"):
        r = c.get(path)
        assert r.status_code == 200, (path, r.text)
        assert not _leaks(r, world), (path, r.text)
    assert [col["name"] for col in c.get("/v1/collections").json()] == [world.a]
    assert {d["id"] for d in c.get("/v1/documents").json()["items"]} == {world.doc_a}
    assert {j["id"] for j in c.get("/v1/jobs").json()["items"]} == {world.job_a}

    # Status lists A only; nothing of B's name or counts.
    status = c.get("/v1/status")
    assert status.status_code == 200
    assert [col["name"] for col in status.json()["collections"]] == [world.a]
    assert world.b not in status.text
    # Issue 11, defect 9: the models' vector counts are A's alone (B's, or any collection's, would show activity).
    active = next(m for m in status.json()["models"] if m["status"] == "active")
    assert active["vectors"] == status.json()["chunks"] > 0

    # Searching A for B's words finds only A.
    hits = c.post("/v1/search", json={"query": "Zanzibar vault code 4417", "collection": world.a, "k": 50}).json()
    assert {h["document_id"] for h in hits["results"]} <= {world.doc_a}

    # B is untouched: its document is there, nothing was planted.
    admin = client
    doc = admin.get(f"/v1/documents/{world.doc_b}")
    assert doc.status_code == 200
    assert doc.json()["collection"] == world.b
    assert next(col for col in admin.get("/v1/status").json()["collections"] if col["name"] == world.b)[
        "documents"
    ] == 1


def test_roles(client: TestClient, world: World) -> None:
    reader = _as(client, make_key(client, "read", [world.a]))
    assert reader.post("/v1/search", json={"query": "tea", "collection": world.a}).status_code == 200
    assert reader.get(f"/v1/documents/{world.doc_a}").status_code == 200
    for r in (
        reader.post("/v1/documents", json={"text": "x", "collection": world.a}),
        upload(reader, "x.txt", b"x", world.a),
        reader.delete(f"/v1/documents/{world.doc_a}"),
        reader.post("/v1/admin/reindex"),
    ):
        assert r.status_code == 403, r.text
        assert r.json()["error"] == "forbidden"
    assert reader.get(f"/v1/documents/{world.doc_a}").status_code == 200  # not deleted

    # An admin key limited to some collections is still not an admin of the whole service.
    scoped_admin = _as(client, make_key(client, "admin", [world.a]))
    assert scoped_admin.get("/v1/admin/keys").status_code == 403
    assert scoped_admin.post("/v1/search", json={"query": "x", "collection": world.b}).status_code == 403
    # Issue 11, defect 9: nor may it load a local path as a cross-encoder (a 404 against a 422 would tell it
    # whether the path exists on the server), whether the path exists or not.
    for path in ("/etc", "/no/such/model"):
        for endpoint, field in (("/v1/search", "query"), ("/v1/ask", "question")):
            r = scoped_admin.post(endpoint, json={field: "x", "collection": world.a, "rerank": f"cross-encoder:{path}"})
            assert r.status_code == 403, r.text
            assert "cross-encoder" in r.json()["detail"]

    # A key for several collections reaches each of them.
    both = _as(client, make_key(client, "read", [world.a, world.b]))
    for name in (world.a, world.b):
        assert both.post("/v1/search", json={"query": "x", "collection": name}).status_code == 200


def test_admin_key_endpoints_and_immediate_revocation(client: TestClient, world: World) -> None:
    made = client.post("/v1/admin/keys", json={"name": "svc", "role": "read", "collections": [world.a]})
    assert made.status_code == 201, made.text
    body = made.json()
    assert body["key"].startswith("pgs_" + body["prefix"] + "_")
    svc = _as(client, body["key"])
    assert svc.post("/v1/search", json={"query": "tea", "collection": world.a}).status_code == 200

    listed = client.get("/v1/admin/keys").json()
    assert any(k["id"] == body["id"] and k["last_used_at"] for k in listed)
    assert body["key"] not in client.get("/v1/admin/keys").text

    revoked = client.delete(f"/v1/admin/keys/{body['id']}")
    assert revoked.status_code == 200
    assert revoked.json()["revoked_at"]
    after = svc.post("/v1/search", json={"query": "tea", "collection": world.a})
    assert after.status_code == 401
    assert "revoked" in after.json()["detail"]
    assert client.delete(f"/v1/admin/keys/{uuid.uuid4()}").status_code == 404

    bad = client.post("/v1/admin/keys", json={"name": "x", "role": "read", "collections": ["no spaces allowed"]})
    assert bad.status_code == 422


def test_keys_are_stored_only_as_hashes(client: TestClient, settings: Settings) -> None:
    key = make_key(client, "read", ["*"])
    engine = create_engine(settings.database_url or "")
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT row_to_json(k)::text FROM api_keys k")).scalars().all()
    engine.dispose()
    secret = key.split("_", 2)[2]
    assert rows
    assert not any(secret in r for r in rows)


@pytest.fixture(scope="module")
def limited(settings: Settings) -> Iterator[TestClient]:
    """An API process whose keys may send 60 requests a minute, 3 at once (kept in Redis)."""
    from app.main import create_app

    with TestClient(create_app(settings.model_copy(update={"rate_limit_per_minute": 60, "rate_limit_burst": 3}))) as c:
        yield c


def test_rate_limit_per_key_in_redis(limited: TestClient) -> None:
    first = _as(limited, make_key(limited, "read", ["*"]))
    codes = [first.get("/v1/status") for _ in range(6)]
    assert [r.status_code for r in codes[:3]] == [200, 200, 200]
    refused = [r for r in codes if r.status_code == 429]
    assert refused, [r.status_code for r in codes]
    r = refused[0]
    assert r.json()["error"] == "rate_limited"
    assert "60 requests per minute" in r.json()["detail"]
    assert 1 <= int(r.headers["retry-after"]) <= 2
    # Another key has its own allowance.
    other = _as(limited, make_key(limited, "read", ["*"]))
    assert other.get("/v1/status").status_code == 200
    # Health is never limited.
    assert all(limited.get("/healthz").status_code == 200 for _ in range(10))


def test_cli_waits_out_the_rate_limit(limited: TestClient) -> None:
    """The CLI's requests (eval sends thousands) wait for Retry-After on a 429 and go on, instead of failing
    the run at the first refusal; a limit that does not clear within the CLI's patience is still an error."""
    import time

    import typer

    from app import cli

    c = _as(limited, make_key(limited, "read", ["*"]))
    started = time.monotonic()
    answers = [cli._call(c, "GET", "/v1/me") for _ in range(6)]
    assert all(a["role"] == "read" for a in answers)
    assert time.monotonic() - started >= 1  # it did wait: 60 a minute after a burst of 3

    impatient = _as(limited, make_key(limited, "read", ["*"]))
    for _ in range(3):  # the burst
        cli._call(impatient, "GET", "/v1/me", max_wait=0)
    with pytest.raises(typer.Exit):
        cli._call(impatient, "GET", "/v1/me", max_wait=0)


def test_failed_authentications_are_limited_per_address(settings: Settings) -> None:
    """Issue 11, defect 9: requests without a valid key are limited per client address (they were never
    limited at all); a valid key from the same address still goes through."""
    from app.main import create_app

    tight = settings.model_copy(update={"auth_failures_per_minute": 6, "auth_failures_burst": 3})
    with TestClient(create_app(tight)) as c:
        good = make_key(c, "read", ["*"])
        bad = "pgs_" + uuid.uuid4().hex[:8] + "_" + uuid.uuid4().hex
        codes = [c.get("/v1/status", headers={"Authorization": f"Bearer {bad}"}) for _ in range(5)]
        assert [r.status_code for r in codes[:3]] == [401, 401, 401]
        refused = [r for r in codes if r.status_code == 429]
        assert refused, [r.status_code for r in codes]
        assert refused[0].json()["error"] == "rate_limited"
        assert "without a valid key" in refused[0].json()["detail"]
        assert int(refused[0].headers["retry-after"]) >= 1
        assert c.get("/v1/status").status_code == 429  # no key at all counts the same
        assert c.get("/v1/status", headers={"Authorization": f"Bearer {good}"}).status_code == 200

"""Request limits: body size of non-upload requests (declared or streamed), documents per request.

(Upload size, query length and k are in test_bad_input.py; the per-key rate limit in test_access.py.)
Each refusal is a 413 with a message naming the limit, and nothing is written.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from app.config import Settings
from tests.fixtures.helpers import as_admin


@pytest.fixture(scope="module")
def tight(settings: Settings) -> Iterator[TestClient]:
    """An API process with small limits: 4 KiB bodies, 3 documents per request."""
    from app.main import create_app

    small = settings.model_copy(update={"max_request_bytes": 4096, "max_documents_per_request": 3})
    with TestClient(create_app(small)) as c:
        as_admin(c)
        yield c


def _documents(settings: Settings) -> int:
    engine = create_engine(settings.database_url or "")
    with engine.connect() as conn:
        n = int(conn.execute(text("SELECT count(*) FROM documents")).scalar_one())
    engine.dispose()
    return n


def test_a_body_over_the_request_limit_is_413(tight: TestClient, settings: Settings) -> None:
    big = {"query": "tides", "collection": "default", "filters": {"note": "x" * 5000}}
    r = tight.post("/v1/search", json=big)
    assert r.status_code == 413, r.text
    assert r.json()["error"] == "payload_too_large"
    assert "4096-byte limit" in r.json()["detail"]
    assert "PGSAGE_MAX_REQUEST_BYTES" in r.json()["detail"]


def test_a_streamed_body_without_length_is_cut_at_the_limit(tight: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"query": "tides", "filters": {"note": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}}'

    r = tight.post("/v1/search", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    assert "4096-byte limit" in r.json()["detail"]


def test_too_many_documents_in_one_request_is_413(tight: TestClient, settings: Settings) -> None:
    before = _documents(settings)
    lines = "".join(json.dumps({"_id": f"d{i}", "text": f"document {i}"}) + "\n" for i in range(4))
    r = tight.post("/v1/documents", files={"file": ("four.jsonl", lines.encode())},
                   data={"collection": f"lim-{uuid.uuid4().hex[:6]}"})
    assert r.status_code == 413, r.text
    assert "holds 4 documents; at most 3 per request" in r.json()["detail"]
    assert _documents(settings) == before
    # Three is fine.
    three = "".join(json.dumps({"_id": f"d{i}", "text": f"document {i}"}) + "\n" for i in range(3))
    ok = tight.post("/v1/documents", files={"file": ("three.jsonl", three.encode())},
                    data={"collection": f"lim-{uuid.uuid4().hex[:6]}"})
    assert ok.status_code == 202, ok.text

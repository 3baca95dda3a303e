"""GET /metrics (issue 12, point 3): Prometheus text with this process's requests and the whole service's work,
the workers' counters read from the database."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from app.config import Settings
from tests.fixtures.helpers import upload, wait_for_job


def _samples(body: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def _value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_ingest_and_questions(client: TestClient, anonymous: TestClient, worker: Any) -> None:
    before = _samples(anonymous.get("/metrics").text)
    name = f"metrics-{uuid.uuid4().hex[:8]}"
    r = upload(client, "otters.md", b"# Otters\n\nSea otters hold hands while they sleep so they do not drift apart. "
               b"They use stones as tools to open shellfish.", name)
    assert r.status_code == 202, r.text
    assert wait_for_job(client, r.json()["job_id"])["state"] == "succeeded"
    for question in ("Why do sea otters hold hands?", "What do otters use stones for?", "Where do otters sleep?"):
        assert client.post("/v1/ask", json={"question": question, "collection": name}).status_code == 200
    client.post("/v1/search", json={"query": "otters", "collection": "no-such-collection-here"})

    r = anonymous.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    after = _samples(r.text)

    def grew(metric: str, **labels: str) -> float:
        return _value(after, metric, **labels) - _value(before, metric, **labels)

    # This process: requests by route template and status, latency, query embedding.
    assert grew("pgsage_http_requests_total", route="/v1/ask", method="POST", status="200") == 3
    assert grew("pgsage_http_requests_total", route="/v1/search", method="POST", status="404") == 1
    assert grew("pgsage_http_request_duration_seconds_count", route="/v1/ask", method="POST") == 3
    assert grew("pgsage_http_request_duration_seconds_sum", route="/v1/ask", method="POST") > 0
    assert grew("pgsage_query_embedding_seconds_count") >= 3
    # The service, from the database: what the worker process did, and the stored state.
    assert grew("pgsage_ingest_documents_total", outcome="indexed") >= 1
    assert grew("pgsage_ingest_chunks_total") >= 1
    assert grew("pgsage_embedded_chunks_total", flow="ingest") >= 1
    assert grew("pgsage_embedding_seconds_total", flow="ingest") > 0
    assert _value(after, "pgsage_documents", state="indexed") >= 1
    assert _value(after, "pgsage_chunks") >= 1
    assert _value(after, "pgsage_metrics_database_up") == 1
    assert any(name == "pgsage_queue_depth" for name, _ in after)
    assert any(name == "pgsage_chunk_vectors" and dict(labels)["status"] == "active" and v >= 1
               for (name, labels), v in after.items())


def test_metrics_can_require_a_token(settings: Settings) -> None:
    from app.main import create_app

    with TestClient(create_app(settings.model_copy(update={"metrics_token": SecretStr("scrape-me")}))) as c:
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        r = c.get("/metrics", headers={"Authorization": "Bearer scrape-me"})
        assert r.status_code == 200
        assert "pgsage_documents" in r.text
        assert "/metrics" not in c.get("/openapi.json").json()["paths"]


def _http_series(client: TestClient) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    return {key for key in _samples(client.get("/metrics").text) if key[0].startswith("pgsage_http_")}


def test_requests_without_a_key_add_no_series(anonymous: TestClient) -> None:
    """Issue 27, point 3: made-up methods (the server takes any method token) and unknown paths were each a series
    of their own; 200 such requests added 4,200. Labels are now known methods and route templates, `other` for the
    rest, so once each kind of refusal has been counted once, no request without a key adds a series."""
    def hostile(i: int) -> None:
        assert anonymous.request(f"M{i}THOD", f"/no/such/path/{i}").status_code in (404, 405)
        assert anonymous.request(f"X-{i}", "/v1/search").status_code == 405
        assert anonymous.request(f"Q{i}", "/healthz").status_code == 405
        assert anonymous.get(f"/v1/nothing-here-{i}").status_code == 404
        assert anonymous.post("/v1/search", json={"query": f"q{i}"}).status_code == 401

    hostile(0)
    before = _http_series(anonymous)  # this scrape's own series are counted by the next one
    before = _http_series(anonymous)
    for i in range(1, 201):
        hostile(i)
    after = _http_series(anonymous)
    assert after - before == set()
    methods = {dict(labels)["method"] for _, labels in after}
    assert methods <= {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"}, methods
    routes = {dict(labels)["route"] for _, labels in after}
    assert not any(route.startswith("/no/such") or route.startswith("/v1/nothing") for route in routes), routes
    assert ("pgsage_http_requests_total", (("method", "other"), ("route", "/v1/search"), ("status", "405"))) in after

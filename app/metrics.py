"""Metrics for GET /metrics, in Prometheus text format.

Two kinds:
- In this process (module-level prometheus-client objects): HTTP requests by route, method and status with
  latency histograms, and query embedding time. Each API process reports its own; scrape every replica.
- Service-wide, read from Postgres and the broker when scraped, so one scrape of any API process sees the whole
  service: documents per state, chunks and vectors per embedding space, the queue depth, re-index progress, and
  the counters workers add to the `service_counters` table after each batch (documents indexed and failed,
  chunks, embedding seconds). Workers expose no port of their own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.db.session import session_scope

log = logging.getLogger(__name__)

# Seconds: a search is tens of milliseconds, an answer with an LLM several seconds, an upload up to a minute.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

HTTP_REQUESTS = Counter("pgsage_http_requests", "HTTP requests answered, by route template, method and status.",
                        ["route", "method", "status"])
HTTP_LATENCY = Histogram("pgsage_http_request_duration_seconds",
                         "Time to answer an HTTP request (to the end of a streamed body), by route and method.",
                         ["route", "method"], buckets=LATENCY_BUCKETS)
# Label values come from closed sets: a client chooses its method token and its path, and a label value per
# token or path would let any client, with or without a key, add series without bound.
KNOWN_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))
OTHER = "other"
QUERY_EMBEDDING = Histogram("pgsage_query_embedding_seconds", "Time to embed one search query or question.",
                            buckets=(0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0))

# Worker counters kept in Postgres: (name, label) -> (metric, label name, help).
WORKER_COUNTERS = {
    "ingest_documents": ("pgsage_ingest_documents", "outcome", "Documents the workers indexed, failed or skipped."),
    "ingest_chunks": ("pgsage_ingest_chunks", None, "Chunks the workers embedded and stored."),
    "embedding_seconds": ("pgsage_embedding_seconds", "flow",
                          "Seconds the workers spent in the embedding model, by flow (ingest, reindex)."),
    "embedded_chunks": ("pgsage_embedded_chunks", "flow", "Chunks the workers embedded, by flow (ingest, reindex)."),
}


def add_counts(session: Session, counts: Mapping[tuple[str, str], float]) -> None:
    """Add to the service-wide counters (in the caller's transaction; rows in a fixed order, so no deadlocks)."""
    rows = [{"n": n, "l": label, "v": float(v)} for (n, label), v in sorted(counts.items()) if v]
    if rows:
        session.execute(
            text("INSERT INTO service_counters (name, label, value) VALUES (:n, :l, :v) "
                 "ON CONFLICT (name, label) DO UPDATE SET value = service_counters.value + EXCLUDED.value, "
                 "updated_at = now()"),
            rows,
        )


def record_counts(factory: sessionmaker[Session], counts: Mapping[tuple[str, str], float]) -> None:
    """add_counts in a transaction of its own; a failure is logged, never raised (metrics must not fail work)."""
    try:
        with session_scope(factory) as session:
            add_counts(session, counts)
    except Exception as exc:
        log.warning("could not record the metrics counters: %s", exc)


class ServiceCollector(Collector):
    """The service-wide figures, read when scraped."""

    def __init__(self, factory: sessionmaker[Session], redis_url: str | None, queue: str) -> None:
        self.factory = factory
        self.redis_url = redis_url
        self.queue = queue
        self._redis: Any = None

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("pgsage_metrics_database_up", "1 when the service figures were read for this scrape.")
        try:
            with session_scope(self.factory) as session:
                families = list(self._from_database(session))
            up.add_metric([], 1)
        except Exception as exc:
            log.warning("metrics: the service figures could not be read from the database: %s", exc)
            families = []
            up.add_metric([], 0)
        yield up
        yield from families
        depth = self._queue_depth()
        if depth is not None:
            queue = GaugeMetricFamily("pgsage_queue_depth", "Tasks waiting in the broker's queue.", labels=["queue"])
            queue.add_metric([self.queue], depth)
            yield queue

    def _from_database(self, session: Session) -> Iterator[Metric]:
        documents = GaugeMetricFamily("pgsage_documents", "Documents by state.", labels=["state"])
        counts = dict.fromkeys(("queued", "indexed", "failed"), 0)
        counts.update(session.execute(text(
            "SELECT d.status, count(*) FROM documents d JOIN collections c ON c.id = d.collection_id "
            "WHERE c.name NOT LIKE '~%' GROUP BY d.status")).tuples().all())
        for state, n in sorted(counts.items()):
            documents.add_metric([state], n)
        yield documents
        collections = GaugeMetricFamily("pgsage_collections", "Collections.")
        collections.add_metric([], session.execute(text(
            "SELECT count(*) FROM collections WHERE name NOT LIKE '~%'")).scalar_one())
        yield collections
        vectors = GaugeMetricFamily("pgsage_chunk_vectors", "Chunk vectors stored, by embedding space and its status.",
                                    labels=["space", "model", "status"])
        for sid, name, status, n in session.execute(text(
            "SELECT m.id, m.name, m.status, (SELECT count(*) FROM chunk_vectors v WHERE v.model_id = m.id) "
            "FROM embedding_models m WHERE m.status NOT IN ('dropped') ORDER BY m.id")):
            vectors.add_metric([str(sid), name, status], n)
        yield vectors
        chunks = GaugeMetricFamily("pgsage_chunks", "Chunks of indexed documents.")
        chunks.add_metric([], session.execute(text(
            "SELECT coalesce(sum(chunk_count), 0) FROM documents WHERE status = 'indexed'")).scalar_one())
        yield chunks
        yield from self._reindex(session)
        yield from self._worker_counters(session)

    def _reindex(self, session: Session) -> Iterator[Metric]:
        job = session.execute(text(
            "SELECT status, done_chunks, total_chunks FROM reindex_jobs ORDER BY (status IN ('pending', 'running')) "
            "DESC, created_at DESC LIMIT 1")).first()
        running = GaugeMetricFamily("pgsage_reindex_running", "1 while a re-index builds a new embedding space.")
        done = GaugeMetricFamily("pgsage_reindex_done_chunks", "Chunks embedded into the newest re-index's space.")
        total = GaugeMetricFamily("pgsage_reindex_total_chunks", "Chunks the newest re-index has to embed.")
        running.add_metric([], 1 if job is not None and job.status in ("pending", "running") else 0)
        done.add_metric([], job.done_chunks if job is not None else 0)
        total.add_metric([], job.total_chunks if job is not None else 0)
        yield from (running, done, total)

    def _worker_counters(self, session: Session) -> Iterator[Metric]:
        values: dict[str, list[tuple[str, float]]] = {}
        for name, label, value in session.execute(text("SELECT name, label, value FROM service_counters")):
            values.setdefault(name, []).append((label, value))
        for key, (metric, label_name, help_text) in WORKER_COUNTERS.items():
            family = CounterMetricFamily(metric, help_text, labels=[label_name] if label_name else [])
            for label, value in sorted(values.get(key, [])):
                family.add_metric([label] if label_name else [], value)
            yield family

    def _queue_depth(self) -> int | None:
        if not self.redis_url:
            return None
        try:
            if self._redis is None:  # one client (and its connection pool) for every scrape
                import redis

                self._redis = redis.Redis.from_url(self.redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
            return int(self._redis.llen(self.queue))
        except Exception as exc:
            log.warning("metrics: the broker did not answer: %s", exc)
            return None


def exposition(service: CollectorRegistry) -> bytes:
    """This process's metrics and the service-wide ones, in the Prometheus text format."""
    return generate_latest(REGISTRY) + generate_latest(service)


def service_registry(factory: sessionmaker[Session], redis_url: str | None, queue: str) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector(factory, redis_url, queue))
    return registry


class RequestMetrics:
    """ASGI middleware: counts and times each HTTP request by its route template (not its concrete path, which
    would make a series per document id); a streamed body is timed to its last byte."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            template, method = request_labels(scope)
            HTTP_REQUESTS.labels(template, method, str(status)).inc()
            HTTP_LATENCY.labels(template, method).observe(time.perf_counter() - started)


def request_labels(scope: Scope) -> tuple[str, str]:
    """A request's route and method labels: a registered route's template (never the concrete path) and a
    known method, `other` for anything else."""
    route = scope.get("route")
    template = getattr(route, "path", None) if isinstance(route, BaseRoute) else None
    method = scope.get("method", "")
    return template if isinstance(template, str) and template else OTHER, method if method in KNOWN_METHODS else OTHER

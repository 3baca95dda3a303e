"""create_app(): the lifespan builds the engine, the embedder and the query pipeline once."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, StatementError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from app import __version__
from app.api.deps import Resources
from app.api.limits import BodySizeLimit, BodyTooLarge
from app.api.ratelimit import make_limiter
from app.api.routes import admin, documents, health, search
from app.config import Settings, get_settings
from app.db.replica import ReadReplica
from app.db.session import make_engine, make_sessionmaker, session_scope
from app.embedding import EmbedderPool
from app.errors import AppError
from app.ingest import sandbox
from app.metrics import RequestMetrics, service_registry
from app.query.pipeline import QueryPipeline
from app.reindex import spaces
from app.reindex.plan import plan
from app.ui import router as console

log = logging.getLogger(__name__)


def build_resources(settings: Settings) -> Resources:
    """Everything heavy, once per process."""
    from workers.celery_app import make_celery

    engine = make_engine(settings)
    factory = make_sessionmaker(engine)
    # The API embeds one question at a time: the onnx backends get the query thread count torch is given.
    embedders = EmbedderPool(settings, threads=settings.query_encode_threads)
    celery = make_celery(settings)
    with session_scope(factory) as session:
        planned = plan(session, embedders.configured.spec, graph=spaces.HnswGraph.of(settings))
    log.info("embedding model check: %s", planned.message)
    if planned.created:
        celery.send_task("reindex.run", args=[str(planned.job_id)])
    with session_scope(factory) as session:
        active = spaces.active(session)
        if active is not None:
            # Load the active space's model now (the old one while a re-index runs), not in a request.
            try:
                embedders.for_space(active)
            except ValueError as exc:  # its model is gone or its weights changed: questions answer 503 with this
                log.error("the active embedding space cannot be queried here: %s", exc)
    sandbox.warm()  # the process that parses uploaded HTML and PDF under a budget
    llm = None
    if settings.llm_base_url:
        import openai

        llm = openai.OpenAI(
            base_url=settings.llm_base_url,
            api_key=settings.llm_api_key.get_secret_value(),
            timeout=settings.llm_timeout_s,
            max_retries=1,
        )
    replica = None
    if settings.database_read_url:
        replica = ReadReplica(
            make_sessionmaker(make_engine(settings, url=settings.database_read_url, connect_timeout=2)),
            max_wait_s=settings.read_replica_wait_ms / 1000, retry_after_s=settings.read_replica_retry_seconds,
        )
        log.info("searches and answers read from the replica at %s",
                 make_url(settings.database_read_url).render_as_string(hide_password=True))
    return Resources(
        replica=replica,
        settings=settings,
        engine=engine,
        factory=factory,
        query=QueryPipeline(settings, embedders, llm),
        celery=celery,
        limiter=make_limiter(
            settings.redis_url, settings.rate_limit_per_minute, settings.rate_limit_burst, settings.queue_name
        ),
        metrics=service_registry(factory, settings.redis_url, settings.queue_name),
        failures=make_limiter(
            settings.redis_url, settings.auth_failures_per_minute, settings.auth_failures_burst,
            f"{settings.queue_name}:auth-failures",
        ),
    )


def _error(status: int, code: str, detail: Any, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "detail": _renderable(detail)}, status_code=status, headers=headers)


def _renderable(detail: Any) -> Any:
    """The detail with every string encodable as UTF-8: a message or a field location may quote what the client
    sent, lone surrogates included (JSON's \\ud800 escape decodes to one), and the error must still render."""
    if isinstance(detail, str):
        try:
            detail.encode("utf-8")
        except UnicodeEncodeError:
            return detail.encode("utf-8", "backslashreplace").decode("utf-8")
        return detail
    if isinstance(detail, dict):
        return {_renderable(k): _renderable(v) for k, v in detail.items()}
    if isinstance(detail, (list, tuple)):
        return [_renderable(v) for v in detail]
    return detail


# SQLSTATE classes and codes (the driver's error's `sqlstate`), by what they say about the request.
_REFUSED_VALUE = ("22", "23514")  # data exception (a value of the wrong form or range), a check constraint
_OVER_A_LIMIT = ("54",)  # program limit exceeded: a value past what the database can hold or index
_CONFLICT = ("23503", "23505", "23P01", "40", "55P03")  # a concurrent change: the same request may succeed again
_DOWN = ("08", "53", "57", "58", "F0", "XX001", "XX002")  # the database, its connection or its disk is unwell


def _database_error(exc: StatementError) -> JSONResponse:
    """A database error as the client should read it: a value it sent that the database refuses is a 4xx (never
    retried into the same refusal), a concurrent change a 409, and only a database that is unreachable,
    shutting down or out of resources a 503; anything else is this service's fault, a 500."""
    orig = exc.orig
    state = getattr(orig, "sqlstate", None) or ""
    reason = _reason(orig)
    if isinstance(orig, (UnicodeError, psycopg.DataError)) or state.startswith(_REFUSED_VALUE):
        log.info("the database refused a value: %s", reason)
        return _error(422, "invalid_input", f"the database refused a value in the request: {reason}")
    if state.startswith(_OVER_A_LIMIT):
        log.info("a value is over a database limit: %s", reason)
        return _error(413, "payload_too_large", f"a value in the request is over a database limit: {reason}")
    if state.startswith(_CONFLICT):
        log.info("a request met a concurrent change: %s", reason)
        return _error(409, "conflict", f"the request met a concurrent change; send it again ({reason})")
    down = state.startswith(_DOWN) or (
        isinstance(exc, DBAPIError) and (exc.connection_invalidated or (
            not state and isinstance(orig, psycopg.OperationalError))))
    if down:
        log.warning("database unavailable: %s", exc)
        return _error(503, "unavailable", "the database is unavailable; retry shortly", {"Retry-After": "5"})
    log.error("database error", exc_info=exc)
    return _error(500, "internal_error", "a database error occurred")


def _reason(orig: BaseException | None) -> str:
    """The first line of the database's message, short enough to quote."""
    diag = getattr(orig, "diag", None)
    message = getattr(diag, "message_primary", None) or str(orig or "").strip()
    first = message.splitlines()[0] if message else "no reason given"
    return first if len(first) <= 300 else first[:300] + "..."


def _allowed_methods(app: FastAPI, path: str) -> list[str]:
    """The methods the OpenAPI schema documents for this concrete path, else those its routes take."""
    methods: set[str] = set()
    for template, operations in app.openapi()["paths"].items():
        if re.fullmatch(re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)), path):
            methods.update(m.upper() for m in operations)
    if not methods:  # a path outside the schema (the console's files): ask the routes
        for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"):
            scope = {"type": "http", "path": path, "root_path": "", "method": method}
            if any(route.matches(scope)[0] == Match.FULL for route in app.routes):
                methods.add(method)
    return sorted(methods)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.resources = build_resources(settings)
        yield
        app.state.resources.engine.dispose()
        if app.state.resources.replica is not None:
            app.state.resources.replica.dispose()

    app = FastAPI(
        title="pgsage",
        version=__version__,
        lifespan=lifespan,
        description="Question answering over your own documents on Postgres + pgvector.",
    )

    @app.exception_handler(AppError)
    async def app_error(_: Request, exc: AppError) -> JSONResponse:
        detail = exc.message if exc.detail is None else {"message": exc.message, "info": exc.detail}
        return _error(exc.status_code, exc.code, detail, exc.headers)

    @app.exception_handler(BodyTooLarge)
    async def body_too_large(_: Request, exc: BodyTooLarge) -> JSONResponse:
        return _error(413, "payload_too_large", exc.detail)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Starlette's own refusals (an unparsable body, an unknown path or method) in the same shape."""
        if exc.status_code == 400 and isinstance(exc.__cause__, ValueError):
            # FastAPI's "error parsing the body" for JSON that json.loads refuses with a ValueError rather
            # than a decode error (an integer literal over 4,300 digits): bad input, like any malformed JSON.
            return _error(422, "invalid_input", f"the request body is malformed JSON: {exc.__cause__}")
        codes = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}
        headers = dict(exc.headers) if exc.headers else None
        if exc.status_code == 405:
            # Every method the path has (a path's methods can live on several routes).
            headers = {"Allow": ", ".join(_allowed_methods(app, request.url.path))}
        return _error(exc.status_code, codes.get(exc.status_code, "http_error"), exc.detail, headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return _error(422, "invalid_input", "the request body is malformed JSON")
        detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg")} for e in errors]
        return _error(422, "invalid_input", detail)

    @app.exception_handler(StatementError)  # DBAPIError and OperationalError are kinds of it
    async def database_error(_: Request, exc: StatementError) -> JSONResponse:
        return _database_error(exc)

    @app.exception_handler(UnicodeEncodeError)
    async def not_unicode(_: Request, exc: UnicodeEncodeError) -> JSONResponse:
        """Text with a lone surrogate (JSON's \\ud800 escape) that reached an encoder, the database driver's
        included (it raises this, not a database error): what the client sent, not a fault here."""
        if exc.reason != "surrogates not allowed":
            log.error("text could not be encoded", exc_info=exc)
            return _error(500, "internal_error", "text could not be encoded")
        return _error(422, "invalid_input", "the request holds text that is not valid Unicode (an unpaired surrogate)")

    app.add_middleware(BodySizeLimit, settings=settings)
    app.add_middleware(RequestMetrics)  # added last, so outermost: it sees every answer, refusals included
    app.include_router(health.router)
    app.include_router(documents.router)
    app.include_router(search.router)
    app.include_router(admin.router)
    app.include_router(console)  # the web console at /ui (no API operations: not in the schema)
    return app

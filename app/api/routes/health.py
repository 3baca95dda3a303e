"""Liveness, readiness and metrics."""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import text

from app.api.deps import Resources, ResourcesDep
from app.api.schemas import error_responses
from app.db.session import session_scope
from app.errors import Unauthorized, Unavailable
from app.metrics import exposition
from app.reindex.plan import configuration_state

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


def _check(resources: Resources) -> dict[str, Any]:
    checks: dict[str, Any] = {}
    try:
        with resources.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"unreachable: {type(exc).__name__}"
        return checks
    try:
        with session_scope(resources.factory) as session:
            # Detail, not a readiness condition: a process on an older configuration still serves.
            checks["model"] = configuration_state(session, resources.query.embedders.configured.spec)
    except Exception as exc:
        checks["model"] = {"state": "unknown", "message": f"{type(exc).__name__}"}
    if resources.replica is not None:  # detail: reads fall back to the primary while it is away
        with session_scope(resources.factory) as session:
            checks["replica"] = resources.replica.status(session)
    try:
        with resources.celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"unreachable: {type(exc).__name__}"
    return checks


@router.get("/readyz", summary="The database and the broker answer", responses=error_responses(503))
async def readyz(resources: ResourcesDep) -> dict[str, Any]:
    checks = await run_in_threadpool(_check, resources)
    if any(v != "ok" for k, v in checks.items() if k not in ("model", "replica")):
        raise Unavailable("not ready", detail=checks)
    return {"status": "ready", **checks}


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request, resources: ResourcesDep) -> Response:
    """Prometheus text format: this process's requests and the service-wide figures (see app/metrics.py)."""
    token = resources.settings.metrics_token
    if token is not None:
        sent = request.headers.get("authorization", "")
        if not hmac.compare_digest(sent.encode(), f"Bearer {token.get_secret_value()}".encode()):
            raise Unauthorized("/metrics needs `Authorization: Bearer <PGSAGE_METRICS_TOKEN>`")
    body = await run_in_threadpool(exposition, resources.metrics)
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

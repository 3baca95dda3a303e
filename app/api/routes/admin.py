"""Admin (an admin key for all collections): re-indexing, and API keys."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Depends

from app import keys
from app.api.auth import Admin, require_admin
from app.api.deps import ResourcesDep, SessionDep
from app.api.schemas import V1_ERRORS, KeyCreated, KeyIn, KeyOut, ReindexIn, error_responses
from app.errors import Conflict, NotFound
from app.reindex import plan as planning
from app.reindex import spaces
from app.reindex.switch import rollback

router = APIRouter(
    prefix="/v1/admin",
    tags=["admin"],
    responses=error_responses(*V1_ERRORS, 404, 409),
    dependencies=[Depends(require_admin)],
)


@router.post("/reindex", status_code=202, summary="Re-index into the configured embedding model, or a named one")
def start_reindex(session: SessionDep, resources: ResourcesDep, body: ReindexIn | None = None) -> dict[str, Any]:
    embedders = resources.query.embedders
    spec = embedders.configured.spec
    if body is not None and body.model is not None:
        try:
            spec = embedders.named(body.model, body.revision).spec  # loaded here: a bad name is refused now
        except ValueError as exc:
            raise NotFound(str(exc)) from None
    planned = planning.plan(session, spec, requested=True)
    session.commit()  # the job exists before a worker is told about it
    if planned.job_id is not None:
        resources.celery.send_task("reindex.run", args=[str(planned.job_id)])
    return {"job_id": planned.job_id, "created": planned.created, "message": planned.message}


@router.get("/reindex", summary="Re-index progress: done/total, rate, time left, errors")
def reindex_status(session: SessionDep) -> dict[str, Any]:
    return planning.progress(session)


@router.post("/reindex/cancel", summary="Cancel the running re-index; the active space is untouched")
def cancel_reindex(session: SessionDep) -> dict[str, Any]:
    job_id = planning.cancel(session)
    if job_id is None:
        raise NotFound("no re-index is running")
    return {"cancelled": job_id}


@router.post("/reindex/rollback", summary="Switch back to the space the last switch retired, while it is kept")
def rollback_reindex(session: SessionDep) -> dict[str, Any]:
    """The reply names the spaces a further rollback can reach (none: only the last retired space is kept whole)."""
    current, previous = rollback(session)
    return {"from_space": current, "to_space": previous, "rollback_targets": spaces.rollback_targets(session)}


@router.post("/keys", status_code=201, response_model=KeyCreated, summary="Create an API key (shown once)")
def create_key(body: KeyIn, session: SessionDep) -> dict[str, Any]:
    row, key = keys.create(session, body.name, body.role, body.collections)
    return {**row, "key": key}


@router.get("/keys", response_model=list[KeyOut], summary="API keys (never the keys themselves)")
def list_keys(session: SessionDep, include_revoked: bool = False) -> list[dict[str, Any]]:
    return keys.listing(session, include_revoked=include_revoked)


@router.delete("/keys/{key_id}", response_model=KeyOut, summary="Revoke an API key; it stops working at once")
def revoke_key(key_id: uuid.UUID, principal: Admin, session: SessionDep) -> dict[str, Any]:
    if key_id == principal.key_id:
        raise Conflict("this is the key making the request; revoke it with another admin key or `pgsage keys revoke`")
    return keys.revoke(session, str(key_id))

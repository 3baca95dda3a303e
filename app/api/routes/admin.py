"""Admin: start, follow, cancel and roll back re-indexing."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.api.deps import ResourcesDep, SessionDep
from app.errors import NotFound
from app.reindex import plan as planning
from app.reindex.switch import rollback

router = APIRouter(prefix="/v1/admin", tags=["admin"])


@router.post("/reindex", status_code=202, summary="Re-index into the configured embedding model")
def start_reindex(session: SessionDep, resources: ResourcesDep) -> dict[str, Any]:
    planned = planning.plan(session, resources.query.embedders.configured.spec, requested=True)
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


@router.post("/reindex/rollback", summary="Switch back to the previous embedding space while it exists")
def rollback_reindex(session: SessionDep) -> dict[str, Any]:
    current, previous = rollback(session)
    return {"from_space": current, "to_space": previous}

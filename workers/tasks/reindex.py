"""Model-change tasks: detect (at start and periodically), run a re-index job; ids in, pipelines do the work."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from celery.signals import worker_process_init
from sqlalchemy.exc import OperationalError

from app.db.session import session_scope
from app.reindex import plan as planning
from app.reindex import spaces
from app.reindex.switch import retire_expired
from workers.celery_app import celery_app
from workers.resources import resources

log = logging.getLogger(__name__)


@worker_process_init.connect
def _on_start(**_: object) -> None:
    """Load the models when a worker process starts, then look for a model change."""
    try:
        check_model()
    except Exception:  # a worker must start even if the database is briefly away; beat checks again
        log.exception("model check at worker start failed")


def check_model() -> str:
    """Open a re-index job if the configured model is not the active one; resend a stalled job."""
    res = resources()
    with session_scope(res.factory) as session:
        planned = planning.plan(session, res.embedders.configured.spec, graph=spaces.HnswGraph.of(res.settings))
    if planned.created:
        run.delay(str(planned.job_id))
        return planned.message
    with session_scope(res.factory) as session:
        stalled = planning.stalled_job(session, res.settings.reindex_stale_seconds)
    if stalled is not None:
        log.warning("re-index job %s shows no progress: sending it again", stalled)
        run.delay(str(stalled))
        return f"re-sent stalled job {stalled}"
    return planned.message


@celery_app.task(name="reindex.check", autoretry_for=(OperationalError,), retry_backoff=True, max_retries=3)
def check() -> str:
    """Periodic (beat): the model check, and dropping spaces kept past their rollback window."""
    message = check_model()
    dropped = retire_expired(resources().engine, resources().settings.reindex_retention_hours)
    return f"{message}; dropped spaces {dropped}" if dropped else message


RUN_RETRIES = 8


@celery_app.task(name="reindex.run", bind=True, autoretry_for=(OperationalError,), retry_backoff=True,
                 max_retries=RUN_RETRIES)
def run(self: Any, job_id: str) -> str:
    """Backfill the new space, build its index and switch; resumable and safe to run twice."""
    try:
        return resources().reindex.run(uuid.UUID(job_id)).status
    except OperationalError as exc:
        if self.request.retries >= RUN_RETRIES:
            # Retries spent: fail the job (once the database answers), or beat would send it again for ever.
            try:
                resources().reindex.fail(uuid.UUID(job_id), f"the database stayed unavailable over "
                                                           f"{RUN_RETRIES} retries: {exc}")
            except OperationalError:
                log.exception("could not record the failure of re-index %s", job_id)
        raise

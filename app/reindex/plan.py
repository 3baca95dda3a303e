"""Plan: notice that the configured model differs from the active space and open exactly one re-index job.

Called at API start, at worker start and periodically by beat. Racing processes serialise on an
advisory lock, and a partial unique index allows one open job, so a change yields one job.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.orm import Session

from app.embedding import ModelSpec, chunker_key
from app.errors import Conflict
from app.models import EmbeddingModel
from app.reindex import spaces

log = logging.getLogger(__name__)
PLAN_LOCK = 727275


@dataclass
class Plan:
    job_id: uuid.UUID | None
    created: bool
    message: str


def open_job(session: Session) -> dict[str, object] | None:
    row = (
        session.execute(text("SELECT * FROM reindex_jobs WHERE status IN ('pending', 'running') LIMIT 1"))
        .mappings()
        .first()
    )
    return dict(row) if row else None


def _create_job(session: Session, source: EmbeddingModel, target: EmbeddingModel, reason: str) -> uuid.UUID:
    # The active space's chunks (a new chunker makes about as many of its own).
    total = session.execute(
        text("SELECT count(*) FROM chunks c JOIN documents d ON d.id = c.document_id "
             "WHERE d.status = 'indexed' AND c.chunker = :ck"),
        {"ck": chunker_key(source.params or {})},
    ).scalar_one()
    job_id = uuid.uuid4()
    session.execute(
        text(
            "INSERT INTO reindex_jobs (id, source_model_id, target_model_id, status, reason, total_chunks) "
            "VALUES (:id, :s, :t, 'pending', :r, :n)"
        ),
        {"id": job_id, "s": source.id, "t": target.id, "r": reason, "n": total},
    )
    session.execute(text("UPDATE embedding_models SET status = 'building' WHERE id = :id"), {"id": target.id})
    return job_id


def plan(session: Session, configured: ModelSpec, *, requested: bool = False,
         graph: spaces.HnswGraph | None = None) -> Plan:
    """Compare the configured model with the active space; open a re-index job if they differ.

    requested=True is the admin command: it also rebuilds a space that was rolled back, and it
    re-embeds into a fresh copy when the configured model is already the active one.

    Only the newest configuration plans: a space's id orders the configurations as they were first seen, and
    a process whose configured space is older than the active one or than an open job's target leaves both
    alone (without this, a worker not yet redeployed in a rolling deploy opened a job back to its model, or
    cancelled the new one, and the active space flipped back and forth). Going back to an earlier model is
    an explicit act: a rollback, or `pgsage reindex`.
    """
    session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": PLAN_LOCK})
    active = spaces.active(session)
    if active is None:
        space = spaces.ensure_active(session, configured, graph)
        return Plan(None, False, f"space {space.id} is active (first start)")
    current = open_job(session)
    target = spaces.register(session, configured)
    if current is not None and current["target_model_id"] == target.id:
        return Plan(current["id"], False, "a re-index to the configured model is already under way")  # type: ignore[arg-type]
    newest = max(active.id, int(current["target_model_id"]) if current else 0)  # type: ignore[call-overload]
    if target.id < newest and not requested:
        # A space's id is its configuration's generation (ids grow as configurations are first seen). This
        # process runs an older configuration than the active space or the re-index under way (a rolling
        # deploy not finished, a stale worker): it serves and writes the live spaces, and plans nothing.
        message = stale_message(target.id, newest, active.id)
        log.warning(message)
        return Plan(None, False, message)
    if current is not None:
        # The configuration moved on while a re-index ran (or an admin asked): that job's target is not wanted.
        cancel(session, reason="superseded by a newer model configuration", target_status="superseded")
    if target.id == active.id:
        if not requested:
            return Plan(None, False, "the configured model is the active one")
        raise Conflict(
            "that embedding model is already the active one; name another (`pgsage reindex --model NAME`), "
            "change the model configuration (PGSAGE_EMBEDDING_*) and restart, or roll back"
        )
    if target.status == "dropping":
        # Retirement is deleting this space's old vectors; building into it meanwhile would lose rows.
        message = f"the configured model's space {target.id} is being dropped; it is re-indexed once that is done"
        if requested:
            raise Conflict(message + ": try again shortly")
        return Plan(None, False, message)
    if target.status in ("rolled_back", "refused", "cancelled") and not requested:
        # An operator rolled it back or cancelled it, or the quality gate refused it: only a request retries.
        log.warning(
            "the configured model (space %s) was %s; run `pgsage reindex` to build it again", target.id, target.status
        )
        return Plan(None, False, f"the configured model was {target.status}; not re-indexing automatically")
    job_id = _create_job(session, active, target, "requested" if requested else "detected")
    log.warning("embedding model changed (space %s -> %s): re-index job %s opened", active.id, target.id, job_id)
    return Plan(job_id, True, f"re-index job {job_id} opened: space {active.id} -> {target.id}")


def configuration_state(session: Session, configured: ModelSpec) -> dict[str, object]:
    """How this process's configured model stands against the active space (for /readyz and status)."""
    active = spaces.active(session)
    mine = session.execute(
        text("SELECT id, status FROM embedding_models WHERE fingerprint = :f"), {"f": configured.fingerprint}
    ).first()
    job = open_job(session)
    out: dict[str, object] = {"configured": configured.fingerprint, "configured_space": mine.id if mine else None,
                              "active_space": active.id if active else None}
    if active is None or mine is None:
        return {**out, "state": "unplanned", "message": "the model check has not run yet"}
    if mine.id == active.id and job is None:
        return {**out, "state": "active", "message": "the configured model is the active one"}
    if job is not None and job["target_model_id"] == mine.id:
        return {**out, "state": "reindexing",
                "message": f"a re-index to the configured model is under way (job {job['id']})"}
    newest = max(active.id, int(job["target_model_id"]) if job else 0)  # type: ignore[call-overload]
    if mine.id < newest:
        return {**out, "state": "stale", "message": stale_message(mine.id, newest, active.id)}
    return {**out, "state": mine.status,
            "message": f"the configured model's space is {mine.status}; queries use the active space {active.id}"
                       " (`pgsage reindex` builds it again)"}


def stale_message(configured: int, newest: int, active: int) -> str:
    what = "the active space" if newest == active else "the target of the re-index under way"
    return (f"this process's embedding model configuration (space {configured}) is older than {what} "
            f"(space {newest}): it serves the active space {active} and writes every live space, and opens or "
            "cancels no re-index; deploy the new configuration to it, or run `pgsage reindex` to choose a model")


def cancel(session: Session, *, reason: str = "cancelled", target_status: str = "cancelled") -> uuid.UUID | None:
    """Cancel the open job: the active space is untouched, the partial target is discarded."""
    job = open_job(session)
    if job is None:
        return None
    # Only while still open: a switch that committed first (the job row is locked by it) wins.
    cancelled = session.execute(
        text(
            "UPDATE reindex_jobs SET status = 'cancelled', cancel_requested = true, error = :r, "
            "finished_at = now() WHERE id = :id AND status IN ('pending', 'running')"
        ),
        {"id": job["id"], "r": reason},
    )
    if not cancelled.rowcount:  # type: ignore[attr-defined]
        return None
    session.execute(
        text("UPDATE embedding_models SET status = :s WHERE id = :t AND status = 'building'"),
        {"t": job["target_model_id"], "s": target_status},
    )
    return job["id"]  # type: ignore[return-value]


def stalled_job(session: Session, stale_seconds: float) -> uuid.UUID | None:
    """The open job if no worker has shown progress on it for a while (it needs to be sent again)."""
    return session.execute(
        text(
            "SELECT id FROM reindex_jobs WHERE status IN ('pending', 'running') "
            "AND coalesce(heartbeat_at, created_at) < now() - make_interval(secs => :s)"
        ),
        {"s": stale_seconds},
    ).scalar()


def progress(session: Session) -> dict[str, object]:
    """The open re-index job (or the latest one) with its rate and time left, the active space and the spaces a
    rollback can reach."""
    job = (
        session.execute(
            text("""
        SELECT j.*, s.name AS source_name, s.fingerprint AS source_fingerprint,
               t.name AS target_name, t.fingerprint AS target_fingerprint, t.status AS target_status,
               extract(epoch FROM (coalesce(j.finished_at, now()) - j.started_at)) AS elapsed_s
          FROM reindex_jobs j
          JOIN embedding_models s ON s.id = j.source_model_id
          JOIN embedding_models t ON t.id = j.target_model_id
         ORDER BY (j.status IN ('pending', 'running')) DESC, j.created_at DESC LIMIT 1
        """)
        )
        .mappings()
        .first()
    )
    active = spaces.active(session)
    out: dict[str, object] = {
        "active_space": {"id": active.id, "name": active.name, "fingerprint": active.fingerprint} if active else None,
        # The spaces `pgsage reindex --rollback` can reach now: the one the last switch retired, or none.
        "rollback_targets": spaces.rollback_targets(session),
        "job": None,
    }
    if job is None:
        return out
    elapsed = float(job["elapsed_s"] or 0.0)
    done, total = int(job["done_chunks"]), int(job["total_chunks"])
    rate = done / elapsed if elapsed > 0 else None
    out["job"] = {
        "id": job["id"],
        "status": job["status"],
        "reason": job["reason"],
        "source": {"id": job["source_model_id"], "name": job["source_name"], "fingerprint": job["source_fingerprint"]},
        "target": {"id": job["target_model_id"], "name": job["target_name"], "fingerprint": job["target_fingerprint"]},
        "done": done,
        "total": total,
        "rate_per_s": round(rate, 2) if rate else None,
        "eta_s": round(max(total - done, 0) / rate, 1) if rate and job["status"] == "running" else None,
        "error": job["error"],
        "created_at": job["created_at"],
        "started_at": job["started_at"],
        "finished_at": job["finished_at"],
    }
    return out

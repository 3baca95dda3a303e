"""Reads from a streaming replica (PGSAGE_DATABASE_READ_URL), never staler than the primary's last commit.

Searches and answers are the heavy reads; they go to the replica. Before one does, the replica must have
replayed the primary's WAL up to where it was when the request began (read on the primary in the request's
own transaction, next to the key check), so anything acknowledged before the request (a job reported
indexed, a deleted document) is seen. A replica that lags waits a little for replay, then the read goes to
the primary; a replica that cannot be reached is left alone for a while and the primary serves meanwhile.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from prometheus_client import Counter
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

READS = Counter("pgsage_replica_reads", "Searches and answers by the server they read (replica or primary) and "
                "why (caught_up; behind: the replica lagged past the wait; unreachable).", ["target", "reason"])

# Between two looks at the replica's replay position while it catches up.
POLL_SECONDS = 0.002


class ReadReplica:
    """Hands out sessions on the replica that have caught up with the primary, or None (read the primary)."""

    def __init__(self, factory: sessionmaker[Session], *, max_wait_s: float, retry_after_s: float) -> None:
        self.factory = factory
        self.max_wait_s = max_wait_s
        self.retry_after_s = retry_after_s
        self._down_until = 0.0
        self._lock = threading.Lock()

    def dispose(self) -> None:
        bind = self.factory.kw.get("bind")
        if bind is not None:
            bind.dispose()

    def status(self, primary: Session) -> dict[str, Any]:
        """For readiness (a detail, not a condition): whether the replica answers, as a standby, and how far its
        replay trails the primary, in bytes of WAL."""
        position = primary.execute(text("SELECT pg_current_wal_lsn()")).scalar_one()
        try:
            with self.factory() as replica:
                standby, behind = replica.execute(text(
                    "SELECT pg_is_in_recovery(), pg_wal_lsn_diff(CAST(:at AS pg_lsn), pg_last_wal_replay_lsn())"
                ), {"at": position}).one()
        except DBAPIError as exc:
            return {"state": "unreachable", "message": type(exc.orig or exc).__name__}
        if not standby:
            return {"state": "not a standby", "message": "the read replica is not in recovery; reads use the primary"}
        return {"state": "ok", "replay_behind_bytes": max(0, int(behind or 0))}

    def session(self, primary: Session) -> Session | None:
        """A replica session that sees everything the primary had committed now, or None to read the primary."""
        if time.monotonic() < self._down_until:
            READS.labels("primary", "unreachable").inc()
            return None
        position = primary.execute(text("SELECT pg_current_wal_lsn()")).scalar_one()
        replica = self.factory()
        deadline = time.monotonic() + self.max_wait_s
        try:
            while True:
                # NULL when the server is not in recovery (a promoted replica): then it is no copy to trust.
                caught_up = replica.execute(
                    text("SELECT pg_last_wal_replay_lsn() >= CAST(:at AS pg_lsn)"), {"at": position}
                ).scalar_one()
                if caught_up:
                    READS.labels("replica", "caught_up").inc()
                    return replica
                replica.rollback()  # the next look gets a fresh snapshot
                if caught_up is None or time.monotonic() >= deadline:
                    READS.labels("primary", "behind").inc()
                    replica.close()
                    return None
                time.sleep(POLL_SECONDS)
        except DBAPIError as exc:
            replica.close()
            with self._lock:
                self._down_until = time.monotonic() + self.retry_after_s
            log.warning("the read replica cannot be reached (%s); reading the primary for %.0f s",
                        str(exc.orig).strip().splitlines()[0] if exc.orig else exc, self.retry_after_s)
            READS.labels("primary", "unreachable").inc()
            return None

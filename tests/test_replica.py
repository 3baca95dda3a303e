"""Searches and answers read from a real streaming replica (PGSAGE_DATABASE_READ_URL).

The primary is an embedded Postgres of the test's own; the replica is made from it by pg_basebackup and
streams its WAL as a hot standby, as an operator would set one up. A real Celery worker writes to the
primary. Checked: searches and answers run on the replica (its own statistics count the scans), a document
is found the moment its job reports success and a deleted one is gone the moment the delete answers, and with
the replica stopped the primary answers, until the replica is back.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.fixtures.helpers import as_admin, wait_for_job
from tests.fixtures.services import OwnPostgres, Replica, WorkerProcess, _libpq, migrate, settings_of

pytestmark = pytest.mark.slow

FACTS = [
    ("Tidewater glaciers calve icebergs when meltwater lubricates the bed beneath their terminus.", "glacier"),
    ("The Hanseatic League minted a silver coin, the witten, accepted in every Baltic port.", "witten"),
    ("Cuttlefish change colour within a fraction of a second using chromatophores under nerve control.",
     "cuttlefish"),
    ("The Antikythera mechanism predicted eclipses with a train of at least thirty bronze gears.", "Antikythera"),
]


def _replica_scans(replica: Replica) -> int:
    """Index and table scans the replica itself has run on pgsage's tables (a standby keeps its own counts)."""
    with psycopg.connect(_libpq(replica.url), autocommit=True) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        row = conn.execute("SELECT coalesce(sum(coalesce(idx_scan, 0) + coalesce(seq_scan, 0)), 0) "
                           "FROM pg_stat_user_tables").fetchone()
    assert row is not None
    return int(row[0])


def _reads(client: TestClient, target: str, reason: str) -> float:
    """This API process's count of reads by where they went (GET /metrics)."""
    body = client.get("/metrics").text
    m = re.search(rf'^pgsage_replica_reads_total\{{reason="{reason}",target="{target}"\}} ([0-9.e+]+)$', body, re.M)
    return float(m.group(1)) if m else 0.0


@pytest.fixture
def primary_and_replica(tmp_path: Path) -> Iterator[tuple[OwnPostgres, Replica]]:
    primary = OwnPostgres(tmp_path / "primary")
    replica = None
    try:
        migrate(primary.url)
        replica = Replica(primary, tmp_path / "replica")
        replica.start()
        yield primary, replica
    finally:
        if replica is not None:
            replica.stop()
        primary.close()


def test_searches_read_the_replica_see_fresh_writes_and_fall_back_to_the_primary(
    service_env: dict[str, str], tmp_path: Path, primary_and_replica: tuple[OwnPostgres, Replica]
) -> None:
    primary, replica = primary_and_replica
    env = {**service_env, "PGSAGE_QUEUE_NAME": f"pgsage-replica-{uuid.uuid4().hex[:8]}",
           "PGSAGE_DATABASE_URL": primary.url, "PGSAGE_DATABASE_READ_URL": replica.url,
           "PGSAGE_READ_REPLICA_RETRY_SECONDS": "1"}
    worker = WorkerProcess(env, tmp_path / "worker.log")
    worker.start()
    try:
        with TestClient(create_app(settings_of(env))) as client:
            as_admin(client)
            scans = _replica_scans(replica)
            on_replica = _reads(client, "replica", "caught_up")
            found_ids = {}
            # One document at a time: each is searched for the moment its job reports success.
            for fact, word in FACTS:
                r = client.post("/v1/documents", json={"text": fact, "collection": "rep"})
                assert r.status_code == 202, r.text
                assert wait_for_job(client, r.json()["job_id"], timeout=120)["state"] == "succeeded"
                hits = client.post("/v1/search", json={"query": word, "collection": "rep", "k": 3}).json()["results"]
                assert hits, word
                assert word.lower() in hits[0]["text"].lower(), (word, hits)
                found_ids[word] = hits[0]["document_id"]
            answer = client.post("/v1/ask", json={"question": "How many gears did the Antikythera mechanism have?",
                                                  "collection": "rep"})
            assert answer.status_code == 200, answer.text
            assert "thirty" in answer.json()["answer"], answer.text

            ready = client.get("/readyz").json()
            assert ready["replica"]["state"] == "ok", ready

            # The replica ran them: its own scan counts grew, and the API counted the reads as the replica's.
            assert _replica_scans(replica) > scans
            served = _reads(client, "replica", "caught_up") - on_replica
            behind = _reads(client, "primary", "behind")
            assert served + behind == len(FACTS) + 1, (served, behind)
            assert served >= 1, (served, behind)

            # A delete is seen at once too.
            gone = client.delete(f"/v1/documents/{found_ids['witten']}")
            assert gone.status_code in (200, 202, 204), gone.text
            hits = client.post("/v1/search", json={"query": "witten Hanseatic silver coin", "collection": "rep",
                                                   "k": 5}).json()["results"]
            assert all(h["document_id"] != found_ids["witten"] for h in hits), hits

            # The replica goes away: the primary answers, without waiting on it.
            replica.stop()
            started = time.monotonic()
            r = client.post("/v1/search", json={"query": "cuttlefish colour", "collection": "rep", "k": 3})
            assert r.status_code == 200, r.text
            assert "cuttlefish" in r.json()["results"][0]["text"].lower(), r.text
            assert time.monotonic() - started < 5
            assert _reads(client, "primary", "unreachable") >= 1
            ready = client.get("/readyz")
            assert ready.status_code == 200, ready.text  # the service is ready: the primary serves the reads
            assert ready.json()["replica"]["state"] == "unreachable", ready.text
            assert client.post("/v1/ask", json={"question": "What do tidewater glaciers calve?",
                                                "collection": "rep"}).status_code == 200

            # And comes back: after the retry interval reads go to it again.
            replica.start()
            time.sleep(1.2)
            before = _reads(client, "replica", "caught_up")
            deadline = time.monotonic() + 30
            while _reads(client, "replica", "caught_up") == before and time.monotonic() < deadline:
                assert client.post("/v1/search", json={"query": "glacier", "collection": "rep"}).status_code == 200
                time.sleep(0.2)
            assert _reads(client, "replica", "caught_up") > before
    finally:
        worker.stop()

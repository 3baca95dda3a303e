"""A replaced document's title and metadata switch with its chunks, in one transaction (issue 27, point 6b).

Re-sending a document with new text used to set its new title and metadata at once, while its old chunks stayed
searchable until a worker wrote the new ones (for ever if that failed): a metadata filter applied the new
metadata to the old text. Here the API runs on a database and queue of this test's own, with no worker reading
the queue; the test runs the ingest pipeline itself, so what a client sees between the upload and the write is
looked at, not raced.

Decided here: metadata and source describe the document, not its chunks, so a re-send of the same text with new
metadata applies it at once (nothing is re-embedded; the upload counts it unchanged). The title is part of every
chunk's heading path (embedded and indexed), so the same text under a new title is indexed again, and its title
switches with the new chunks like a new text's.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.db.session import session_scope
from app.embedding import EmbedderPool
from app.ingest import store
from app.ingest.pipeline import IngestPipeline
from app.main import create_app
from tests.fixtures.helpers import as_admin
from tests.fixtures.services import migrate, scratch_database

OLD = "The keeper climbed the tower at dusk to light the paraffin lamp behind the Fresnel lens."
NEW = "Since the lamp was electrified a light sensor switches it on at dusk, and nobody climbs the tower."


@dataclass
class Api:
    client: TestClient
    factory: sessionmaker[Session]
    pipeline: IngestPipeline

    def send(self, body: str, title: str, metadata: dict[str, Any]) -> dict[str, Any]:
        r = self.client.post("/v1/documents", json={"text": body, "title": title, "metadata": metadata,
                                                    "external_id": "lighthouse", "collection": "lights"})
        assert r.status_code == 202, r.text
        return r.json()  # type: ignore[no-any-return]

    def index(self) -> int:
        """What a worker does with the queued documents; how many it indexed."""
        with session_scope(self.factory) as session:
            queued = list(session.execute(text("SELECT id FROM documents WHERE status = 'queued'")).scalars())
        return self.pipeline.process(None, queued).indexed if queued else 0

    def search(self, filters: dict[str, Any] | None = None, mode: str = "hybrid") -> list[tuple[str, str, Any]]:
        """(title, which text: OLD or NEW, metadata) of each passage found for the lighthouse question."""
        r = self.client.post("/v1/search", json={"query": "who lights the lighthouse lamp at dusk", "k": 5,
                                                 "collection": "lights", "mode": mode, "filters": filters})
        assert r.status_code == 200, r.text
        texts = {OLD: "OLD", NEW: "NEW"}
        return [(h["title"], next((v for k, v in texts.items() if k in h["text"]), h["text"]), h["metadata"])
                for h in r.json()["results"]]

    def document(self) -> dict[str, Any]:
        with session_scope(self.factory) as session:
            doc_id = session.execute(text("SELECT id FROM documents WHERE external_id = 'lighthouse'")).scalar_one()
            heading = session.execute(text("SELECT DISTINCT heading_path[1] FROM chunks WHERE document_id = :d"),
                                      {"d": doc_id}).scalars().all()
        r = self.client.get(f"/v1/documents/{doc_id}")
        assert r.status_code == 200, r.text
        return {**r.json(), "headings": heading}


@pytest.fixture
def api(database_url: str, settings: Settings) -> Iterator[Api]:
    server = make_url(database_url).set(database="postgres").render_as_string(hide_password=False)
    with scratch_database(server) as url:
        migrate(url)
        # A queue no worker reads: the test indexes by itself.
        local = settings.model_copy(update={"database_url": url, "queue_name": f"pgsage-idle-{uuid.uuid4().hex[:8]}"})
        with TestClient(create_app(local)) as client:
            as_admin(client)
            factory = client.app.state.resources.factory  # type: ignore[attr-defined]
            yield Api(client, factory, IngestPipeline(factory, EmbedderPool(local)))


def test_new_text_brings_its_title_and_metadata_only_with_its_chunks(api: Api) -> None:
    api.send(OLD, "The old lighthouse", {"era": "old"})
    assert api.index() == 1
    assert api.search({"era": "old"})[0] == ("The old lighthouse", "OLD", {"era": "old"})

    accepted = api.send(NEW, "The new lighthouse", {"era": "new"})
    assert accepted["queued"] == 1
    # Until the worker writes the new chunks, the old text is found as it was: its title, its metadata.
    assert api.search({"era": "new"}) == []
    for mode in ("hybrid", "dense", "lexical"):
        assert api.search({"era": "old"}, mode)[0] == ("The old lighthouse", "OLD", {"era": "old"}), mode
    doc = api.document()
    assert (doc["status"], doc["title"], doc["metadata"]) == ("queued", "The old lighthouse", {"era": "old"})

    assert api.index() == 1
    assert api.search({"era": "old"}) == []
    assert api.search({"era": "new"})[0] == ("The new lighthouse", "NEW", {"era": "new"})
    doc = api.document()
    assert (doc["status"], doc["title"], doc["metadata"], doc["headings"]) == (
        "indexed", "The new lighthouse", {"era": "new"}, ["The new lighthouse"])


def test_a_version_that_fails_leaves_the_old_one_whole(api: Api) -> None:
    api.send(OLD, "The old lighthouse", {"era": "old"})
    assert api.index() == 1
    api.send(NEW, "The new lighthouse", {"era": "new"})
    with session_scope(api.factory) as session:  # what the worker records when it gives up on a version
        doc_id, digest = session.execute(text("SELECT id, content_hash FROM documents")).one()
        store.mark_failed(session, doc_id, "chunking failed: test", digest)
    assert api.index() == 0
    assert api.search({"era": "new"}) == []
    assert api.search({"era": "old"})[0] == ("The old lighthouse", "OLD", {"era": "old"})
    doc = api.document()
    assert (doc["status"], doc["title"], doc["metadata"]) == ("failed", "The old lighthouse", {"era": "old"})
    # Sent again, it is indexed with what was sent this time.
    api.send(NEW, "The newer lighthouse", {"era": "newer"})
    assert api.index() == 1
    assert api.search({"era": "newer"})[0] == ("The newer lighthouse", "NEW", {"era": "newer"})


def test_a_later_send_before_the_write_wins(api: Api) -> None:
    api.send(OLD, "The old lighthouse", {"era": "old"})
    assert api.index() == 1
    api.send(NEW, "The new lighthouse", {"era": "new"})
    api.send(NEW, "The new lighthouse", {"era": "newest"})  # same text, other metadata, before any write
    assert api.search({"era": "old"})[0][2] == {"era": "old"}
    assert api.index() == 1
    assert [api.search({"era": e}) for e in ("old", "new")] == [[], []]
    assert api.search({"era": "newest"})[0] == ("The new lighthouse", "NEW", {"era": "newest"})


def test_same_text_new_metadata_applies_at_once_without_reindexing(api: Api) -> None:
    api.send(OLD, "The old lighthouse", {"era": "old"})
    assert api.index() == 1
    with session_scope(api.factory) as session:
        chunks = set(session.execute(text("SELECT id FROM chunks")).scalars())

    accepted = api.send(OLD, "The old lighthouse", {"era": "restored"})
    assert (accepted["queued"], accepted["unchanged"]) == (0, 1)
    assert api.search({"era": "old"}) == []
    assert api.search({"era": "restored"})[0] == ("The old lighthouse", "OLD", {"era": "restored"})
    assert api.index() == 0
    with session_scope(api.factory) as session:
        assert set(session.execute(text("SELECT id FROM chunks")).scalars()) == chunks  # the same rows
    # The very same request again changes nothing.
    assert api.send(OLD, "The old lighthouse", {"era": "restored"})["unchanged"] == 1


def test_same_text_new_title_is_indexed_again_and_switches_with_its_chunks(api: Api) -> None:
    api.send(OLD, "The old lighthouse", {"era": "old"})
    assert api.index() == 1
    accepted = api.send(OLD, "The restored lighthouse", {"era": "old"})
    assert accepted["queued"] == 1
    doc = api.document()
    assert (doc["title"], doc["headings"]) == ("The old lighthouse", ["The old lighthouse"])
    assert api.search({"era": "old"})[0][0] == "The old lighthouse"
    assert api.index() == 1
    doc = api.document()
    assert (doc["status"], doc["title"], doc["headings"]) == (
        "indexed", "The restored lighthouse", ["The restored lighthouse"])
    assert api.search({"era": "old"})[0] == ("The restored lighthouse", "OLD", {"era": "old"})

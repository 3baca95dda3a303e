"""Issue 15, point 3: a small collection's lexical leg costs what the small collection holds, whatever a large
neighbour in the same database holds (its postings of the very same terms included)."""

from __future__ import annotations

import json
import uuid
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import event, text

from app.config import Settings
from app.db.session import make_engine, make_sessionmaker, session_scope
from app.embedding import chunker_key
from tests.fixtures.bulk import add_bulk_collection
from tests.fixtures.helpers import upload, wait_for_job

QUERY = "glacier meltwater moraine"
# The neighbour's most frequent words are the query's: every one of its documents holds some of them.
WORDS = ["glacier", "meltwater", "moraine", "ice", "rock", "valley", "snow", "river", "summit", "ridge",
         "lake", "field", "station", "survey", "measure", "season", "winter", "retreat", "advance", "basin"]


def _rows_read(node: dict[str, Any], relations: tuple[str, ...]) -> float:
    """Rows the plan's scans of these relations returned, over all their loops (EXPLAIN ANALYZE, JSON)."""
    own = node["Actual Rows"] * node["Actual Loops"] if node.get("Relation Name") in relations else 0
    return own + sum(_rows_read(child, relations) for child in node.get("Plans", []))


def test_a_small_collections_statements_read_only_its_own_postings(
    client: TestClient, worker: Any, settings: Settings
) -> None:
    small = f"skew-small-{uuid.uuid4().hex[:8]}"
    notes = [json.dumps({"_id": f"n{i}", "title": f"Field note {i}",
                         "text": f"Glacier {i} retreated {i} metres. Meltwater lakes formed below the moraine."})
             for i in range(6)]
    r = upload(client, "notes.jsonl", ("\n".join(notes) + "\n").encode(), small)
    assert wait_for_job(client, r.json()["job_id"])["state"] == "succeeded"

    engine = make_engine(settings, pool_size=1)
    factory = make_sessionmaker(engine)
    big = f"skew-big-{uuid.uuid4().hex[:8]}"
    with session_scope(factory) as session:
        active = session.execute(text("SELECT id, params FROM embedding_models WHERE status = 'active'")).one()
        big_id = add_bulk_collection(session, big, 20_000, WORDS, chunker=chunker_key(active.params or {}),
                                     words_per_document=12)
    try:
        with session_scope(factory) as session:
            small_id = session.execute(text("SELECT id FROM collections WHERE name = :n"), {"n": small}).scalar_one()
            own = session.execute(text(
                "SELECT (SELECT count(*) FROM chunk_postings WHERE collection_id = :s), "
                "(SELECT count(*) FROM lexical_postings WHERE collection_id = :s), "
                "(SELECT count(*) FROM chunk_postings WHERE collection_id = :b)"), {"s": small_id, "b": big_id}).one()
        assert own[2] > 100 * own[0]  # the neighbour's postings dwarf the small collection's

        api_engine = client.app.state.resources.engine  # type: ignore[attr-defined]
        statements: list[tuple[str, Any]] = []

        def capture(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
            if "postings" in statement:
                statements.append((statement, parameters))

        event.listen(api_engine, "before_cursor_execute", capture)
        try:
            for mode in ("lexical", "hybrid"):
                for group in ("passage", "document"):
                    found = client.post("/v1/search", json={"query": QUERY, "collection": small, "k": 5,
                                                            "mode": mode, "group": group})
                    assert found.status_code == 200, found.text
                    assert found.json()["results"]
                    assert {h["external_id"] for h in found.json()["results"]} <= {f"n{i}" for i in range(6)}
        finally:
            event.remove(api_engine, "before_cursor_execute", capture)
        assert len(statements) >= 6
        with session_scope(factory) as session:
            for sql, parameters in statements:
                [[plan]] = session.connection().exec_driver_sql("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, parameters)
                read = _rows_read(plan[0]["Plan"], ("chunk_postings", "lexical_postings"))
                assert read <= own[0] + own[1], (read, own, sql)
    finally:
        with session_scope(factory) as session:
            session.execute(text("DELETE FROM collections WHERE id = :b"), {"b": big_id})
        engine.dispose()


def test_tables_that_grew_are_analysed_after_an_ingest_batch(settings: Settings) -> None:
    """Right after an ingest, before autovacuum's ANALYZE, a new collection's questions were planned for empty
    tables (60 ms searches that took 10 ms after ANALYZE; BENCHMARKS.md, skew). The ingest pipeline now runs
    store.analyze_grown after each batch: tables grown by a fifth are analysed, then left alone."""
    import time

    from app.ingest import store

    engine = make_engine(settings, pool_size=1)
    factory = make_sessionmaker(engine)
    name = f"grown-{uuid.uuid4().hex[:8]}"
    with session_scope(factory) as session:
        active = session.execute(text("SELECT params FROM embedding_models WHERE status = 'active'")).one()
        live = session.execute(text("SELECT count(*) FROM chunk_postings")).scalar_one()
        big_id = add_bulk_collection(session, name, max(5_000, live // 20), WORDS, words_per_document=12,
                                     chunker=chunker_key(active.params or {}), analyze=False)
        session.execute(text("SELECT pg_stat_force_next_flush()"))
    try:
        deadline = time.monotonic() + 15
        while True:  # the statistics collector learns of the writes within about a second
            with session_scope(factory) as session:
                analysed = store.analyze_grown(session)
                session.execute(text("SELECT pg_stat_force_next_flush()"))
            if "chunk_postings" in analysed:
                break
            assert time.monotonic() < deadline, analysed
            time.sleep(0.5)
        assert {"chunks", "lexical_postings"} <= set(analysed)
        deadline = time.monotonic() + 15
        while True:  # and once analysed, they are left alone
            with session_scope(factory) as session:
                again = store.analyze_grown(session)
            if "chunk_postings" not in again:
                break
            assert time.monotonic() < deadline, again
            time.sleep(0.5)
    finally:
        with session_scope(factory) as session:
            session.execute(text("DELETE FROM collections WHERE id = :b"), {"b": big_id})
        engine.dispose()

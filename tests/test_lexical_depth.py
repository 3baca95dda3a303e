"""The lexical leg reads each query term's best postings only (issue 14, point 2): its cost follows the question,
not the collection. A term with more postings than PGSAGE_LEXICAL_DEPTH is cut to its best ones (by BM25 term
weight, through the impact index); the passages kept get their exact BM25, and a collection where no term is cut
is scored exactly."""

from __future__ import annotations

import json
import uuid
from typing import Any

from fastapi.testclient import TestClient

from app.config import Settings
from app.db.session import make_engine, make_sessionmaker, session_scope
from app.embedding import chunker_key
from app.query import retrieve
from tests.fixtures.helpers import captured_statements, upload, wait_for_job

QUERY = "glacier meltwater moraine"


def _note(i: int) -> str:
    """Every note says glacier (1-4 times, in texts of different lengths); every 10th meltwater; two moraine."""
    words = " ".join(["glacier"] * (1 + i % 4))
    text_ = (f"Survey {i}: {words} observed near the station. " + "Snow and rock cover the slope. " * (i % 5)
             + ("Meltwater pools at the front. " if i % 10 == 0 else "")
             + ("A terminal moraine marks the old extent. " if i in (7, 33) else ""))
    return json.dumps({"_id": f"s{i}", "title": f"Survey {i}", "text": text_})


def _leg(session: Any, cid: int, chunker: str, depth: int, n: int = 10) -> retrieve.LexicalLeg:
    return retrieve.passage_lexical(session, QUERY, cid, chunker, n, k1=0.9, b=0.4, documents=False, depth=depth)


def _nodes(node: dict[str, Any], under: str | None = None) -> list[tuple[str | None, dict[str, Any]]]:
    """Every plan node (EXPLAIN ANALYZE, JSON) with the CTE it is in."""
    under = node.get("Subplan Name", under)
    return [(under, node)] + [n for child in node.get("Plans", []) for n in _nodes(child, under)]


def test_a_cut_term_reads_its_best_postings_and_kept_passages_score_exactly(
    client: TestClient, worker: Any, settings: Settings
) -> None:
    name = f"depth-{uuid.uuid4().hex[:8]}"
    r = upload(client, "surveys.jsonl", ("\n".join(_note(i) for i in range(60)) + "\n").encode(), name)
    assert wait_for_job(client, r.json()["job_id"])["state"] == "succeeded"
    engine = make_engine(settings, pool_size=1)
    with session_scope(make_sessionmaker(engine)) as session:
        cid, space = retrieve.collection_and_space(session, name, plan_once=False)
        chunker = chunker_key(space.params or {})
        exact = _leg(session, cid, chunker, depth=0, n=100)
        every = dict(zip(exact.chunks, exact.scores, strict=True))
        assert len(every) == 60  # every note matches "glacier"

        # Deep enough for every term: the same passages and scores as reading every posting, nothing cut.
        deep = _leg(session, cid, chunker, depth=1000)
        assert deep.cut == []
        assert deep.chunks == exact.chunks[:10]
        assert deep.scores == exact.scores[:10]

        # Depth 5: glacier (60 postings) and meltwater (6) are cut, moraine (2) is read whole.
        with captured_statements(engine) as statements:
            cut = _leg(session, cid, chunker, depth=5)
        assert sorted(cut.cut) == ["glacier", "meltwat"]
        assert cut.chunks, "the cut leg found nothing"
        for chunk, score in zip(cut.chunks, cut.scores, strict=True):
            assert abs(score - every[chunk]) < 1e-9, (chunk, score, every[chunk])  # completed exactly
        assert cut.scores == sorted(cut.scores, reverse=True)
        # The two notes holding the rare term (read whole: its list is short) lead, as they do exactly.
        assert cut.chunks[:2] == exact.chunks[:2]

        # Its plan reads at most 5 postings a term through the impact index, never a whole list.
        [(sql, parameters)] = [s for s in statements if "chunk_postings" in s[0]]
        # On a table this small the planner may as well read a term's few postings and sort them; with those
        # plans off, the plan shows what the statement's shape allows (at 100,000 chunks the planner picks the
        # impact index by itself: BENCHMARKS.md).
        session.connection().exec_driver_sql("SET LOCAL enable_seqscan = off")
        session.connection().exec_driver_sql("SET LOCAL enable_sort = off")
        plan = "\n".join(r[0] for r in session.connection().exec_driver_sql("EXPLAIN " + sql, parameters))
        [[analysed]] = session.connection().exec_driver_sql("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, parameters)
    engine.dispose()
    assert "ix_chunk_postings_impact" in plan, plan
    lists = [n for cte, n in _nodes(analysed[0]["Plan"]) if cte == "CTE lists" and n.get("Relation Name")]
    assert lists
    assert all(n["Index Name"] == "ix_chunk_postings_impact" for n in lists), lists
    assert sum(n["Actual Rows"] * n["Actual Loops"] for n in lists) <= 5 * 3, lists  # at most 5 postings a term


def test_the_service_searches_through_the_depth_leg(client: TestClient, worker: Any, settings: Settings) -> None:
    """Through the API (the service's depth): the lexical search puts the notes with the rare term first."""
    name = f"depthapi-{uuid.uuid4().hex[:8]}"
    r = upload(client, "surveys.jsonl", ("\n".join(_note(i) for i in range(60)) + "\n").encode(), name)
    assert wait_for_job(client, r.json()["job_id"])["state"] == "succeeded"
    body = {"query": QUERY, "k": 3, "collection": name, "mode": "lexical", "group": "passage"}
    found = client.post("/v1/search", json=body)
    assert found.status_code == 200, found.text
    top = {h["external_id"] for h in found.json()["results"][:2]}
    assert top == {"s7", "s33"}, found.json()

"""The passage lexical leg reads each query term's best postings first (issue 14, point 2), and is exact.

retrieve.passage_lexical reads each term's postings in order of their BM25 weight (migration 0009's index) and
stops when no passage it has not read can reach its top n; otherwise it reads deeper, and at last everything.
Here, on a collection of a few hundred real-text passages in the test database, it must return the same passages
in the same order with the same scores as the statement that scores every posting, for many queries, with a first
depth small enough that some queries settle at once and others need more rounds; with a depth limit, a leg that
stopped at it short of a proof says so.
"""

from __future__ import annotations

import random
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from app.config import Settings
from app.db.session import make_engine, make_sessionmaker, session_scope
from app.embedding import chunker_key
from app.ingest import store
from app.ingest.chunk import ChunkSpan
from app.ingest.embed import Embedded
from app.ingest.load import LoadedDocument
from app.query import retrieve
from app.reindex import spaces

CORPUS = Path(__file__).parent / "data" / "corpus"
DOCUMENTS, N, EXACT = 300, 20, 5


@pytest.fixture(scope="module")
def passages(client: TestClient, settings: Settings) -> Iterator[tuple[object, int, str, list[str]]]:
    """A collection of DOCUMENTS documents of 1-3 passages recombined from the test corpus's sentences."""
    sentences = [s.strip() for path in sorted(CORPUS.iterdir())
                 for s in re.split(r"(?<=[.!?])\s+", re.sub(r"<[^>]+>|[#*]", " ", path.read_text()))
                 if len(s.split()) > 3]
    rng = random.Random(14)
    engine = make_engine(settings)
    factory = make_sessionmaker(engine)
    with session_scope(factory) as session:
        space = spaces.active(session)
        assert space is not None
        sid, dim, chunker = space.id, int(space.dimension), chunker_key(space.params or {})
        cid = store.collection_id(session, f"t-bounded-{uuid.uuid4().hex[:8]}", create=True)
        job = store.create_job(session, "ingest", cid, {})
        bodies = [[" ".join(rng.sample(sentences, rng.randint(1, 6))) for _ in range(rng.choice((1, 2, 3)))]
                  for _ in range(DOCUMENTS)]
        for i, body in enumerate(bodies):  # no two documents alike
            body[0] = f"Note {i}. {body[0]}"
        docs = [LoadedDocument(f"p-{i}", None, "\n\n".join(b)) for i, b in enumerate(bodies)]
        store.upsert_documents(session, cid, docs, job)
    vectors = np.random.default_rng(14).standard_normal((4, dim)).astype(np.float32)
    with session_scope(factory) as session:
        ids = session.execute(text("SELECT id FROM documents WHERE collection_id = :c"), {"c": cid}).scalars().all()
        pending = {p.content: p for p in store.pending_documents(session, ids)}
        writes = []
        for doc, body in zip(docs, bodies, strict=True):
            spans, at = [], 0
            for i, part in enumerate(body):
                spans.append(ChunkSpan(i, part, len(part.split()), at, at + len(part)))
                at += len(part) + 2
            embedded = Embedded(vectors[: len(spans)], np.zeros((0, dim), np.float32))
            writes.append(store.DocumentWrite(pending[doc.content], [store.ChunkSet(chunker, spans, {sid: embedded})]))
        assert all(store.write_documents(session, writes).values())
    with session_scope(factory) as session:
        store.compact_lexical_statistics(session)
    # Questions of a few words of the corpus's sentences (common and rare words mixed, as asked), and some words.
    queries = []
    for sentence in rng.sample(sentences, min(40, len(sentences))):
        words = re.findall(r"[A-Za-z]{3,}", sentence)
        start = rng.randrange(max(1, len(words) - 3))
        queries.append(" ".join(words[start : start + rng.randint(2, 6)]))
    words = sorted({w.lower() for s in sentences for w in re.findall(r"[A-Za-z]{3,}", s)})
    queries += [" ".join(rng.sample(words, rng.randint(1, 4))) for _ in range(20)]
    queries += ["the water and the", "coffee", "bread flour water salt", "volcano lava eruption magma"]
    try:
        yield factory, cid, chunker, queries
    finally:
        with session_scope(factory) as session:
            session.execute(text("DELETE FROM collections WHERE id = :c"), {"c": cid})
        engine.dispose()


def test_bounded_lexical_leg_equals_scoring_every_posting(
    passages: tuple[object, int, str, list[str]], settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    factory, cid, chunker, queries = passages
    monkeypatch.setattr(retrieve, "IMPACT_FIRST", 4)
    monkeypatch.setattr(retrieve, "IMPACT_GROWTH", 4)
    k1, b = settings.bm25_k1, settings.bm25_b
    assert (k1, b) == (retrieve.IMPACT_K1, retrieve.IMPACT_B), "the defaults are the index's parameters"
    depths: list[int | None] = []
    overlap: list[float] = []
    limited_out = 0
    for q in queries:
        with session_scope(factory) as session:  # type: ignore[arg-type]
            bounded = retrieve.passage_lexical(session, q, cid, chunker, N, k1=k1, b=b, exact=EXACT)
            full, settled = retrieve._passage_lexical(session, q, cid, chunker, N, k1=k1, b=b, filters=None,
                                                      documents=True, depth=None, exact=N)
        assert settled
        if not full.chunks:  # stop words only
            assert not bounded.chunks
            continue
        # The same exact head, up to ties (equal scores summed in another order differ in their last bits).
        assert bounded.scores[:EXACT] == pytest.approx(full.scores[:EXACT], rel=1e-9), q
        cut = full.scores[EXACT - 1] * (1 + 1e-9) if len(full.scores) >= EXACT else -1.0
        assert ({c for c, v in zip(bounded.chunks, bounded.scores, strict=True) if v > cut}
                == {c for c, v in zip(full.chunks, full.scores, strict=True) if v > cut}), q
        exact_scores = dict(zip(full.chunks, full.scores, strict=True))
        for chunk, score in zip(bounded.chunks, bounded.scores, strict=True):
            if chunk in exact_scores:  # past the head, a passage not completed carries the part it was read for
                assert score <= exact_scores[chunk] * (1 + 1e-9), q
        assert bounded.idf == pytest.approx(full.idf)
        overlap.append(len(set(bounded.chunks) & set(full.chunks)) / len(full.chunks))
        depths.append(bounded.depth)
        # With a depth limit, a leg that reached it says so; one that did not is the exact one.
        limited = retrieve.passage_lexical(session, q, cid, chunker, N, k1=k1, b=b, exact=EXACT, max_depth=16)
        assert limited.exact == (bounded.depth is not None and bounded.depth <= 16), q
        if limited.exact:
            assert limited.chunks == bounded.chunks
        limited_out += not limited.exact
    # The bound did its work: some queries settled early, on a few postings of each term, others went deeper.
    assert any(d is not None and d <= 16 for d in depths), depths
    assert any(d is None or d > 16 for d in depths), depths
    assert sum(overlap) / len(overlap) > 0.8, overlap  # past the exact head, mostly the same passages
    assert limited_out, "some queries need more than 16 postings a term"


def test_the_bounded_statement_reads_the_impact_index(
    passages: tuple[object, int, str, list[str]], settings: Settings
) -> None:
    """Each term's best postings come from the impact-ordered index, not from a sort of all of them."""
    factory, cid, chunker, _ = passages
    with session_scope(factory) as session:  # type: ignore[arg-type]
        plan = session.execute(text(
            f"EXPLAIN SELECT chunk_id FROM chunk_postings WHERE collection_id = :c AND chunker = :ck "
            f"AND term = 'water' ORDER BY {retrieve.IMPACT} DESC LIMIT 10"), {"c": cid, "ck": chunker}).scalars().all()
    assert any("ix_chunk_postings_impact" in line for line in plan), plan
    assert not any("Sort" in line for line in plan), plan


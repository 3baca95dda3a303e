"""Retrieval: BM25 inside Postgres (hand-computed), modes, fusion, and pluggable rerankers.

Documents go through the real pipeline (API -> Redis -> Celery worker -> real model -> Postgres).
"""

from __future__ import annotations

import math
import uuid
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from app.config import Settings
from app.query.fuse import Candidate, fuse, rank_by
from app.query.retrieve import lexical_query
from tests.fixtures.helpers import wait_for_job

K1, B = 1.2, 0.75


def _post_json_docs(client: TestClient, collection: str, docs: dict[str, str]) -> None:
    for external_id, body in docs.items():
        r = client.post("/v1/documents", json={"text": body, "external_id": external_id, "collection": collection})
        assert r.status_code == 202, r.text
        job = wait_for_job(client, r.json()["job_id"])
        assert job["state"] == "succeeded", job


def _search(client: TestClient, collection: str, query: str, **extra: Any) -> list[dict[str, Any]]:
    r = client.post("/v1/search", json={"query": query, "collection": collection, "k": 10, **extra})
    assert r.status_code == 200, r.text
    return r.json()["results"]  # type: ignore[no-any-return]


def _bm25(tf: int, dl: int, avgdl: float, n: int, df: int) -> float:
    """Lucene's BM25 for one term, written out by hand."""
    idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
    return idf * tf * (K1 + 1) / (tf + K1 * (1 - B + B * dl / avgdl))


@pytest.fixture
def fruit(client: TestClient, worker: Any, collection: str) -> str:
    # The English analyser drops no word here and stems apple -> appl, cherry -> cherri.
    _post_json_docs(client, collection, {
        "d1": "apple apple banana",
        "d2": "apple cherry",
        "d3": "cherry cherry cherry date",
    })
    return collection


def _lexical(client: TestClient, collection: str, query: str) -> dict[str, float]:
    hits = _search(client, collection, query, mode="lexical", retrieval={"bm25_k1": K1, "bm25_b": B})
    return {h["external_id"]: h["score"] for h in hits}


def test_bm25_scores_match_a_hand_computation(client: TestClient, fruit: str) -> None:
    # N = 3 documents, lengths 3, 2, 4: avgdl 3.
    scores = _lexical(client, fruit, "apple")
    assert set(scores) == {"d1", "d2"}  # d3 has no query term
    assert scores["d1"] == pytest.approx(_bm25(2, 3, 3.0, 3, 2), rel=1e-5)
    assert scores["d2"] == pytest.approx(_bm25(1, 2, 3.0, 3, 2), rel=1e-5)

    both = _lexical(client, fruit, "cherry apples")  # plural stems to the same term
    assert both["d2"] == pytest.approx(_bm25(1, 2, 3.0, 3, 2) + _bm25(1, 2, 3.0, 3, 2), rel=1e-5)
    assert both["d3"] == pytest.approx(_bm25(3, 4, 3.0, 3, 2), rel=1e-5)
    assert list(both) == sorted(both, key=lambda d: -both[d])


def test_bm25_statistics_follow_documents_that_arrive_change_and_leave(client: TestClient, fruit: str) -> None:
    _post_json_docs(client, fruit, {"d4": "banana split with date syrup"})  # 4 terms: "with" is a stop-word
    scores = _lexical(client, fruit, "apple")
    avgdl = (3 + 2 + 4 + 4) / 4
    assert scores["d1"] == pytest.approx(_bm25(2, 3, avgdl, 4, 2), rel=1e-5)

    _post_json_docs(client, fruit, {"d2": "kiwi"})  # new content replaces d2's postings
    scores = _lexical(client, fruit, "apple")
    avgdl = (3 + 1 + 4 + 4) / 4
    assert set(scores) == {"d1"}
    assert scores["d1"] == pytest.approx(_bm25(2, 3, avgdl, 4, 1), rel=1e-5)

    doc = next(h for h in _search(client, fruit, "kiwi", mode="lexical") if h["external_id"] == "d2")
    assert client.delete(f"/v1/documents/{doc['document_id']}").status_code in (200, 204)
    scores = _lexical(client, fruit, "apple")
    avgdl = (3 + 4 + 4) / 3
    assert scores["d1"] == pytest.approx(_bm25(2, 3, avgdl, 3, 1), rel=1e-5)
    assert _lexical(client, fruit, "kiwi") == {}


def test_long_documents_count_each_word_once_despite_chunk_overlap(
    client: TestClient, worker: Any, collection: str, settings: Settings
) -> None:
    sentences = [f"Sentence {i} talks about topic{i % 17} and the widget number {i}." for i in range(300)]
    _post_json_docs(client, collection, {"long": " ".join(sentences)})
    engine = create_engine(settings.database_url or "")
    try:
        with engine.connect() as conn:
            # The reference counts sentence by sentence: one tsvector of the whole text would cap each
            # term at 256 positions (here "widget" occurs 300 times).
            row = conn.execute(text("""
                SELECT d.chunk_count, d.lexical_length,
                       (SELECT sum(array_length(l.positions, 1))
                          FROM regexp_split_to_table(d.content, '[.] +') s,
                               unnest(to_tsvector('pg_catalog.english', s)) l) AS whole
                  FROM documents d JOIN collections c ON c.id = d.collection_id
                 WHERE c.name = :c AND d.external_id = 'long'"""), {"c": collection}).one()
    finally:
        engine.dispose()
    assert row.chunk_count > 5  # several overlapping chunks
    assert row.lexical_length == row.whole


def test_modes(client: TestClient, worker: Any, collection: str) -> None:
    _post_json_docs(client, collection, {
        "tides": "Spring tides happen at new and full moon, when the Sun and the Moon pull in a line.",
        "coffee": "Espresso wants a fine grind and an extraction of about 25 seconds.",
        "ticket": "Incident QX-7731: the nightly backup job failed because the disk was full.",
    })
    for mode in ("hybrid", "dense", "lexical"):
        r = client.post("/v1/search", json={"query": "why are tides strongest at full moon", "collection": collection,
                                             "mode": mode, "k": 3})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["mode"] == mode
        assert body["results"][0]["external_id"] == "tides", (mode, body["results"])
    # An identifier the model has never seen: the lexical leg finds it, and so does the default.
    assert _search(client, collection, "QX-7731", mode="lexical")[0]["external_id"] == "ticket"
    assert _search(client, collection, "QX-7731")[0]["external_id"] == "ticket"
    # Lexical mode returns only documents holding a query term.
    assert _search(client, collection, "zeppelin", mode="lexical") == []
    r = client.post("/v1/ask", json={"question": "How long is an espresso extraction?", "collection": collection,
                                      "mode": "lexical"})
    assert r.status_code == 200, r.text
    assert r.json()["citations"][0]["external_id"] == "coffee"


def test_a_word_joining_letters_and_a_year_also_searches_its_parts(
    client: TestClient, worker: Any, collection: str
) -> None:
    """"FY2017" is one lexeme to Postgres's analyser; filings write "fiscal 2017" or "2017". The lexical legs also
    search the parts, and the whole word still matches a text that writes it."""
    assert lexical_query("Amazon's FY2017 revenue") == "Amazon's FY2017 revenue FY 2017"
    assert lexical_query("p53 and BRCA1 in Q2") == "p53 and BRCA1 in Q2"  # one letter or one digit: left alone
    _post_json_docs(client, collection, {
        "y2017": "Net sales were 178 billion dollars in fiscal 2017, up from 136 billion.",
        "y2019": "Net sales were 281 billion dollars in fiscal 2019, up from 233 billion.",
        "code": "The FY2017 budget memo is filed under finance.",
    })
    for group in ("passage", "document"):
        extra = {"mode": "lexical", "group": group}
        found = [h["external_id"] for h in _search(client, collection, "net sales FY2017", **extra)]
        assert found[0] == "y2017", (group, found)
        assert "y2019" in found  # "net sales" alone
        assert "code" in [h["external_id"] for h in _search(client, collection, "FY2017 memo", **extra)]


def test_a_lexical_hit_without_vectors_in_the_active_space_is_not_dropped(
    client: TestClient, worker: Any, collection: str, settings: Settings
) -> None:
    """Issue 11, defect 1 (the search half): a document whose vectors are missing from the active space (written
    in the gap a rollback leaves, or not yet embedded there) is still found by its words, in both groupings."""
    _post_json_docs(client, collection, {
        "ticket": "Incident QX-7731: the nightly backup job failed because the disk was full.",
        "tides": "Spring tides happen at new and full moon, when the Sun and the Moon pull in a line.",
    })
    engine = create_engine(settings.database_url or "")
    try:
        with engine.begin() as conn:
            removed = conn.execute(text("""
                DELETE FROM chunk_vectors v USING documents d, collections c
                 WHERE v.document_id = d.id AND d.collection_id = c.id AND c.name = :c AND d.external_id = 'ticket'
                """), {"c": collection}).rowcount
            conn.execute(text("""
                DELETE FROM sentence_vectors s USING chunks ch, documents d, collections c
                 WHERE s.chunk_id = ch.id AND ch.document_id = d.id AND d.collection_id = c.id AND c.name = :c
                   AND d.external_id = 'ticket'
                """), {"c": collection})
        assert removed >= 1
    finally:
        engine.dispose()
    for mode in ("lexical", "hybrid"):
        for group in ("passage", "document"):
            results = _search(client, collection, "QX-7731 backup", mode=mode, group=group)
            assert results[0]["external_id"] == "ticket", (mode, group, results)
            assert results[0]["similarity"] == 0.0  # no vector: no similarity to show
    # The dense leg cannot find it, and the question is not answered from a passage it cannot judge.
    assert "ticket" not in [r["external_id"] for r in _search(client, collection, "QX-7731 backup", mode="dense")]


@pytest.mark.parametrize("body", [
    {"mode": "sparse"},
    {"rerank": "magic"},
    {"rerank": "cross-encoder:"},
    {"retrieval": {"fusion": "max"}},
    {"retrieval": {"dense_weight": 1.5}},
    {"retrieval": {"candidates": 0}},
    {"retrieval": {"bm25_b": -1}},
    {"retrieval": {"unknown": 1}},
])
def test_bad_retrieval_options_are_refused(client: TestClient, body: dict[str, Any]) -> None:
    r = client.post("/v1/search", json={"query": "anything", "collection": "default", **body})
    assert r.status_code == 422, r.text
    assert r.json()["error"]


def test_a_reranker_that_cannot_load_is_a_clear_4xx(
    client: TestClient, worker: Any, collection: str, tmp_path: Path
) -> None:
    _post_json_docs(client, collection, {"a": "some text about rivers"})
    r = client.post("/v1/search", json={"query": "rivers", "collection": collection,
                                        "rerank": "cross-encoder:/no/such/model"})
    assert r.status_code == 404, r.text
    assert "no reranker model '/no/such/model' on this server" in r.json()["detail"]
    (tmp_path / "config.json").write_text("{}")  # a folder, but not a model
    r = client.post("/v1/search", json={"query": "rivers", "collection": collection,
                                        "rerank": f"cross-encoder:{tmp_path}"})
    assert r.status_code == 422, r.text
    assert "cannot load reranker" in r.json()["detail"]


# --- fusion, on candidates built by hand ----------------------------------------------------------


def _cands() -> list[Candidate]:
    ids = [uuid.UUID(int=i) for i in range(4)]
    return [
        Candidate(ids[0], 1, 0.90, 0.80, lexical=0.0),  # dense only
        Candidate(ids[1], 2, 0.70, 0.70, lexical=10.0),  # lexical best
        Candidate(ids[2], 3, 0.80, 0.60, lexical=5.0),
        Candidate(ids[3], 4, 0.50, 0.50, lexical=1.0),
    ]


def test_convex_fusion_is_a_weighted_sum_of_min_max_scores() -> None:
    out = fuse(_cands(), method="convex", dense_weight=0.5, document_weight=0.0)
    # dense minmax: .9->1, .7->.5, .8->.75, .5->0; lexical: 0->0, 10->1, 5->.5, 1->.1
    expected = {0: 0.5, 1: 0.75, 2: 0.625, 3: 0.05}
    assert [c.document_id.int for c in out] == [1, 2, 0, 3]
    for c in out:
        assert c.score == pytest.approx(expected[c.document_id.int])
    only_dense = fuse(_cands(), method="convex", dense_weight=1.0, document_weight=0.0)
    assert [c.document_id.int for c in only_dense] == [0, 2, 1, 3]


def test_zscore_fusion_standardises_each_leg() -> None:
    out = fuse(_cands(), method="zscore", dense_weight=0.5, document_weight=0.0)
    dense, lexical = [0.9, 0.7, 0.8, 0.5], [0.0, 10.0, 5.0, 1.0]

    def z(values: list[float]) -> list[float]:
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
        return [(v - mean) / std for v in values]

    expected = {i: 0.5 * a + 0.5 * b for i, (a, b) in enumerate(zip(z(dense), z(lexical), strict=True))}
    for c in out:
        assert c.score == pytest.approx(expected[c.document_id.int])
    assert [c.document_id.int for c in out] == sorted(expected, key=lambda i: -expected[i])


def test_rrf_fusion_and_document_weight() -> None:
    out = fuse(_cands(), method="rrf", dense_weight=0.5, document_weight=0.0)
    # dense ranks 1,3,2,4; lexical ranks -,1,2,3 (no lexical match adds nothing)
    expected = {0: 0.5 / 61, 1: 0.5 / 63 + 0.5 / 61, 2: 0.5 / 62 + 0.5 / 62, 3: 0.5 / 64 + 0.5 / 63}
    for c in out:
        assert c.score == pytest.approx(expected[c.document_id.int])
    # With the document vector weighted 1: (chunk + doc) / 2 = .85, .70, .70, .50.
    dense = rank_by(_cands(), "dense", 1.0)
    assert [round(c.score, 3) for c in dense] == [0.85, 0.7, 0.7, 0.5]


# --- rerankers -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_cross_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cross-encoder with random weights, saved locally (no trained weights can be fetched offline)."""
    import torch
    from sentence_transformers import CrossEncoder
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from app.embedding import resolve_model_path

    torch.manual_seed(7)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("all-MiniLM-L6-v2"))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512, num_labels=1)
    folder = tmp_path_factory.mktemp("tiny-cross-encoder")
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CrossEncoder(str(folder))  # loads as a cross-encoder
    return folder


def test_cross_encoder_reranker_reorders_the_head_by_its_scores(
    client: TestClient, worker: Any, collection: str, tiny_cross_encoder: Path
) -> None:
    from sentence_transformers import CrossEncoder

    docs = {f"doc{i}": f"Note {i}: the river {name} floods in spring and carries silt to the delta."
            for i, name in enumerate(["Nile", "Rhine", "Danube", "Volga", "Mekong", "Indus"])}
    _post_json_docs(client, collection, docs)
    query = "which river floods in spring"
    plain = _search(client, collection, query)
    name = f"cross-encoder:{tiny_cross_encoder}"
    reranked = _search(client, collection, query, rerank=name, retrieval={"rerank_depth": 4})
    assert len(plain) == len(reranked) == 6
    head, tail = reranked[:4], reranked[4:]
    # The head is the fused top 4, ordered by the cross-encoder; the tail keeps its fused order.
    assert {h["external_id"] for h in head} == {h["external_id"] for h in plain[:4]}
    assert [h["external_id"] for h in tail] == [h["external_id"] for h in plain[4:]]
    model = CrossEncoder(str(tiny_cross_encoder))
    expected = model.predict([(query, h["text"]) for h in head])
    assert [h["rerank_score"] for h in head] == pytest.approx([float(x) for x in expected], abs=1e-4)
    assert [h["rerank_score"] for h in head] == sorted((h["rerank_score"] for h in head), reverse=True)
    assert all(h["rerank_score"] is None for h in tail)


def test_prf_reranker_runs_offline(client: TestClient, worker: Any, collection: str) -> None:
    _post_json_docs(client, collection, {
        "a": "Vitamin D supplements and bone fractures in older adults.",
        "b": "Calcium intake and bone density in women after menopause.",
        "c": "A recipe for lemon cake with poppy seeds.",
    })
    hits = _search(client, collection, "vitamin D and fractures", rerank="prf")
    assert hits[0]["external_id"] == "a"
    assert hits[-1]["external_id"] == "c"
    r = client.post("/v1/search", json={"query": "bones", "collection": collection, "rerank": "prf"})
    assert r.json()["rerank"] == "prf"


def test_a_repeated_query_is_not_embedded_again(client: TestClient, worker: Any, fruit: str) -> None:
    """Query vectors are kept per model (bounded): the same question again skips the model, same results."""
    from app.metrics import QUERY_EMBEDDING

    def embedded() -> float:
        return next(s.value for m in QUERY_EMBEDDING.collect() for s in m.samples if s.name.endswith("_count"))

    query = f"which fruit is sour {uuid.uuid4().hex[:6]}"  # new to this process
    before = embedded()
    first = client.post("/v1/search", json={"query": query, "collection": fruit}).json()
    assert embedded() == before + 1
    again = client.post("/v1/search", json={"query": query, "collection": fruit}).json()
    assert embedded() == before + 1
    assert [h["chunk_id"] for h in again["results"]] == [h["chunk_id"] for h in first["results"]]
    assert [h["score"] for h in again["results"]] == [h["score"] for h in first["results"]]
    pipeline = client.app.state.resources.query  # type: ignore[attr-defined]
    assert len(pipeline.vectors._items) <= pipeline.vectors.size

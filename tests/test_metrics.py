"""Metric code against hand-computed cases (trec_eval's ndcg_cut.10 definition)."""

from __future__ import annotations

import math

import pytest

from app.eval.metrics import evaluate, mrr_at_k, ndcg_at_k, recall_at_k


def test_ndcg_perfect_and_empty() -> None:
    assert ndcg_at_k(["a", "b"], {"a": 1, "b": 1}) == pytest.approx(1.0)
    assert ndcg_at_k(["x", "y"], {"a": 1}) == 0.0
    assert ndcg_at_k([], {"a": 1}) == 0.0


def test_ndcg_graded_by_hand() -> None:
    # ranking: c (grade 0), a (grade 2), b (grade 1); ideal: a, b
    dcg = 0 / math.log2(2) + 2 / math.log2(3) + 1 / math.log2(4)
    idcg = 2 / math.log2(2) + 1 / math.log2(3)
    assert ndcg_at_k(["c", "a", "b"], {"a": 2, "b": 1}) == pytest.approx(dcg / idcg)
    assert ndcg_at_k(["c", "a", "b"], {"a": 2, "b": 1}) == pytest.approx(0.6697, abs=1e-4)


def test_ndcg_cuts_at_ten_and_ignores_duplicates() -> None:
    ranking = [f"n{i}" for i in range(10)] + ["a"]
    assert ndcg_at_k(ranking, {"a": 1}) == 0.0  # rank 11 is past the cut
    # A document's second chunk does not count twice.
    assert ndcg_at_k(["a", "a", "b"], {"a": 1, "b": 1}) == pytest.approx(1.0)


def test_ideal_uses_all_judged_documents() -> None:
    # Only one of two relevant documents retrieved at rank 1.
    assert ndcg_at_k(["a"], {"a": 1, "b": 1}) == pytest.approx(1 / (1 + 1 / math.log2(3)))


def test_recall_and_mrr() -> None:
    qrels = {"a": 1, "b": 1, "c": 0}
    assert recall_at_k(["c", "a", "x"], qrels, 10) == 0.5
    assert recall_at_k(["c", "a", "b"], qrels, 2) == 0.5
    assert mrr_at_k(["c", "x", "b"], qrels) == pytest.approx(1 / 3)
    assert mrr_at_k(["c", "x"], qrels) == 0.0


def test_evaluate_averages_over_judged_queries_only() -> None:
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}, "q3": {"c": 0}}
    result = evaluate({"q1": ["a"], "q2": ["x", "b"]}, qrels)
    assert result["queries"] == 2
    assert result["ndcg@10"] == pytest.approx((1.0 + 1 / math.log2(3)) / 2)
    assert result["mrr@10"] == pytest.approx(0.75)
    assert result["recall@10"] == 1.0

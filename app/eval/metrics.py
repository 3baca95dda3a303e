"""Retrieval metrics as trec_eval computes them: ndcg_cut.10 (graded gain, log2 discount), recall, MRR."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def ndcg_at_k(ranking: Sequence[str], qrels: Mapping[str, int], k: int = 10) -> float:
    """nDCG@k with gain = relevance grade and discount log2(rank + 1), ideal from all judged-relevant docs."""
    dcg = sum(qrels.get(doc, 0) / math.log2(rank + 2) for rank, doc in enumerate(dedupe(ranking)[:k]))
    ideal = sorted((g for g in qrels.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(rank + 2) for rank, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at_k(ranking: Sequence[str], qrels: Mapping[str, int], k: int) -> float:
    relevant = {d for d, g in qrels.items() if g > 0}
    if not relevant:
        return 0.0
    return len(relevant.intersection(dedupe(ranking)[:k])) / len(relevant)


def mrr_at_k(ranking: Sequence[str], qrels: Mapping[str, int], k: int = 10) -> float:
    for rank, doc in enumerate(dedupe(ranking)[:k], start=1):
        if qrels.get(doc, 0) > 0:
            return 1.0 / rank
    return 0.0


def dedupe(ranking: Sequence[str]) -> list[str]:
    """Documents in order of first appearance (a document ranks by its best chunk)."""
    seen: set[str] = set()
    out = []
    for doc in ranking:
        if doc not in seen:
            seen.add(doc)
            out.append(doc)
    return out


def evaluate(rankings: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, int]]) -> dict[str, float]:
    """Mean metrics over the queries that have at least one relevant document (as BEIR does)."""
    judged = [q for q, rels in qrels.items() if any(g > 0 for g in rels.values())]
    if not judged:
        raise ValueError("no query has a relevant document")
    n = len(judged)

    def mean(fn: object) -> float:
        return sum(fn(rankings.get(q, []), qrels[q]) for q in judged) / n  # type: ignore[operator]

    return {
        "ndcg@10": mean(lambda r, q: ndcg_at_k(r, q, 10)),
        "recall@10": mean(lambda r, q: recall_at_k(r, q, 10)),
        "recall@100": mean(lambda r, q: recall_at_k(r, q, 100)),
        "mrr@10": mean(lambda r, q: mrr_at_k(r, q, 10)),
        "queries": float(n),
    }

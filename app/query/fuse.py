"""Fuse: one score per candidate document from its dense and lexical signals.

Every candidate found by either leg gets both signals exactly (its chunks' and single vector's
cosine similarities, and its BM25 score), so fusion never has to guess a missing rank.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Fusion = Literal["zscore", "convex", "rrf"]
RRF_K = 60


@dataclass
class Candidate:
    document_id: uuid.UUID
    chunk_id: int | None  # the document's chunk most similar to the query
    chunk_sim: float  # that chunk's cosine similarity (-inf when the document has no vector yet)
    document_sim: float | None  # the document's single vector's similarity
    lexical: float = 0.0  # BM25; 0 when no query term occurs in the document
    score: float = 0.0


def dense_score(c: Candidate, document_weight: float) -> float:
    """Best chunk, blended with the document's single vector: the whole and its best part."""
    if c.document_sim is None or not math.isfinite(c.chunk_sim):
        return c.chunk_sim
    return (c.chunk_sim + document_weight * c.document_sim) / (1.0 + document_weight)


def _minmax(values: Sequence[float]) -> list[float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return [0.0] * len(values)
    lo, hi = min(finite), max(finite)
    span = hi - lo
    return [((v - lo) / span if span > 0 else 1.0) if math.isfinite(v) else 0.0 for v in values]


def _zscore(values: Sequence[float]) -> list[float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return [0.0] * len(values)
    mean = sum(finite) / len(finite)
    std = math.sqrt(sum((v - mean) ** 2 for v in finite) / len(finite)) or 1.0
    low = (min(finite) - mean) / std
    return [(v - mean) / std if math.isfinite(v) else low for v in values]


def _ranks(values: Sequence[float]) -> list[int]:
    order = sorted(range(len(values)), key=lambda i: -values[i])
    ranks = [0] * len(values)
    for rank, i in enumerate(order, start=1):
        ranks[i] = rank
    return ranks


def fuse(
    candidates: list[Candidate], *, method: Fusion, dense_weight: float, document_weight: float
) -> list[Candidate]:
    """Candidates sorted by fused score, best first (ties by document id, so results are stable).

    zscore: dense_weight * z(dense) + (1 - dense_weight) * z(BM25), each leg standardised over the
    candidates (mean 0, standard deviation 1), so one outlier does not squash the rest as min-max does.
    convex: the same weighted sum of min-max scaled scores.
    rrf: reciprocal-rank fusion, weighted sum of 1 / (60 + rank) over the two legs' full rankings.
    """
    if not candidates:
        return []
    dense = [dense_score(c, document_weight) for c in candidates]
    lexical = [c.lexical for c in candidates]
    if method == "rrf":
        dr, lr = _ranks(dense), _ranks(lexical)
        for c, a, b, lex in zip(candidates, dr, lr, lexical, strict=True):
            c.score = dense_weight / (RRF_K + a) + ((1 - dense_weight) / (RRF_K + b) if lex > 0 else 0.0)
    else:
        scale = _zscore if method == "zscore" else _minmax
        for c, x, y in zip(candidates, scale(dense), scale(lexical), strict=True):
            c.score = dense_weight * x + (1 - dense_weight) * y
    return sorted(candidates, key=lambda c: (-c.score, str(c.document_id)))


def rank_by(candidates: list[Candidate], key: str, document_weight: float) -> list[Candidate]:
    """Candidates ranked by one leg alone (dense or lexical), its raw score kept as the score."""
    for c in candidates:
        c.score = dense_score(c, document_weight) if key == "dense" else c.lexical
    return sorted(candidates, key=lambda c: (-c.score, str(c.document_id)))

"""Quality gate: compare nDCG@10 of the old and the new space on a labelled set before switching."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from app.config import Settings
from app.embedding import Embedder
from app.eval.beir import load_qrels, load_queries
from app.eval.metrics import evaluate
from app.ingest.store import collection_id
from app.models import EmbeddingModel
from app.query import retrieve


def space_quality(session: Session, settings: Settings, space: EmbeddingModel, embedder: Embedder) -> dict[str, float]:
    """Metrics of one space on the configured evaluation set, ranking documents by their best chunk."""
    assert settings.reindex_eval_dir is not None
    folder = settings.reindex_eval_dir
    qrels = load_qrels(folder, settings.reindex_eval_split)
    queries = load_queries(folder)
    ids = [q for q in qrels if q in queries][: settings.reindex_eval_max_queries]
    cid = collection_id(session, settings.reindex_eval_collection)
    vectors = embedder.encode([queries[q] for q in ids])
    rankings = {}
    for qid, vec in zip(ids, vectors, strict=True):
        hits = retrieve.dense_chunks(
            session,
            space,
            vec,
            cid,
            100,
            filters=None,
            ef_search=settings.hnsw_ef_search,
            max_scan_tuples=settings.hnsw_max_scan_tuples,
        )
        rankings[qid] = [h.external_id for h in hits]
    return evaluate(rankings, {q: qrels[q] for q in ids})


def gate(old: dict[str, float], new: dict[str, float], margin: float) -> dict[str, Any]:
    """The verdict recorded with the job: switch only if the new nDCG@10 is not lower by more than the margin."""
    passed = new["ndcg@10"] >= old["ndcg@10"] - margin
    reason = (
        None
        if passed
        else (
            f"refused: the new space's nDCG@10 {new['ndcg@10']:.4f} is lower than the old space's "
            f"{old['ndcg@10']:.4f} by more than the margin {margin}"
        )
    )
    return {"old": old, "new": new, "margin": margin, "passed": passed, "reason": reason}

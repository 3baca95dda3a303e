"""Retrieval tuning on a labelled BEIR set: every fusion knob scored from one pass over the database.

For each query the script runs the same retrieval functions as the service (app.query.retrieve: the
HNSW dense leg, the BM25 leg for each (k1, b) tried, exact dense signals and BM25 fill-in for every
candidate) once, then scores every combination of fusion method, dense weight and document-vector
weight in memory with app.query.fuse. It prints nDCG@10 and Recall@100 per configuration and a
2-fold cross-validation of the choice (pick on one half of the queries, score on the other), which
shows whether the tuned default generalises or only fits the split.

    DATABASE_URL=... python benchmarks/retrieval_tuning.py --collection beir-scifact --split train

The corpus must already be ingested (`pgsage eval DIR --split train` does that through the service).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from sqlalchemy import text  # noqa: E402

from app.config import Settings  # noqa: E402
from app.db.session import make_engine, make_sessionmaker, session_scope  # noqa: E402
from app.embedding import Embedder, chunker_key  # noqa: E402
from app.eval.beir import load_qrels, load_queries  # noqa: E402
from app.eval.metrics import evaluate  # noqa: E402
from app.ingest.store import collection_id  # noqa: E402
from app.query import retrieve  # noqa: E402
from app.query.fuse import Candidate, fuse, rank_by  # noqa: E402
from app.reindex import spaces  # noqa: E402

DEFAULT_DIR = ROOT.parent / "shared" / "data" / "scifact"
K1B = [(0.9, 0.4), (1.2, 0.75), (1.5, 0.75)]
DENSE_WEIGHTS = [round(0.1 * i, 1) for i in range(2, 9)]
DOC_WEIGHTS = [0.0, 0.5, 1.0]
POOL = 100


def collect(settings: Settings, folder: Path, split: str, collection: str, limit: int | None) -> dict[str, Any]:
    """Per query: the candidates' dense signals and their BM25 under each (k1, b)."""
    engine = make_engine(settings, pool_size=2)
    factory = make_sessionmaker(engine)
    embedder = Embedder(settings)
    qrels = load_qrels(folder, split)
    queries = load_queries(folder)
    ids = [q for q in qrels if q in queries][:limit]
    vectors = embedder.encode([queries[q] for q in ids])
    out: dict[str, Any] = {"queries": {}, "qrels": {q: qrels[q] for q in ids}}
    started = time.perf_counter()
    with session_scope(factory) as session:
        cid = collection_id(session, collection)
        space = spaces.active(session)
        assert space is not None
        for n, (qid, vec) in enumerate(zip(ids, vectors, strict=True), start=1):
            query = queries[qid]
            hits = retrieve.dense_chunks(session, space, vec, cid, POOL * 2, filters=None,
                                         ef_search=settings.hnsw_ef_search,
                                         max_scan_tuples=settings.hnsw_max_scan_tuples)
            found: dict[uuid.UUID, None] = {h.document_id: None for h in hits}
            dense_ids = list(found)
            lexical: dict[tuple[float, float], dict[uuid.UUID, float]] = {}
            for k1, b in K1B:
                ranked = retrieve.lexical_documents(session, query, cid, POOL, k1=k1, b=b)
                lexical[(k1, b)] = dict(ranked)
                found.update((d, None) for d, _ in ranked)
            every = list(found)
            for k1, b in K1B:
                missing = [d for d in every if d not in lexical[(k1, b)]]
                if missing:
                    lexical[(k1, b)].update(retrieve.lexical_documents(session, query, cid, len(missing),
                                                                       k1=k1, b=b, within=missing))
            signals = retrieve.dense_signals(session, space, vec, every, chunker_key(space.params or {}))
            names = dict(session.execute(
                text("SELECT id, external_id FROM documents WHERE id = ANY(:ids)"), {"ids": every}
            ).all())
            base = []
            for d in every:
                sig = signals.get(d)
                if sig is None:
                    continue
                chunk_id, sim = sig.best
                base.append(Candidate(d, chunk_id, sim, sig.document_sim))
            out["queries"][qid] = {"base": base, "lexical": lexical, "names": names, "dense_ids": set(dense_ids),
                                   "lexical_ids": {k: set(list(v)[:POOL]) for k, v in lexical.items()}}
            if n % 100 == 0:
                print(f"  {n}/{len(ids)} queries ({time.perf_counter() - started:.0f}s)", file=sys.stderr)
    engine.dispose()
    return out


def ranking(data: dict[str, Any], qid: str, cfg: dict[str, Any]) -> list[str]:
    q = data["queries"][qid]
    k1b = (cfg["bm25_k1"], cfg["bm25_b"])
    lex = q["lexical"][k1b]
    mode = cfg["mode"]
    # Only candidates the legs of this mode would bring in, as in the service.
    allowed = (q["dense_ids"] if mode != "lexical" else set()) | (q["lexical_ids"][k1b] if mode != "dense" else set())
    cands = [replace(c, lexical=lex.get(c.document_id, 0.0)) for c in q["base"] if c.document_id in allowed]
    if mode == "hybrid":
        ranked = fuse(cands, method=cfg["fusion"], dense_weight=cfg["dense_weight"],
                      document_weight=cfg["document_weight"])
    else:
        ranked = rank_by(cands, mode, cfg["document_weight"])
        if mode == "lexical":
            ranked = [c for c in ranked if c.lexical > 0]
    return [q["names"][c.document_id] for c in ranked[:100]]


def score(data: dict[str, Any], cfg: dict[str, Any], qids: list[str]) -> dict[str, float]:
    return evaluate({q: ranking(data, q, cfg) for q in qids}, {q: data["qrels"][q] for q in qids})


def configs() -> list[dict[str, Any]]:
    out = []
    for k1, b in K1B:
        out.append({"mode": "lexical", "bm25_k1": k1, "bm25_b": b, "fusion": "-", "dense_weight": 0.0,
                    "document_weight": 0.0})
    for w in DOC_WEIGHTS:
        out.append({"mode": "dense", "bm25_k1": 0.9, "bm25_b": 0.4, "fusion": "-", "dense_weight": 1.0,
                    "document_weight": w})
    for (k1, b), dw, w, fusion in itertools.product(K1B, DENSE_WEIGHTS, DOC_WEIGHTS, ["zscore", "convex", "rrf"]):
        out.append({"mode": "hybrid", "bm25_k1": k1, "bm25_b": b, "fusion": fusion, "dense_weight": dw,
                    "document_weight": w})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--split", default="train")
    parser.add_argument("--collection", default="beir-scifact")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "retrieval_tuning.json")
    args = parser.parse_args(argv)
    settings = Settings()
    if not settings.database_url:
        parser.error("set DATABASE_URL to the database holding the ingested collection")

    data = collect(settings, args.dir, args.split, args.collection, args.limit)
    qids = list(data["queries"])
    rows = []
    for cfg in configs():
        rows.append({**cfg, **{k: round(v, 4) for k, v in score(data, cfg, qids).items() if k != "queries"}})
    rows.sort(key=lambda r: -r["ndcg@10"])

    # 2-fold cross-validation of the hybrid choice: tune on one half, report on the other.
    rng = random.Random(20261123)
    shuffled = qids[:]
    rng.shuffle(shuffled)
    halves = [shuffled[: len(qids) // 2], shuffled[len(qids) // 2 :]]
    hybrid = [c for c in configs() if c["mode"] == "hybrid"]
    folds = []
    for tune, test in (halves, halves[::-1]):
        best = max(hybrid, key=lambda c: score(data, c, tune)["ndcg@10"])
        folds.append({"chosen": best, "tuned_ndcg@10": round(score(data, best, tune)["ndcg@10"], 4),
                      "held_out_ndcg@10": round(score(data, best, test)["ndcg@10"], 4)})

    best_by_mode = {m: next(r for r in rows if r["mode"] == m) for m in ("lexical", "dense", "hybrid")}
    print(f"{len(qids)} queries of {args.split}, collection {args.collection}")
    print(f"{'mode':<8}{'fusion':<8}{'k1':>5}{'b':>6}{'w_dense':>9}{'w_doc':>7}{'nDCG@10':>9}{'R@100':>8}")
    shown = rows[:15] + [r for r in rows[15:] if r["mode"] != "hybrid"]
    for r in shown:
        print(f"{r['mode']:<8}{r['fusion']:<8}{r['bm25_k1']:>5}{r['bm25_b']:>6}{r['dense_weight']:>9}"
              f"{r['document_weight']:>7}{r['ndcg@10']:>9.4f}{r['recall@100']:>8.4f}")
    for i, f in enumerate(folds, start=1):
        print(f"fold {i}: tuned on half -> {f['chosen']} nDCG@10 {f['tuned_ndcg@10']}, "
              f"held-out half {f['held_out_ndcg@10']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"split": args.split, "queries": len(qids), "best": best_by_mode,
                                    "folds": folds, "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Embedding backends compared in one run: torch, onnx (onnxruntime, float32), onnx-int8 (dynamic int8).

For each backend (the service's Embedder with PGSAGE_EMBEDDING_BACKEND set; the ONNX files are exported into a
scratch data directory first, and that time is reported apart):

- raw encode rate: chunks/s over SciFact chunks (loaded and chunked as the worker does, embedded under their
  heading paths) with the worker's batch size and threads (torch's default count); the backends take turns
  over the same chunks for several rounds, and each round's ratio to torch is kept, so a machine slowed by
  something else slows every backend of that round alike. The headline is the median ratio.
- query embedding: one question at a time, as the API embeds it (PGSAGE_QUERY_ENCODE_THREADS threads),
  p50/p95 over SciFact queries, the backends taking turns per query.
- retrieval quality, dense and exact (every chunk scored, no index), so that only the vectors differ:
  SciFact train nDCG@10 (a document ranked by its best chunk's cosine) over the whole corpus, and the
  squad-articles dev questions' passage hit@5 (a passage holds a gold answer, SQuAD's normalisation) over the
  48 articles' chunks. Chunks are embedded in batches as the worker does, questions one at a time as the API
  does. Not through `pgsage eval`: three ingests of both sets take longer than this run, and
  the dense leg is where the backends differ; the service's hybrid ranking adds the same BM25 to each.

    python benchmarks/embedding_backends.py                    # everything (about 20 minutes on 2 cores)
    python benchmarks/embedding_backends.py --rate-chunks 256 --no-quality   # speed only

Writes benchmarks/results/embedding_backends.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from app.config import Settings  # noqa: E402
from app.embedding import Embedder  # noqa: E402
from app.eval.beir import load_qrels, load_queries  # noqa: E402
from app.eval.metrics import evaluate  # noqa: E402
from app.eval.qa import load_questions, normalise  # noqa: E402
from app.ingest.chunk import Chunker  # noqa: E402
from app.ingest.load import load_upload  # noqa: E402
from benchmarks.ingest_speed import machine_info  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
BACKENDS = ("torch", "onnx", "onnx-int8")


def chunked(embedder: Embedder, settings: Settings, name: str, data: bytes
            ) -> tuple[list[str], list[str], list[str]]:
    """As the worker makes them: the chunks' embedded texts (under their heading paths), each chunk's document
    id, and the chunks' own texts (what a passage shows)."""
    chunker = Chunker(embedder.tokenizer, embedder.chunk_max_tokens, settings.chunk_overlap_tokens)
    texts, owners, plain = [], [], []
    for doc in load_upload(name, None, data, max(len(data), settings.max_upload_bytes)):
        for c in chunker.split(doc.content, kind=doc.format, title=doc.title):
            texts.append(c.embed_text)
            owners.append(doc.external_id or "")
            plain.append(c.text)
    return texts, owners, plain


def encode_rates(models: dict[str, Embedder], texts: list[str], batch: int, rounds: int) -> dict[str, Any]:
    """Chunks/s of each backend per round (turns over the same texts) and each round's ratio to torch."""
    for m in models.values():
        m.encode(texts[:batch], batch_size=batch)  # warm-up
    seconds: dict[str, list[float]] = {b: [] for b in models}
    for r in range(rounds):
        for backend, m in models.items():
            t = time.perf_counter()
            m.encode(texts, batch_size=batch)
            seconds[backend].append(time.perf_counter() - t)
        print(f"  round {r + 1}: " + ", ".join(f"{b} {len(texts) / s[-1]:.1f}/s" for b, s in seconds.items()),
              flush=True)
    out: dict[str, Any] = {}
    for backend, s in seconds.items():
        ratios = [t / own for t, own in zip(seconds["torch"], s, strict=True)]
        out[backend] = {"chunks_per_s": round(len(texts) / float(np.median(s)), 2),
                        "ratio_to_torch": round(float(np.median(ratios)), 3),
                        "round_ratios": [round(x, 3) for x in ratios]}
    return out


def query_times(models: dict[str, Embedder], queries: list[str]) -> dict[str, Any]:
    """Milliseconds to embed one question, p50/p95, the backends taking turns per question."""
    ms: dict[str, list[float]] = {b: [] for b in models}
    for q in queries[:20]:
        for m in models.values():
            m.encode([q])
    for q in queries:
        for backend, m in models.items():
            t = time.perf_counter()
            m.encode([q])
            ms[backend].append((time.perf_counter() - t) * 1000)
    return {b: {"p50_ms": round(float(np.percentile(v, 50)), 2), "p95_ms": round(float(np.percentile(v, 95)), 2),
                "ratio_to_torch_p50": round(float(np.percentile(ms["torch"], 50) / np.percentile(v, 50)), 3)}
            for b, v in ms.items()}


def one_by_one(m: Embedder, questions: list[str]) -> np.ndarray:
    """Questions embedded as the API embeds them, one at a time: with int8 a vector depends a little on its
    batch-mates (the activations' quantisation scale is per batch), so batching them would flatter nothing
    but differ from the service."""
    return np.stack([m.encode([q])[0] for q in questions])


def scifact_ndcg(vectors: np.ndarray, owners: list[str], qvec: np.ndarray, qids: list[str],
                 qrels: dict[str, dict[str, int]]) -> dict[str, float]:
    """Dense document ranking by best chunk, exact: nDCG@10, Recall@100, MRR@10."""
    docs = sorted(set(owners))
    index = {d: i for i, d in enumerate(docs)}
    col = np.array([index[o] for o in owners])
    rankings = {}
    for qid, row in zip(qids, qvec @ vectors.T, strict=True):
        best = np.full(len(docs), -np.inf, dtype=np.float32)
        np.maximum.at(best, col, row)
        top = np.argsort(-best)[:100]
        rankings[qid] = [docs[i] for i in top]
    return evaluate(rankings, {q: qrels[q] for q in qids})


def passage_hits(vectors: np.ndarray, chunk_texts: list[str], qvec: np.ndarray, answers: list[tuple[str, ...]],
                 k: int = 5) -> dict[str, float]:
    """Passage hit@1 and hit@k over every chunk of the collection, exact."""
    padded = [f" {normalise(t)} " for t in chunk_texts]
    hit1 = hitk = 0
    for row, gold in zip(qvec @ vectors.T, answers, strict=True):
        top = np.argsort(-row)[:k]
        wanted = [f" {g} " for g in map(normalise, gold) if g]
        holds = [any(w in padded[i] for w in wanted) for i in top]
        hit1 += holds[0]
        hitk += any(holds)
    n = len(answers)
    return {"passage_hit@1": round(hit1 / n, 4), f"passage_hit@{k}": round(hitk / n, 4)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scifact", type=Path, default=DATA / "scifact")
    ap.add_argument("--squad", type=Path, default=DATA / "squad-articles")
    ap.add_argument("--rate-chunks", type=int, default=512, help="SciFact chunks per rate round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--no-quality", action="store_true", help="speed only")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "embedding_backends.json")
    args = ap.parse_args(argv)

    import torch

    data_dir = Path(tempfile.mkdtemp(prefix="pgsage-backends-"))
    base = Settings(data_dir=data_dir)
    worker_threads = torch.get_num_threads()
    models: dict[str, Embedder] = {}
    export_s: dict[str, float] = {}
    for backend in BACKENDS:
        t = time.perf_counter()
        models[backend] = Embedder(base.model_copy(update={"embedding_backend": backend}), threads=worker_threads)
        export_s[backend] = round(time.perf_counter() - t, 1)
        spec = models[backend].spec
        print(f"{backend}: loaded (with any export) in {export_s[backend]} s; fingerprint {spec.fingerprint} "
              f"{spec.params}", flush=True)

    texts, owners, _ = chunked(models["torch"], base, "corpus.jsonl", (args.scifact / "corpus.jsonl").read_bytes())
    sample = texts[: args.rate_chunks]
    print(f"raw encode: {len(sample)} SciFact chunks x {args.rounds} rounds, batch {base.embedding_batch_size}, "
          f"{worker_threads} threads", flush=True)
    rates = encode_rates(models, sample, base.embedding_batch_size, args.rounds)

    queries_all = load_queries(args.scifact)
    qids = [q for q in load_qrels(args.scifact, "train") if q in queries_all]
    single = [queries_all[q] for q in qids[: args.queries]]
    query_threads = base.query_encode_threads
    print(f"query embedding: {len(single)} questions one at a time, {query_threads} thread(s)", flush=True)
    torch.set_num_threads(query_threads)
    query_models = {"torch": models["torch"]} | {
        b: Embedder(base.model_copy(update={"embedding_backend": b}), threads=query_threads) for b in BACKENDS[1:]}
    queries = query_times(query_models, single)
    del query_models
    torch.set_num_threads(worker_threads)

    quality: dict[str, dict[str, float]] = {b: {} for b in BACKENDS}
    full_rate: dict[str, float] = {}
    if not args.no_quality:
        qrels = load_qrels(args.scifact, "train")
        questions = load_questions(args.squad / "questions-dev.jsonl")
        squad_texts: list[str] = []
        squad_plain: list[str] = []
        for path in sorted((args.squad / "corpus").iterdir()):
            embedded, _, plain = chunked(models["torch"], base, path.name, path.read_bytes())
            squad_texts.extend(embedded)
            squad_plain.extend(plain)
        print(f"quality: {len(texts)} SciFact chunks, {len(qids)} train queries; {len(squad_texts)} squad-articles "
              f"chunks, {len(questions)} questions", flush=True)
        for backend, m in models.items():
            t = time.perf_counter()
            vectors = m.encode(texts)
            full_rate[backend] = round(len(texts) / (time.perf_counter() - t), 2)
            qvec = one_by_one(m, [queries_all[q] for q in qids])
            scores = scifact_ndcg(vectors, owners, qvec, qids, qrels)
            quality[backend]["scifact_ndcg@10"] = round(scores["ndcg@10"], 4)
            quality[backend]["scifact_recall@100"] = round(scores["recall@100"], 4)
            svec = m.encode(squad_texts)
            qv = one_by_one(m, [q.question for q in questions])
            quality[backend].update(passage_hits(svec, squad_plain, qv, [q.answers for q in questions]))
            print(f"  {backend}: {quality[backend]} (whole SciFact corpus at {full_rate[backend]} chunks/s)",
                  flush=True)

    rows = []
    for b in BACKENDS:
        q = quality[b]
        rows.append({"backend": b, **rates[b], "query": queries[b], "quality": q,
                     "full_corpus_chunks_per_s": full_rate.get(b), "load_seconds": export_s[b],
                     "params": models[b].spec.params, "fingerprint": models[b].spec.fingerprint})
    header = (f"{'backend':<10} {'chunks/s':>9} {'x torch':>8} {'query p50':>10} {'x torch':>8} "
              f"{'SciFact nDCG@10':>16} {'squad hit@5':>12} {'hit@1':>7}")
    print("\n" + header)
    for r in rows:
        q = r["quality"]
        print(f"{r['backend']:<10} {r['chunks_per_s']:>9.1f} {r['ratio_to_torch']:>8.2f} "
              f"{r['query']['p50_ms']:>8.2f}ms {r['query']['ratio_to_torch_p50']:>8.2f} "
              f"{q.get('scifact_ndcg@10', float('nan')):>16.4f} {q.get('passage_hit@5', float('nan')):>12.4f} "
              f"{q.get('passage_hit@1', float('nan')):>7.4f}")
    if not args.no_quality:
        t, i8 = quality["torch"], quality["onnx-int8"]
        d_ndcg = i8["scifact_ndcg@10"] - t["scifact_ndcg@10"]
        d_hit = i8["passage_hit@5"] - t["passage_hit@5"]
        ok = abs(d_ndcg) <= 0.005 and abs(d_hit) <= 0.005
        print(f"\nonnx-int8 vs torch: nDCG@10 {d_ndcg:+.4f}, hit@5 {d_hit:+.4f}: "
              f"{'within' if ok else 'NOT within'} 0.005 on both")
    result = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine_info(),
              "command": "python benchmarks/embedding_backends.py " + " ".join(argv or sys.argv[1:]),
              "rate_chunks": len(sample), "rounds": args.rounds, "batch_size": base.embedding_batch_size,
              "worker_threads": worker_threads, "query_threads": query_threads, "queries": len(single),
              "quality_method": "dense, exact (every chunk scored); SciFact documents by best chunk",
              "backends": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Passage ranking variants on a question set, computed exactly in memory from the service's own pieces.

The corpus is loaded and chunked by pgsage's loader and chunker, embedded by its embedder (heading path
and text, as the worker does), and analysed by Postgres's English text-search configuration (the one
the service indexes with); every chunk of the collection is then scored for every question by each
signal (chunk cosine, chunk BM25, the document's vector, the document's BM25), and the fusion variants
are compared by passage hit@1/hit@5 and document@1 (definitions: shared/data/squad-articles/README.md).
The service itself computes the same signals over its HNSW and BM25 candidates; `pgsage eval --qa`
checks the chosen defaults end to end.

    python benchmarks/passage_tuning.py                     # squad-articles dev questions
    python benchmarks/passage_tuning.py --folds 2           # weights chosen on one half, scored on the other

Needs a Postgres (any, pgvector not needed) at --analyser-url for to_tsvector.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from app.config import Settings  # noqa: E402
from app.embedding import Embedder  # noqa: E402
from app.eval.qa import holds, load_questions  # noqa: E402
from app.ingest.chunk import Chunker  # noqa: E402
from app.ingest.load import load_upload  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "squad-articles"


def lexemes(url: str, texts: list[str]) -> list[Counter[str]]:
    """Term frequencies of each text by Postgres's English analyser."""
    import psycopg

    out: list[Counter[str]] = []
    with psycopg.connect(url) as conn:
        for i in range(0, len(texts), 500):
            rows = conn.execute(
                "SELECT t.ord, l.lexeme, coalesce(array_length(l.positions, 1), 1) "
                "FROM unnest(%s::text[]) WITH ORDINALITY AS t(txt, ord), "
                "unnest(to_tsvector('pg_catalog.english', t.txt)) l",
                (texts[i : i + 500],),
            ).fetchall()
            part: list[Counter[str]] = [Counter() for _ in texts[i : i + 500]]
            for ordinal, lexeme, tf in rows:
                part[ordinal - 1][lexeme] = tf
            out.extend(part)
    return out


def bm25_matrix(queries: list[Counter[str]], docs: list[Counter[str]], k1: float, b: float) -> np.ndarray:
    """BM25 (Lucene IDF) of every query against every document; query terms counted once."""
    n = len(docs)
    lengths = np.array([sum(d.values()) for d in docs], dtype=np.float64)
    avgdl = max(lengths.mean(), 1.0)
    df: Counter[str] = Counter()
    for d in docs:
        df.update(d.keys())
    postings: dict[str, list[tuple[int, int]]] = {}
    for j, d in enumerate(docs):
        for term, tf in d.items():
            postings.setdefault(term, []).append((j, tf))
    scores = np.zeros((len(queries), n))
    norm = k1 * (1 - b + b * lengths / avgdl)
    for i, q in enumerate(queries):
        for term in q:
            if term not in postings:
                continue
            idf = math.log(1 + (n - df[term] + 0.5) / (df[term] + 0.5))
            for j, tf in postings[term]:
                scores[i, j] += idf * tf * (k1 + 1) / (tf + norm[j])
    return scores


def zscore(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Standardise each row over its candidates (mask); non-candidates get the row's minimum."""
    masked = np.where(mask, x, np.nan)
    mean = np.nanmean(masked, axis=1, keepdims=True)
    std = np.nanstd(masked, axis=1, keepdims=True)
    std[std == 0] = 1.0
    z = (x - mean) / std
    low = np.nanmin(np.where(mask, z, np.nan), axis=1, keepdims=True)
    return np.where(mask, z, low)


def prepare(args: argparse.Namespace) -> dict[str, Any]:
    cache = Path(args.cache)
    settings = Settings()
    embedder = Embedder(settings)
    chunker = Chunker(embedder.tokenizer, embedder.chunk_max_tokens, settings.chunk_overlap_tokens)
    chunks: list[dict[str, Any]] = []
    doc_names: list[str] = []
    doc_texts: list[str] = []
    for path in sorted(Path(args.corpus).iterdir()):
        [doc] = load_upload(path.name, None, path.read_bytes(), 1 << 30)
        doc_names.append(path.name)
        doc_texts.append(doc.content)
        for c in chunker.split(doc.content, kind=doc.format, title=doc.title):
            chunks.append({"doc": len(doc_names) - 1, "text": c.text, "embed": c.embed_text,
                           "path": " ".join(c.heading_path)})
    questions = load_questions(Path(args.questions))
    key = f"{len(chunks)}-{sum(len(c['embed']) for c in chunks)}-{len(questions)}"
    vec_file = cache / f"vectors-{key}.npz"
    if vec_file.exists():
        saved = np.load(vec_file)
        cvec, qvec = saved["chunks"], saved["questions"]
    else:
        print(f"embedding {len(chunks)} chunks and {len(questions)} questions...", file=sys.stderr)
        cvec = embedder.encode([c["embed"] for c in chunks])
        qvec = embedder.encode([q.question for q in questions])
        cache.mkdir(parents=True, exist_ok=True)
        np.savez(vec_file, chunks=cvec, questions=qvec)
    doc_of = np.array([c["doc"] for c in chunks])
    dvec = np.stack([cvec[doc_of == d].mean(axis=0) for d in range(len(doc_names))])
    dvec /= np.linalg.norm(dvec, axis=1, keepdims=True)
    chunk_terms = lexemes(args.analyser_url, [c["path"] + " " + c["text"] for c in chunks])
    # Document terms: its chunks' text once each (the service takes them from the content between chunks).
    doc_terms = lexemes(args.analyser_url, doc_texts)
    q_terms = lexemes(args.analyser_url, [q.question for q in questions])
    return {"chunks": chunks, "doc_names": doc_names, "questions": questions, "cvec": cvec, "qvec": qvec,
            "dvec": dvec, "doc_of": doc_of, "chunk_terms": chunk_terms, "doc_terms": doc_terms, "q_terms": q_terms}


def evaluate(data: dict[str, Any], score: np.ndarray, rows: np.ndarray) -> dict[str, float]:
    chunks, questions, doc_of, names = data["chunks"], data["questions"], data["doc_of"], data["doc_names"]
    hit1 = hit5 = doc1 = 0
    for i in rows:
        order = np.argsort(-score[i])[:5]
        q = questions[i]
        found = [holds(chunks[j]["text"], q.answers) for j in order]
        hit1 += found[0]
        hit5 += any(found)
        doc1 += names[doc_of[order[0]]] == q.document
    n = len(rows)
    return {"hit@1": round(hit1 / n, 4), "hit@5": round(hit5 / n, 4), "document@1": round(doc1 / n, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default=str(DATA / "corpus"))
    parser.add_argument("--questions", default=str(DATA / "questions-dev.jsonl"))
    parser.add_argument("--analyser-url", default=os.environ.get("ANALYSER_URL", "postgresql://postgres@127.0.0.1/postgres"))
    parser.add_argument("--cache", default=str(ROOT / ".pgsage" / "bench-cache"))
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--folds", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "passage_tuning.json"))
    args = parser.parse_args()
    data = prepare(args)
    qv, cv, dv, doc_of = data["qvec"], data["cvec"], data["dvec"], data["doc_of"]
    cos = qv @ cv.T
    dcos = (qv @ dv.T)[:, doc_of]
    results: list[dict[str, Any]] = []
    all_rows = np.arange(len(data["questions"]))
    n_cand = args.candidates

    def candidates(*legs: np.ndarray) -> np.ndarray:
        mask = np.zeros_like(legs[0], dtype=bool)
        for leg in legs:
            top = np.argpartition(-leg, min(n_cand, leg.shape[1] - 1), axis=1)[:, :n_cand]
            np.put_along_axis(mask, top, True, axis=1)
        return mask

    def record(name: str, params: dict[str, Any], score: np.ndarray) -> None:
        row = {"variant": name, **params, **evaluate(data, score, all_rows)}
        results.append(row)
        print(json.dumps(row), flush=True)

    record("dense chunk cosine", {}, cos)
    bm25_cache: dict[tuple[float, float, str], np.ndarray] = {}

    def bm25(k1: float, b: float, level: str) -> np.ndarray:
        if (k1, b, level) not in bm25_cache:
            docs = data["chunk_terms"] if level == "chunk" else data["doc_terms"]
            m = bm25_matrix(data["q_terms"], docs, k1, b)
            bm25_cache[(k1, b, level)] = m if level == "chunk" else m[:, doc_of]
        return bm25_cache[(k1, b, level)]

    for k1, b in [(0.9, 0.4), (1.2, 0.75), (1.5, 0.75)]:
        record("BM25 chunks", {"k1": k1, "b": b}, bm25(k1, b, "chunk"))
    lex = bm25(0.9, 0.4, "chunk")
    dlex = bm25(0.9, 0.4, "document")
    mask = candidates(cos, lex)
    z_cos, z_lex = zscore(cos, mask), zscore(lex, mask)
    z_dcos, z_dlex = zscore(dcos, mask), zscore(dlex, mask)
    ranks = {}
    for name, m in (("cos", cos), ("lex", lex)):
        order = np.argsort(-np.where(mask, m, -np.inf), axis=1)
        r = np.empty_like(order)
        np.put_along_axis(r, order, np.arange(order.shape[1])[None, :].repeat(order.shape[0], 0), axis=1)
        ranks[name] = r + 1
    record("RRF chunks (k=60)", {}, 1 / (60 + ranks["cos"]) + 1 / (60 + ranks["lex"]))
    grid = []
    for a, w, bd in itertools.product([0.3, 0.4, 0.5, 0.6], [0.0, 0.25, 0.5, 0.75, 1.0], [0.0, 0.5, 1.0]):
        score = a * z_cos + (1 - a) * z_lex + w * (bd * z_dcos + (1 - bd) * z_dlex)
        params = {"dense_weight": a, "document_weight": w, "document_dense_share": bd}
        grid.append((params, score))
        record("zscore chunks + document", params, score)
    if args.folds > 1:
        rng = np.random.default_rng(7)
        docs = sorted({q.document for q in data["questions"]})
        rng.shuffle(docs)
        for f in range(args.folds):
            held = set(docs[f :: args.folds])
            test = np.array([i for i, q in enumerate(data["questions"]) if q.document in held])
            train = np.array([i for i, q in enumerate(data["questions"]) if q.document not in held])
            best = max(grid, key=lambda g: (lambda e: e["hit@1"] + e["hit@5"])(evaluate(data, g[1], train)))
            row = {"variant": f"fold {f}: chosen on other articles", **best[0], **evaluate(data, best[1], test)}
            results.append(row)
            print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()

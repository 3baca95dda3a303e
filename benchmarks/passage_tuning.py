"""Passage ranking and answer variants on a question set, computed exactly in memory from the service's pieces.

The corpus is loaded and chunked by pgsage's loader and chunker, embedded by its embedder (chunks and
quotable sentences under their heading paths, as the worker does), and analysed by Postgres's English
text-search configuration (the one the service indexes with). Every chunk is then scored for every
question by each signal: chunk cosine, chunk BM25, the document's vector and BM25, the chunk's best
sentence. Ranking variants are compared by passage hit@1/@5 and document@1, answer variants (which
sentences the extractive answer quotes) by answer holds and mean words, with the definitions of
shared/data/squad-articles/README.md. The service computes the same signals over its HNSW and BM25
candidates; `pgsage eval DIR --qa FILE` checks the chosen defaults end to end.

    python benchmarks/passage_tuning.py            # squad-articles dev questions
    python benchmarks/passage_tuning.py --folds 2  # weights chosen on half the articles, scored on the rest

Needs a Postgres (pgvector not needed) at --analyser-url for to_tsvector. Embeddings are cached
under --cache, keyed by the chunks' and questions' texts.
"""

from __future__ import annotations

import argparse
import hashlib
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
from app.eval.qa import load_questions, normalise  # noqa: E402
from app.ingest.chunk import Chunker  # noqa: E402
from app.ingest.load import load_upload  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "squad-articles"


def lexemes(url: str, texts: list[str]) -> list[Counter[str]]:
    """Term frequencies of each text by Postgres's English analyser."""
    import psycopg

    out: list[Counter[str]] = []
    with psycopg.connect(url) as conn:
        for i in range(0, len(texts), 500):
            part: list[Counter[str]] = [Counter() for _ in texts[i : i + 500]]
            rows = conn.execute(
                "SELECT t.ord, l.lexeme, coalesce(array_length(l.positions, 1), 1) "
                "FROM unnest(%s::text[]) WITH ORDINALITY AS t(txt, ord), "
                "unnest(to_tsvector('pg_catalog.english', t.txt)) l",
                (texts[i : i + 500],),
            ).fetchall()
            for ordinal, lexeme, tf in rows:
                part[ordinal - 1][lexeme] = tf
            out.extend(part)
    return out


def bm25_matrix(queries: list[Counter[str]], docs: list[Counter[str]], k1: float, b: float) -> np.ndarray:
    """BM25 (Lucene IDF) of every query against every document; query terms counted once."""
    lengths = np.array([sum(d.values()) for d in docs], dtype=np.float64)
    norm = k1 * (1 - b + b * lengths / max(lengths.mean(), 1.0))
    postings: dict[str, list[tuple[int, int]]] = {}
    for j, d in enumerate(docs):
        for term, tf in d.items():
            postings.setdefault(term, []).append((j, tf))
    scores = np.zeros((len(queries), len(docs)))
    for i, q in enumerate(queries):
        for term in q:
            if term in postings:
                idf = math.log(1 + (len(docs) - len(postings[term]) + 0.5) / (len(postings[term]) + 0.5))
                for j, tf in postings[term]:
                    scores[i, j] += idf * tf * (k1 + 1) / (tf + norm[j])
    return scores


def zscore(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Standardise each row over its candidates (mask); others get the row's lowest candidate value."""
    masked = np.where(mask, x, np.nan)
    std = np.nanstd(masked, axis=1, keepdims=True)
    z = (x - np.nanmean(masked, axis=1, keepdims=True)) / np.where(std == 0, 1.0, std)
    return np.where(mask, z, np.nanmin(np.where(mask, z, np.nan), axis=1, keepdims=True))


def _embed(embedder: Embedder, texts: list[str], cache: Path, what: str) -> np.ndarray:
    key = hashlib.sha256("\n\x00".join(texts).encode()).hexdigest()[:16]
    path = cache / f"{what}-{key}.npy"
    if path.exists():
        return np.load(path)
    print(f"embedding {len(texts)} {what}...", file=sys.stderr, flush=True)
    vectors = embedder.encode(texts)
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path, vectors)
    return vectors


class Corpus:
    """The corpus as the service stores it, every signal of every chunk for every question, and the gold."""

    def __init__(self, args: argparse.Namespace) -> None:
        settings = Settings()
        embedder = Embedder(settings)
        chunker = Chunker(embedder.tokenizer, embedder.chunk_max_tokens, settings.chunk_overlap_tokens)
        self.questions = load_questions(Path(args.questions))
        names, doc_texts, chunks = [], [], []
        for path in sorted(Path(args.corpus).iterdir()):
            [doc] = load_upload(path.name, None, path.read_bytes(), 1 << 30)
            names.append(path.name)
            doc_texts.append(doc.content)
            chunks.extend((len(names) - 1, c) for c in chunker.split(doc.content, kind=doc.format, title=doc.title))
        self.doc_of = np.array([d for d, _ in chunks])
        self.texts = [c.text for _, c in chunks]
        sentences = [(j, c.text[s:e], t) for j, (_, c) in enumerate(chunks)
                     for (s, e), t in zip(c.sentences, c.sentence_texts, strict=True)]
        self.sentence_chunk = np.array([j for j, _, _ in sentences])
        self.sentences = [s for _, s, _ in sentences]
        cache = Path(args.cache)
        cvec = _embed(embedder, [c.embed_text for _, c in chunks], cache, "chunks")
        svec = _embed(embedder, [t for _, _, t in sentences], cache, "sentences")
        qvec = _embed(embedder, [q.question for q in self.questions], cache, "questions")
        dvec = np.stack([cvec[self.doc_of == d].mean(axis=0) for d in range(len(names))])
        dvec /= np.linalg.norm(dvec, axis=1, keepdims=True)
        self.cos = qvec @ cvec.T
        self.doc_cos = (qvec @ dvec.T)[:, self.doc_of]
        self.sentence_cos = qvec @ svec.T
        # A chunk's best sentence; a chunk without a quotable sentence counts its own cosine.
        best = np.full_like(self.cos, -np.inf)
        np.maximum.at(best.T, self.sentence_chunk, self.sentence_cos.T)
        self.best_sentence = np.where(np.isfinite(best), best, self.cos)
        url = args.analyser_url
        self.chunk_terms = lexemes(url, [" ".join(c.heading_path) + " " + c.text for _, c in chunks])
        self.doc_terms = lexemes(url, doc_texts)
        self.q_terms = lexemes(url, [q.question for q in self.questions])
        self.sentence_terms = lexemes(url, self.sentences)
        self.qdoc = np.array([names.index(q.document) for q in self.questions])
        gold = [[" " + normalise(a) + " " for a in q.answers if normalise(a)] for q in self.questions]
        padded = [" " + normalise(t) + " " for t in self.texts]
        self.holds = np.array([[any(a in t for a in g) for t in padded] for g in gold])
        self._bm25: dict[tuple[float, float, str], np.ndarray] = {}

    def bm25(self, k1: float, b: float, level: str) -> np.ndarray:
        if (k1, b, level) not in self._bm25:
            m = bm25_matrix(self.q_terms, self.chunk_terms if level == "chunk" else self.doc_terms, k1, b)
            self._bm25[(k1, b, level)] = m if level == "chunk" else m[:, self.doc_of]
        return self._bm25[(k1, b, level)]

    def passages(self, score: np.ndarray, rows: np.ndarray) -> dict[str, float]:
        top = np.argsort(-score[rows], axis=1)[:, :5]
        hit = np.take_along_axis(self.holds[rows], top, axis=1)
        return {"hit@1": round(float(hit[:, 0].mean()), 4), "hit@5": round(float(hit.any(axis=1).mean()), 4),
                "document@1": round(float((self.doc_of[top[:, 0]] == self.qdoc[rows]).mean()), 4)}


def candidates(n: int, *legs: np.ndarray) -> np.ndarray:
    mask = np.zeros_like(legs[0], dtype=bool)
    for leg in legs:
        np.put_along_axis(mask, np.argpartition(-leg, n, axis=1)[:, :n], True, axis=1)
    return mask


def fused(c: Corpus, n: int, k1: float, b: float, dense: float, document: float, sentence: float) -> np.ndarray:
    """The service's passage score (app/query/retrieve.py passage_ranking) over the union of both legs' top n."""
    lex = c.bm25(k1, b, "chunk")
    mask = candidates(n, c.cos, lex)
    score = dense * zscore(c.cos, mask) + (1 - dense) * zscore(lex, mask)
    if document:
        score += document * (dense * zscore(c.doc_cos, mask) + (1 - dense) * zscore(c.bm25(k1, b, "document"), mask))
    if sentence:
        score += sentence * zscore(c.best_sentence, mask)
    return np.where(mask, score, -np.inf)


def answers(c: Corpus, score: np.ndarray, overlap_w: float, passage_w: float, max_words: int, margin: float,
            max_sentences: int) -> dict[str, float]:
    """The extractive answer (app/query/answer.py) from the top 5 passages: holds and mean words."""
    df: Counter[str] = Counter()
    for terms in c.chunk_terms:
        df.update(terms.keys())
    n = len(c.chunk_terms)
    top = np.argsort(-score, axis=1)[:, :5]
    by_chunk: dict[int, list[int]] = {}
    for k, j in enumerate(c.sentence_chunk):
        by_chunk.setdefault(int(j), []).append(k)
    words = np.array([len(s.split()) for s in c.sentences])
    padded = [" " + normalise(s) + " " for s in c.sentences]
    held = total = 0
    for i, q in enumerate(c.questions):
        idf = {t: math.log(1 + (n - df[t] + 0.5) / (df[t] + 0.5)) for t in c.q_terms[i]}
        ids = [k for j in top[i] for k in by_chunk.get(int(j), [])]
        if not ids:
            continue
        overlap = np.array([sum(v for t, v in idf.items() if t in c.sentence_terms[k]) for k in ids])
        passage = np.array([score[i, c.sentence_chunk[k]] for k in ids]) - score[i, top[i, 0]]
        s = c.sentence_cos[i, ids] + overlap_w * overlap / (overlap.max() or 1.0) + passage_w * passage
        order = np.argsort(-s)
        chosen = [ids[order[0]]]
        for o in order[1:max_sentences]:
            if s[o] < s[order[0]] - margin or words[chosen].sum() + words[ids[o]] > max_words:
                break
            chosen.append(ids[o])
        gold = [" " + normalise(a) + " " for a in q.answers if normalise(a)]
        held += any(g in " ".join(padded[k] for k in chosen) for g in gold)
        total += int(words[chosen].sum())
    return {"answer_holds": round(held / len(c.questions), 4), "mean_answer_words": round(total / len(c.questions), 1)}


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
    c = Corpus(args)
    rows = np.arange(len(c.questions))
    results: list[dict[str, Any]] = []

    def record(variant: str, score: np.ndarray, **params: Any) -> None:
        row = {"variant": variant, **params, **c.passages(score, rows)}
        results.append(row)
        print(json.dumps(row), flush=True)

    record("dense: chunk cosine", c.cos)
    record("dense: best sentence", c.best_sentence)
    for k1, b in [(0.9, 0.4), (1.2, 0.75), (0.6, 0.3)]:
        record("BM25 over chunks (heading path + text)", c.bm25(k1, b, "chunk"), k1=k1, b=b)
    lex = c.bm25(0.9, 0.4, "chunk")
    mask = candidates(args.candidates, c.cos, lex)
    ranks = [np.argsort(np.argsort(-np.where(mask, m, -np.inf), axis=1), axis=1) + 1 for m in (c.cos, lex)]
    record("RRF of chunk cosine and chunk BM25 (k=60)", 1 / (60 + ranks[0]) + 1 / (60 + ranks[1]))
    grid = list(itertools.product([0.2, 0.35, 0.5], [0.0, 0.25, 0.5], [0.0, 0.5, 1.0, 1.5]))
    scores = {}
    for dense, document, sentence in grid:
        scores[(dense, document, sentence)] = s = fused(c, args.candidates, 0.9, 0.4, dense, document, sentence)
        record("zscore fusion", s, dense_weight=dense, document_weight=document, sentence_weight=sentence)
    default = scores[(0.35, 0.25, 1.0)]
    for max_sentences, max_words, margin in [(1, 45, 0.0), (2, 45, 0.2), (2, 45, 9.0), (2, 60, 0.2)]:
        row = {"variant": "extractive answer over the default ranking", "max_sentences": max_sentences,
               "max_words": max_words, "margin": margin,
               **answers(c, default, 0.2, 0.1, max_words, margin, max_sentences)}
        results.append(row)
        print(json.dumps(row), flush=True)
    if args.folds > 1:
        docs = sorted(set(c.qdoc.tolist()))
        np.random.default_rng(7).shuffle(docs)
        for f in range(args.folds):
            held = set(docs[f :: args.folds])
            test = np.array([i for i in rows if c.qdoc[i] in held])
            train = np.array([i for i in rows if c.qdoc[i] not in held])
            best = max(scores, key=lambda key: sum(v for k, v in c.passages(scores[key], train).items()
                                                 if k.startswith("hit")))
            row = {"variant": f"fold {f}: weights chosen on the other articles", "chosen": best,
                   **c.passages(scores[best], test), "default_on_this_fold": c.passages(default, test)}
            results.append(row)
            print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()

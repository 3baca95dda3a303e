"""Lexical leg at scale: what impact-ordered postings with a per-term cut would buy (issue 14, point 2), measured.

The passage BM25 statement scores every posting of every query term, so its cost follows the collection. The
candidate replacement reads, for each query term, only its M postings of highest impact through an index ordered
by impact, and scores the passages found from those postings alone; a term's postings past its top M add
nothing (they are bounded by its M-th impact). This script measures that against the exact statement on a
collection that `benchmarks/scale.py --keep DIR` left behind, before any of it goes into the service:

- the index: (collection, chunk set, term, impact DESC) INCLUDE (chunk, tf, length), impact being BM25's
  term-frequency part tf / (tf + k1 (1 - b + b len / avgdl)) with the collection's avgdl at build time; its
  build time and size beside the postings' own primary key;
- per M: p50 / p95 of the pruned statement against the exact one (`retrieve.passage_lexical`), and how many of
  the exact top 10 and top 100 passages it returns.

    python benchmarks/scale.py --sizes 10000 100000 --keep /tmp/scale-keep
    python benchmarks/lexical_pruning.py --keep /tmp/scale-keep
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sqlalchemy import text  # noqa: E402

from app.config import Settings  # noqa: E402
from app.db.session import make_engine, make_sessionmaker, session_scope  # noqa: E402
from app.embedded import embedded_database_url  # noqa: E402
from app.query import retrieve  # noqa: E402
from benchmarks.scale import COLLECTION, questions  # noqa: E402

K1, B = 1.2, 0.75
INDEX = "ix_chunk_postings_impact_bench"


def _impact(avgdl: float) -> str:
    return f"(tf::float8 / (tf + {K1} * (1 - {B} + {B} * chunk_length / {avgdl:.4f})))"


# The query's terms, the chunk set's statistics and each term's IDF, as the service's lexical statement has them.
_HEAD = f"""WITH terms AS (
            SELECT DISTINCT lexeme AS term FROM unnest(to_tsvector('{retrieve.TEXT_SEARCH_CONFIG}', :q))
        ), stats AS ({retrieve._size(":ck")}
        ), idf AS (
            SELECT t.term, {retrieve._idf(retrieve._df(":ck", "t.term"))} AS idf FROM terms t CROSS JOIN stats s
        ), """


def pruned(session: Any, query: str, cid: int, chunker: str, n: int, m: int, avgdl: float) -> list[int]:
    """The n best passages from each query term's m highest-impact postings (scored from those alone)."""
    rows = session.execute(text(f"""
        {_HEAD}p AS (
            SELECT i.term, x.chunk_id, x.tf, x.chunk_length
              FROM idf i CROSS JOIN LATERAL (
                   SELECT chunk_id, tf, chunk_length FROM chunk_postings
                    WHERE collection_id = :cid AND chunker = :ck AND term = i.term
                    ORDER BY {_impact(avgdl)} DESC LIMIT {int(m)}) x
        )
        SELECT p.chunk_id FROM p JOIN idf i ON i.term = p.term CROSS JOIN stats s
         GROUP BY p.chunk_id
         ORDER BY {retrieve._bm25('chunk_length')} DESC, p.chunk_id
         LIMIT {int(n)}"""), {"q": query, "cid": cid, "ck": chunker, "k1": K1, "b": B}).scalars().all()
    return list(rows)


def rescored(session: Any, query: str, cid: int, chunker: str, n: int, m: int, avgdl: float) -> list[int]:
    """The n best passages among those in some term's m highest-impact postings, each scored exactly (all its
    postings of the query terms, one index probe per passage and term)."""
    rows = session.execute(text(f"""
        {_HEAD}cand AS MATERIALIZED (
            SELECT DISTINCT x.chunk_id
              FROM idf i CROSS JOIN LATERAL (
                   SELECT chunk_id FROM chunk_postings
                    WHERE collection_id = :cid AND chunker = :ck AND term = i.term
                    ORDER BY {_impact(avgdl)} DESC LIMIT {int(m)}) x
        ), p AS (
            SELECT i.term, y.chunk_id, y.tf, y.chunk_length
              FROM cand c CROSS JOIN idf i CROSS JOIN LATERAL (
                   SELECT chunk_id, tf, chunk_length FROM chunk_postings
                    WHERE collection_id = :cid AND chunker = :ck AND term = i.term AND chunk_id = c.chunk_id
                   OFFSET 0) y
        )
        SELECT p.chunk_id FROM p JOIN idf i ON i.term = p.term CROSS JOIN stats s
         GROUP BY p.chunk_id
         ORDER BY {retrieve._bm25('chunk_length')} DESC, p.chunk_id
         LIMIT {int(n)}"""), {"q": query, "cid": cid, "ck": chunker, "k1": K1, "b": B}).scalars().all()
    return list(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=Path, required=True, help="the directory scale.py --keep built")
    parser.add_argument("--cuts", type=int, nargs="+", default=[200, 1000, 5000])
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--drop-index", action="store_true", help="drop the index after the run")
    args = parser.parse_args(argv)
    settings = Settings(database_url=embedded_database_url(args.keep))
    engine = make_engine(settings, pool_size=1)
    factory = make_sessionmaker(engine)
    with session_scope(factory) as session:
        cid = session.execute(text("SELECT id FROM collections WHERE name = :n"), {"n": COLLECTION}).scalar_one()
        chunker = session.execute(text("SELECT chunker FROM chunks WHERE collection_id = :c LIMIT 1"),
                                  {"c": cid}).scalar_one()
        n_items, total = session.execute(text("SELECT n, total FROM lexical_size WHERE collection_id = :c AND "
                                              "scope = :ck"), {"c": cid, "ck": chunker}).one()
        chunks = session.execute(text("SELECT count(*) FROM chunks WHERE collection_id = :c"), {"c": cid}).scalar_one()
    avgdl = float(total) / float(n_items)
    print(f"collection '{COLLECTION}': {chunks} chunks, avgdl {avgdl:.1f} terms", flush=True)
    t = time.perf_counter()
    with engine.connect() as conn:
        auto = conn.execution_options(isolation_level="AUTOCOMMIT")
        auto.execute(text(f"CREATE INDEX IF NOT EXISTS {INDEX} ON chunk_postings (collection_id, chunker, term, "
                          f"{_impact(avgdl)} DESC) INCLUDE (chunk_id, tf, chunk_length)"))
        auto.execute(text("ANALYZE chunk_postings"))
    build_s = time.perf_counter() - t
    with session_scope(factory) as session:
        sizes = {name: session.execute(text("SELECT pg_relation_size(CAST(:n AS regclass))"), {"n": name}).scalar_one()
                 for name in (INDEX, "pk_chunk_postings", "chunk_postings")}
    print(f"impact index: {sizes[INDEX] / 2**20:.0f} MiB in {build_s:.0f} s (postings' primary key "
          f"{sizes['pk_chunk_postings'] / 2**20:.0f} MiB, table {sizes['chunk_postings'] / 2**20:.0f} MiB)", flush=True)
    qs = questions(args.queries)
    exact: list[list[int]] = []
    for q in qs:  # warm the pages both statements read
        with session_scope(factory) as session:
            retrieve.passage_lexical(session, q, cid, chunker, 100, k1=K1, b=B, documents=False)
            for m in args.cuts:
                pruned(session, q, cid, chunker, 100, m, avgdl)
                rescored(session, q, cid, chunker, 100, m, avgdl)
    times: list[float] = []
    for q in qs:
        with session_scope(factory) as session:
            t = time.perf_counter()
            leg = retrieve.passage_lexical(session, q, cid, chunker, 100, k1=K1, b=B, documents=False)
            times.append((time.perf_counter() - t) * 1000)
        exact.append(leg.chunks)
    times.sort()
    print(f"{'statement':<30} {'p50 ms':>8} {'p95 ms':>8} {'top 10 kept':>12} {'top 100 kept':>13}")
    print(f"{'exact (every posting)':<30} {statistics.median(times):>8.1f} {times[int(0.95 * len(times))]:>8.1f} "
          f"{1.0:>12.3f} {1.0:>13.3f}")
    for name, fn, m in [("top {} per term", pruned, m) for m in args.cuts] + [
            ("top {} per term, rescored", rescored, m) for m in args.cuts]:
        label = name.format(m)
        times, kept10, kept100 = [], [], []
        for q, truth in zip(qs, exact, strict=True):
            with session_scope(factory) as session:
                t = time.perf_counter()
                got = fn(session, q, cid, chunker, 100, m, avgdl)
                times.append((time.perf_counter() - t) * 1000)
            if truth:
                kept10.append(len(set(truth[:10]) & set(got[:10])) / min(10, len(truth)))
                kept100.append(len(set(truth) & set(got)) / len(truth))
        times.sort()
        print(f"{label:<30} {statistics.median(times):>8.1f} "
              f"{times[int(0.95 * len(times))]:>8.1f} {statistics.fmean(kept10):>12.3f} "
              f"{statistics.fmean(kept100):>13.3f}")
    if args.drop_index:
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(text(f"DROP INDEX {INDEX}"))
    engine.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Lexical leg at scale: the bounded passage statement against the one that scores every posting (issue 14, point 2).

On a collection scale.py built and kept (`--keep DIR`), brought to the current migrations first (the impact index
of migration 0009 is built if missing, and its build time printed), over real questions (scale.questions): the
service's passage lexical leg as a search calls it (retrieve.passage_lexical: each term's best postings first,
the first k passages exact unless PGSAGE_LEXICAL_MAX_DEPTH stops it, n candidates) against the same statement
over every posting of every query term.
Prints p50/p95 of each, whether the first k agree (scores, up to ties), how much of the n candidates agree, and
how deep the bounded statement had to read.

    python benchmarks/lexical_bounded.py --keep /work/scale-keep
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sqlalchemy import text  # noqa: E402

from app.config import Settings  # noqa: E402
from app.db.session import make_engine, make_sessionmaker, session_scope  # noqa: E402
from app.embedded import embedded_database_url, stop_embedded_database  # noqa: E402
from app.query import retrieve  # noqa: E402
from benchmarks.scale import COLLECTION, K, questions  # noqa: E402
from tests.fixtures.services import migrate  # noqa: E402

N = 100  # the candidates a search asks the lexical leg for (PGSAGE_SEARCH_CANDIDATES)


def _summary(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {"p50_ms": round(statistics.median(times), 2),
            "p95_ms": round(ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))], 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=Path, required=True, help="the directory scale.py --keep built")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--out", type=Path, default=None, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    url = embedded_database_url(args.keep)
    try:
        t = time.perf_counter()
        migrate(url)  # builds the impact index on a collection kept from before it
        migrate_s = time.perf_counter() - t
        settings = Settings(database_url=url)
        k1, b = settings.bm25_k1, settings.bm25_b
        engine = make_engine(settings, pool_size=1)
        factory = make_sessionmaker(engine)
        with session_scope(factory) as session:
            cid = session.execute(text("SELECT id FROM collections WHERE name = :n"), {"n": COLLECTION}).scalar_one()
            chunker = session.execute(text("SELECT chunker FROM chunks WHERE collection_id = :c LIMIT 1"),
                                      {"c": cid}).scalar_one()
            chunks = session.execute(text("SELECT count(*) FROM chunks WHERE collection_id = :c"),
                                     {"c": cid}).scalar_one()
            sizes = {name: session.execute(text("SELECT pg_relation_size(CAST(:n AS regclass))"),
                                           {"n": name}).scalar_one()
                     for name in ("ix_chunk_postings_impact", "pk_chunk_postings", "chunk_postings")}
        mib = {name: round(size / 2**20) for name, size in sizes.items()}
        print(f"'{COLLECTION}': {chunks} chunks; migrations {migrate_s:.0f} s; impact index "
              f"{mib['ix_chunk_postings_impact']} MiB (postings' key {mib['pk_chunk_postings']} MiB, table "
              f"{mib['chunk_postings']} MiB)", flush=True)
        qs = questions(args.queries)

        def bounded(session: Any, q: str) -> retrieve.LexicalLeg:
            return retrieve.passage_lexical(session, q, cid, chunker, N, k1=k1, b=b, exact=K,
                                            max_depth=settings.lexical_max_depth)

        def full(session: Any, q: str) -> retrieve.LexicalLeg:
            return retrieve._passage_lexical(session, q, cid, chunker, N, k1=k1, b=b, filters=None, documents=True,
                                             depth=None, exact=N)[0]

        for q in qs:  # warm the pages both read
            with session_scope(factory) as session:
                bounded(session, q)
                full(session, q)
        legs: dict[str, list[retrieve.LexicalLeg]] = {"bounded": [], "full": []}
        times: dict[str, list[float]] = {"bounded": [], "full": []}
        for name, fn in (("full", full), ("bounded", bounded), ("full", full), ("bounded", bounded)):
            for q in qs:  # each twice, interleaved by block, the second pass kept
                with session_scope(factory) as session:
                    t = time.perf_counter()
                    leg = fn(session, q)
                    elapsed = (time.perf_counter() - t) * 1000
                if len(legs[name]) == len(qs):
                    legs[name], times[name] = [], []
                legs[name].append(leg)
                times[name].append(elapsed)
        head_agree, overlap = 0, []
        for mine, theirs in zip(legs["bounded"], legs["full"], strict=True):
            cut = theirs.scores[K - 1] * (1 + 1e-9) if len(theirs.scores) >= K else -1.0
            same_scores = all(abs(x - y) <= 1e-9 * max(1.0, abs(y)) for x, y in zip(mine.scores[:K], theirs.scores[:K],
                                                                                  strict=False))
            head_agree += same_scores and len(mine.scores[:K]) == len(theirs.scores[:K]) and (
                {c for c, v in zip(mine.chunks, mine.scores, strict=True) if v > cut}
                == {c for c, v in zip(theirs.chunks, theirs.scores, strict=True) if v > cut})
            if theirs.chunks:
                overlap.append(len(set(mine.chunks) & set(theirs.chunks)) / len(theirs.chunks))
        depths = Counter(str(leg.depth or "all") for leg in legs["bounded"])
        result = {"chunks": chunks, "queries": len(qs), "k": K, "n": N, "migrate_s": round(migrate_s, 1),
                  "impact_index_mib": round(sizes["ix_chunk_postings_impact"] / 2**20, 1),
                  "full": _summary(times["full"]), "bounded": _summary(times["bounded"]),
                  "first_k_exact": round(head_agree / len(qs), 4),
                  "candidates_overlap": round(statistics.fmean(overlap), 4) if overlap else None,
                  "depths": dict(depths), "max_depth": settings.lexical_max_depth,
                  "stopped_at_max_depth": sum(not leg.exact for leg in legs["bounded"])}
        print(json.dumps(result))
        print(f"every posting: p50 {result['full']['p50_ms']} ms, p95 {result['full']['p95_ms']} ms")
        print(f"bounded:       p50 {result['bounded']['p50_ms']} ms, p95 {result['bounded']['p95_ms']} ms; first {K} "
              f"exact for {result['first_k_exact']:.0%} of questions, {N} candidates overlap "
              f"{result['candidates_overlap']}, depth read per term {dict(depths)} "
              f"(limit {settings.lexical_max_depth}; {result['stopped_at_max_depth']} stopped there unproven)")
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")
        engine.dispose()
    finally:
        stop_embedded_database(args.keep)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

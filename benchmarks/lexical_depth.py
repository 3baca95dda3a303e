"""The lexical leg's depth (PGSAGE_LEXICAL_DEPTH, issue 14 point 2): what reading only each query term's best
postings costs in ranking, and what it saves in time, on a collection `benchmarks/scale.py --keep DIR` left.

For each depth (0 = every posting, the exact BM25 top n), over real questions (SciFact and SQuAD-articles, as
scale.py asks them), in interleaved blocks, warm:
- the lexical leg alone (`retrieve.passage_lexical`, the top 100 passages the ranking gets as candidates): p50 /
  p95, and how many of the exact top 10 and top 100 it returns;
- hybrid search through the service's pipeline (query embedding cached, so excluded): p50 / p95, and how many of
  the exact-leg hybrid search's first 10 passages it returns (the ranking scores every candidate exactly, so a
  lexical passage the cut leg misses matters only where it would have ranked).

    python benchmarks/scale.py --sizes 100000 --keep /work/k100
    python benchmarks/lexical_depth.py --keep /work/k100 --depths 0 250 1000 4000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sqlalchemy import text  # noqa: E402

from app.db.session import session_scope  # noqa: E402
from app.embedded import embedded_database_url, stop_embedded_database  # noqa: E402
from app.embedding import chunker_key  # noqa: E402
from app.query import retrieve  # noqa: E402
from app.query.pipeline import QueryPipeline, SearchRequest  # noqa: E402
from benchmarks.ingest_speed import machine_info  # noqa: E402
from benchmarks.scale import COLLECTION, open_collection, questions  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "lexical_depth.json"
N, K = 100, 10


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return round(s[min(len(s) - 1, int(q * len(s)))], 2)


def _kept(truth: list[int], got: list[int]) -> float | None:
    return len(set(truth) & set(got)) / len(truth) if truth else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=Path, required=True, help="the directory scale.py --keep built")
    parser.add_argument("--depths", type=int, nargs="+", default=[0, 250, 1000, 4000])
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", "/tmp")) / "pgsage")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    depths = [0] + [d for d in args.depths if d != 0]
    with contextlib.ExitStack() as stack:
        db_url = embedded_database_url(args.keep)
        stack.callback(stop_embedded_database, args.keep)
        settings, _engine, factory, embedders, space, cid = open_collection(stack, db_url, args.cache, 2)
        chunker = chunker_key(space.params or {})
        with session_scope(factory) as session:
            chunks = session.execute(text("SELECT count(*) FROM chunks WHERE collection_id = :c"),
                                     {"c": cid}).scalar_one()
        print(f"collection '{COLLECTION}': {chunks} chunks", flush=True)
        pipelines = {d: QueryPipeline(replace_depth(settings, d), embedders, None) for d in depths}
        qs = questions(args.queries)
        k1, b = settings.bm25_k1, settings.bm25_b

        def leg(session: Any, q: str, depth: int) -> retrieve.LexicalLeg:
            return retrieve.passage_lexical(session, q, cid, chunker, N, k1=k1, b=b, depth=depth)

        def hybrid(q: str, depth: int) -> list[int]:
            with session_scope(factory) as session:
                found = pipelines[depth].search(session, SearchRequest(q, K, COLLECTION, group="passage"))
            return [h.chunk_id for h in found.hits]

        # Warm-up: every query's vector into each pipeline's cache, and the pages each statement reads.
        legs: dict[tuple[str, int], list[int]] = {}
        searches: dict[tuple[str, int], list[int]] = {}
        cut_terms = dict.fromkeys(depths, 0)
        for q in qs:
            for d in depths:
                with session_scope(factory) as session:
                    got = leg(session, q, d)
                legs[q, d] = got.chunks
                cut_terms[d] += len(got.cut)
                searches[q, d] = hybrid(q, d)
        times: dict[tuple[str, int], list[float]] = {(m, d): [] for m in ("lexical", "hybrid") for d in depths}
        for block in range(0, len(qs), 10):  # interleaved: each block of questions at every depth in turn
            for d in depths:
                for q in qs[block:block + 10]:
                    with session_scope(factory) as session:
                        t = time.perf_counter()
                        leg(session, q, d)
                        times["lexical", d].append((time.perf_counter() - t) * 1000)
                    t = time.perf_counter()
                    hybrid(q, d)
                    times["hybrid", d].append((time.perf_counter() - t) * 1000)
        rows = []
        for d in depths:
            kept10 = [x for q in qs if (x := _kept(legs[q, 0][:10], legs[q, d][:10])) is not None]
            kept100 = [x for q in qs if (x := _kept(legs[q, 0], legs[q, d])) is not None]
            same = [x for q in qs if (x := _kept(searches[q, 0], searches[q, d])) is not None]
            rows.append({
                "depth": d,
                "lexical": {"p50_ms": _pct(times["lexical", d], 0.5), "p95_ms": _pct(times["lexical", d], 0.95)},
                "hybrid": {"p50_ms": _pct(times["hybrid", d], 0.5), "p95_ms": _pct(times["hybrid", d], 0.95)},
                "exact_top10_kept": round(statistics.fmean(kept10), 4),
                "exact_top100_kept": round(statistics.fmean(kept100), 4),
                "hybrid_top10_kept": round(statistics.fmean(same), 4),
                "cut_terms_per_question": round(cut_terms[d] / len(qs), 2),
            })
    print(f"{'depth':>6} {'lexical p50/p95 ms':>20} {'hybrid p50/p95 ms':>19} {'top10 kept':>11} "
          f"{'top100 kept':>12} {'hybrid top10 kept':>18} {'terms cut':>10}")
    for r in rows:
        print(f"{r['depth'] or 'all':>6} {r['lexical']['p50_ms']:>10}/{r['lexical']['p95_ms']:<9} "
              f"{r['hybrid']['p50_ms']:>9}/{r['hybrid']['p95_ms']:<9} {r['exact_top10_kept']:>11} "
              f"{r['exact_top100_kept']:>12} {r['hybrid_top10_kept']:>18} {r['cut_terms_per_question']:>10}")
    result = {"when": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine_info(),
              "chunks": chunks, "queries": len(qs), "n": N, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def replace_depth(settings: Any, depth: int) -> Any:
    return settings.model_copy(update={"lexical_depth": depth})


if __name__ == "__main__":
    raise SystemExit(main())

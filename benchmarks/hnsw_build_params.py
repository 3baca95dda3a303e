"""HNSW build parameters at scale: rebuild a kept collection's index with another ef_construction, measure recall@10.

On a collection scale.py built and kept (`--keep DIR`): the exact top 10 of 100 real questions (scale.questions)
by a sequential scan, then the space's HNSW index dropped and built again with m 16 and the given
ef_construction (in memory: PGSAGE_HNSW_BUILD_MEMORY), its build time and size, and the dense leg's recall@10 and
latency at several ef_search values. The kept collection keeps the rebuilt index.

    python benchmarks/hnsw_build_params.py --keep /work/scale-keep --ef-construction 128
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sqlalchemy import text  # noqa: E402

from app.config import Settings  # noqa: E402
from app.db.session import make_engine, make_sessionmaker, session_scope  # noqa: E402
from app.embedded import embedded_database_url, stop_embedded_database  # noqa: E402
from app.embedding import EmbedderPool  # noqa: E402
from app.query import retrieve  # noqa: E402
from app.reindex import spaces  # noqa: E402
from benchmarks.hnsw_recall import measure_recall  # noqa: E402
from benchmarks.scale import COLLECTION, K, questions  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=Path, required=True, help="the directory scale.py --keep built")
    parser.add_argument("--ef-construction", type=int, required=True)
    parser.add_argument("--ef-search", type=int, nargs="+", default=[100, 200, 400])
    parser.add_argument("--queries", type=int, default=100)
    args = parser.parse_args(argv)
    url = embedded_database_url(args.keep)
    try:
        settings = Settings(database_url=url)
        engine = make_engine(settings, pool_size=1)
        factory = make_sessionmaker(engine)
        with session_scope(factory) as session:
            space = spaces.active(session)
            assert space is not None
            session.expunge(space)
            cid = session.execute(text("SELECT id FROM collections WHERE name = :n"), {"n": COLLECTION}).scalar_one()
        vectors = EmbedderPool(settings).configured.encode(questions(args.queries), batch_size=1)
        dim, mid = int(space.dimension), int(space.id)
        truths = []
        with session_scope(factory) as session:
            session.execute(text("SET LOCAL enable_indexscan = off"))
            session.execute(text("SET LOCAL enable_bitmapscan = off"))
            for vec in vectors:
                truths.append(set(session.execute(text(
                    f"SELECT chunk_id FROM chunk_vectors WHERE model_id = {mid} AND collection_id = :c "
                    f"ORDER BY (embedding::vector({dim})) <=> CAST(:q AS vector({dim})) LIMIT {K}"),
                    {"c": cid, "q": retrieve.vector_literal(vec)}).scalars().all()))
        name = spaces.index_name("chunk_vectors", mid)
        ddl = spaces.index_statement("chunk_vectors", mid, dim, space.index_type,
                                     graph=spaces.HnswGraph(ef_construction=int(args.ef_construction)))
        with engine.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            spaces.build_memory(conn, settings.hnsw_build_memory)
            conn.execute(text(f"DROP INDEX IF EXISTS {name}"))
            t = time.perf_counter()
            conn.execute(text(ddl))
            build_s = time.perf_counter() - t
            size = conn.execute(text("SELECT pg_relation_size(CAST(:n AS regclass))"), {"n": name}).scalar_one()
        print(f"ef_construction {args.ef_construction}: built in {build_s:.0f} s, {size / 2**20:.0f} MiB", flush=True)
        for ef in args.ef_search:
            measure_recall(factory, space, vectors, truths, cid, ef, settings.hnsw_max_scan_tuples)  # warm
            recalls, times = measure_recall(factory, space, vectors, truths, cid, ef, settings.hnsw_max_scan_tuples)
            times.sort()
            print(f"ef_search {ef}: recall@10 {statistics.fmean(recalls):.3f}, dense leg p50 "
                  f"{statistics.median(times):.2f} ms, p95 {times[round(0.95 * (len(times) - 1))]:.2f} ms", flush=True)
        engine.dispose()
    finally:
        stop_embedded_database(args.keep)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

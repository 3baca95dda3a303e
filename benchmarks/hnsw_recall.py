"""HNSW recall: the share of the exact top-10 chunks that the HNSW index returns, per query, averaged.

For every query of a BEIR split, the service's own dense search (app.query.retrieve.dense_chunks,
through the active space's partial HNSW index, at the configured ef_search unless --ef-search is
given) is compared with an exact scan of the same rows (index scans turned off, so Postgres computes
every distance and sorts). Recall@10 = |HNSW top 10 ∩ exact top 10| / 10.

    DATABASE_URL=... python benchmarks/hnsw_recall.py --collection beir-scifact --split train

The corpus must already be ingested (`pgsage eval DIR --split train` does that through the service).
Target: at least 0.98 at the default ef_search.

With --index-types vector halfvec, each index type is measured in turn: an index of the type the space does not
have is built beside its own for the run (the same partial expression index a space of that type gets, same
HNSW parameters) and dropped after; the table gives each index's size on disk beside its recall.
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
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from sqlalchemy import text  # noqa: E402

from app.config import Settings  # noqa: E402
from app.db.session import make_engine, make_sessionmaker, session_scope  # noqa: E402
from app.embedding import Embedder  # noqa: E402
from app.eval.beir import load_qrels, load_queries  # noqa: E402
from app.ingest.store import collection_id  # noqa: E402
from app.query import retrieve  # noqa: E402
from app.reindex import spaces  # noqa: E402

DEFAULT_DIR = ROOT.parent / "shared" / "data" / "scifact"
TARGET = 0.98
K = 10


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--split", default="train")
    parser.add_argument("--collection", default="beir-scifact")
    parser.add_argument("--ef-search", type=int, nargs="*", default=None,
                        help="ef_search values to measure (default: the configured one)")
    parser.add_argument("--index-types", nargs="*", default=None, choices=["vector", "halfvec"],
                        help="HNSW index types to compare (default: the space's own)")
    args = parser.parse_args(argv)
    settings = Settings()
    if not settings.database_url:
        parser.error("set DATABASE_URL to the database holding the ingested collection")
    efs = args.ef_search or [settings.hnsw_ef_search]

    engine = make_engine(settings, pool_size=1)
    factory = make_sessionmaker(engine)
    embedder = Embedder(settings)
    qrels = load_qrels(args.dir, args.split)
    queries = load_queries(args.dir)
    ids = [q for q in qrels if q in queries]
    vectors = embedder.encode([queries[q] for q in ids])
    with session_scope(factory) as session:
        cid = collection_id(session, args.collection)
        space = spaces.active(session)
        assert space is not None, "no active embedding space"
        dim, mid = int(space.dimension), int(space.id)
        exact: list[set[int]] = []
        started = time.perf_counter()
        for vec in vectors:
            session.execute(text("SET LOCAL enable_indexscan = off"))
            session.execute(text("SET LOCAL enable_bitmapscan = off"))
            rows = session.execute(text(f"""
                SELECT chunk_id FROM chunk_vectors
                 WHERE model_id = {mid} AND collection_id = :c
                 ORDER BY (embedding::vector({dim})) <=> CAST(:q AS vector({dim})) LIMIT {K}"""),
                {"c": cid, "q": retrieve.vector_literal(vec)}).scalars().all()
            exact.append(set(rows))
            session.execute(text("RESET enable_indexscan"))
            session.execute(text("RESET enable_bitmapscan"))
        exact_s = time.perf_counter() - started
        space = as_index_type(space, space.index_type)  # a plain copy: usable after this session ends
        print(f"{len(ids)} queries of {args.split}; exact scans {exact_s / len(ids) * 1000:.1f} ms each; "
              f"space {mid} ({space.name}, {dim} dims)")
    ok = True
    for kind in args.index_types or [space.index_type]:
        name = spaces.index_name("chunk_vectors", mid)
        if kind != space.index_type:  # built beside the space's own for this run, under another name
            name = f"{name}_{kind}"
            ddl = spaces.index_statement("chunk_vectors", mid, dim, kind, graph=spaces.HnswGraph.of(settings),
                                         name=name)
            started = time.perf_counter()
            with engine.connect() as conn:
                conn.execution_options(isolation_level="AUTOCOMMIT").execute(text(ddl))
            print(f"built {name} in {time.perf_counter() - started:.1f} s")
        with session_scope(factory) as session:
            size = session.execute(text("SELECT pg_relation_size(CAST(:n AS regclass))"), {"n": name}).scalar_one()
        print(f"{kind}: index {name}, {size / 2**20:.1f} MiB")
        shown = as_index_type(space, kind)
        for ef in efs:
            recalls, times = measure_recall(factory, shown, vectors, exact, cid, ef, settings.hnsw_max_scan_tuples)
            recall = statistics.fmean(recalls)
            perfect = sum(1 for r in recalls if r == 1.0)
            print(f"  ef_search {ef:>4}: recall@10 {recall:.4f} ({perfect}/{len(recalls)} queries perfect), "
                  f"HNSW query {statistics.median(times):.1f} ms median")
            if ef == settings.hnsw_ef_search and kind == space.index_type:
                ok = recall >= TARGET
                print(f"  default ef_search {ef}: {'OK' if ok else 'BELOW'} (target >= {TARGET})")
        if kind != space.index_type:
            with engine.connect() as conn:
                conn.execution_options(isolation_level="AUTOCOMMIT").execute(text(f"DROP INDEX IF EXISTS {name}"))
    engine.dispose()
    return 0 if ok else 1


def measure_recall(factory: Any, space: Any, vectors: Any, truths: list[set[int]], cid: int, ef: int,
                   max_scan_tuples: int) -> tuple[list[float], list[float]]:
    """Per query: the dense leg's recall@K against its exact top K, and its time in ms, at this ef_search.

    In a transaction of its own: a query sets ef_search for its transaction only when it differs from the
    connection's default, so a value set earlier in the same transaction would stay in force for the default's turn.
    """
    recalls, times = [], []
    with session_scope(factory) as session:
        for vec, truth in zip(vectors, truths, strict=True):
            t0 = time.perf_counter()
            hits = retrieve.dense_chunks(session, space, vec, cid, K, filters=None, ef_search=ef,
                                         max_scan_tuples=max_scan_tuples)
            times.append((time.perf_counter() - t0) * 1000)
            recalls.append(len(truth & {h.chunk_id for h in hits}) / K)
    return recalls, times


def as_index_type(space: Any, kind: str) -> Any:
    """The space as the query path sees it, with its HNSW index in `kind` (not written back)."""
    from app.models import EmbeddingModel

    return EmbeddingModel(id=space.id, name=space.name, dimension=space.dimension,
                          params={**(space.params or {}), "index_type": kind})


if __name__ == "__main__":
    raise SystemExit(main())

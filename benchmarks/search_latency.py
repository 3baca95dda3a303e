"""Search and ask latency at SciFact scale, as multiples of one query embedding, measured in one run.

Acceptance (issue 13): with the default embedding backend, hybrid search p50 at most 1.5 query embeddings and
ask p50 at most 3; dense and lexical search reported beside them.

1. A fresh database, the API (uvicorn, one process) and one Celery worker (ingest_speed.py's helpers).
2. The SciFact corpus (5,183 abstracts) uploaded as one JSONL file, untimed.
3. This process loads the same embedding model with the same Settings (app.embedding.Embedder).
4. Over a seeded sample of SciFact queries, after warm-up, in blocks of --block queries: the block's query
   embeddings here, then its POST /v1/search in hybrid, dense and lexical mode, then its POST /v1/ask, each
   request answered before the next starts (qa_latency.py says why blocks). The API keeps recent query
   vectors, so each mode and the ask get queries of their own (disjoint samples): no measured request is
   served from that cache, every one embeds its query.
5. In the same blocks, the floor under any search: GET /v1/me (an authenticated request that reads the key and
   answers: the HTTP, auth and connection cost every request pays) and the bare dense leg run from this process
   (`retrieve.dense_chunks`: one HNSW walk for the top k at the default ef_search, one round trip). One query
   embedding plus those two is the least a search can take; it is reported as a multiple of the embedding too.

    python benchmarks/search_latency.py                  # 100 queries per measurement after 10 of warm-up
    python benchmarks/search_latency.py --queries 30     # a quick check
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import httpx
import ingest_speed as bench
from qa_latency import _post, _summary

from app.config import Settings
from tests.fixtures.services import WorkerProcess, migrate, postgres_server, scratch_database

DATA = bench.ROOT.parent / "shared" / "data" / "scifact"
DEFAULT_OUT = bench.ROOT / "benchmarks" / "results" / "search_latency.json"
COLLECTION = "scifact"
MEASURES = ("hybrid", "dense", "lexical", "ask")
FLOOR = ("http_auth", "hnsw_walk")  # the floor's parts, besides the query embedding
TARGETS = {"hybrid": 1.5, "ask": 3.0}  # at most this many query embeddings (p50 over p50)


@contextlib.contextmanager
def _bare_walk(db_url: str, settings: Settings, collection: str, k: int) -> Iterator[Callable[[Any], float]]:
    """A function timing (ms) the dense leg alone for a query vector: one HNSW walk, one round trip."""
    from app.db.session import make_engine, make_sessionmaker, session_scope
    from app.ingest import store
    from app.query import retrieve
    from app.reindex import spaces

    engine = make_engine(settings, pool_size=1, url=db_url)
    factory = make_sessionmaker(engine)
    with session_scope(factory) as session:
        space = spaces.active(session)
        cid = store.collection_id(session, collection, create=False)
        session.expunge(space)

    def walk(vector: Any) -> float:
        with session_scope(factory) as session:
            t = time.perf_counter()
            retrieve.dense_chunks(session, space, vector, cid, k, filters=None, ef_search=settings.hnsw_ef_search,
                                  max_scan_tuples=settings.hnsw_max_scan_tuples)
            return (time.perf_counter() - t) * 1000

    try:
        yield walk
    finally:
        engine.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=DATA / "corpus.jsonl")
    parser.add_argument("--queries-file", type=Path, default=DATA / "queries.jsonl")
    parser.add_argument("--queries", type=int, default=100, help="queries measured per search mode and for ask")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--block", type=int, default=10)
    parser.add_argument("--limit", type=int, default=None, help="only the corpus's first N documents")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", bench.DEFAULT_REDIS))
    args = parser.parse_args(argv)

    os.chdir(bench.ROOT)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    queries = [json.loads(line)["text"] for line in args.queries_file.read_text().splitlines() if line.strip()]
    needed = args.warmup + args.queries * len(MEASURES)
    if len(queries) < needed:
        raise SystemExit(f"{len(queries)} queries in the file; {needed} needed")
    chosen = random.Random(args.seed).sample(queries, needed)
    warmup = chosen[: args.warmup]
    # Distinct queries for each measurement, so no request is answered from the API's query-vector cache.
    per = {name: chosen[args.warmup + i * args.queries : args.warmup + (i + 1) * args.queries]
           for i, name in enumerate(MEASURES)}
    embed_queries = [q for name in MEASURES for q in per[name]]

    logs = Path(os.environ.get("TMPDIR", "/tmp")) / f"pgsage-search-bench-{uuid.uuid4().hex[:6]}"
    logs.mkdir(parents=True)
    queue = f"pgsage-bench-{uuid.uuid4().hex[:8]}"
    times: dict[str, list[float]] = {"embed": [], **{name: [] for name in (*MEASURES, *FLOOR)}}
    with contextlib.ExitStack() as stack:
        print("starting Postgres, the API and a worker ...", flush=True)
        server = stack.enter_context(postgres_server())
        db_url = stack.enter_context(scratch_database(server))
        migrate(db_url)
        key = bench.admin_key(db_url, "search_latency benchmark")
        env = {**os.environ, "PGSAGE_DATABASE_URL": db_url, "PGSAGE_REDIS_URL": args.redis_url,
               "PGSAGE_QUEUE_NAME": queue, "PGSAGE_DATA_DIR": str(logs / "data"), "PGSAGE_WORKER_CONCURRENCY": "1"}
        stack.callback(bench._drop_queue, args.redis_url, queue)
        base, api_pid = stack.enter_context(bench.api_server(env, logs / "api.log"))
        worker = WorkerProcess(env, logs / "worker.log")
        stack.callback(bench._worker_stop, worker)
        worker.start(timeout=300)
        bench.wait_ready(base, logs / "api.log")
        assert worker.proc is not None
        with httpx.Client(base_url=base, timeout=300, headers=bench.auth(key)) as client:
            print(f"ingesting {args.corpus} (untimed) ...", flush=True)
            data = bench.read_corpus(args.corpus, args.limit)
            job, _, _ = bench._ingest(client, "corpus.jsonl", data, COLLECTION, worker, logs)
            if job["failed"]:
                raise RuntimeError(f"{job['failed']} documents failed to index: {job['errors'][:3]}")
            have = next(c for c in client.get("/v1/collections").json() if c["name"] == COLLECTION)
            print(f"{have['indexed']} documents indexed, {have['chunks']} chunks", flush=True)
            worker.stop()  # idle from here on; its process must not share the cores with the measurement

            settings = Settings()
            from app.embedding import Embedder

            embedder = Embedder(settings)
            walk = stack.enter_context(_bare_walk(db_url, settings, COLLECTION, args.k))

            def request(name: str, query: str) -> float:
                if name == "ask":
                    ms, _ = _post(client, "/v1/ask", {"question": query, "collection": COLLECTION, "k": 5})
                else:
                    ms, _ = _post(client, "/v1/search", {"query": query, "collection": COLLECTION, "k": args.k,
                                                         "mode": name})
                return ms

            print(f"warming up on {len(warmup)} queries ...", flush=True)
            for q in warmup:
                embedder.encode([q])
                for name in MEASURES:
                    request(name, f"{q} ({name})")  # variants: the measured queries stay new to the API
            print(f"measuring {args.queries} queries per measurement ...", flush=True)
            with bench.CpuWindow({"api": api_pid}) as cpu:
                for start in range(0, args.queries, args.block):
                    for q in embed_queries[start * len(MEASURES) : (start + args.block) * len(MEASURES)]:
                        t = time.perf_counter()
                        vector = embedder.encode([q])[0]
                        times["embed"].append((time.perf_counter() - t) * 1000)
                        times["hnsw_walk"].append(walk(vector))
                        t = time.perf_counter()
                        client.get("/v1/me").raise_for_status()
                        times["http_auth"].append((time.perf_counter() - t) * 1000)
                    for name in MEASURES:
                        for q in per[name][start : start + args.block]:
                            times[name].append(request(name, q))

    raw = {name: _summary(values) for name, values in times.items() if values}
    embed = raw["embed"]["p50"]
    ratios = {name: {"p50": round(raw[name]["p50"] / embed, 3), "p95": round(raw[name]["p95"] / embed, 3)}
              for name in MEASURES}
    met = {name: ratios[name]["p50"] <= target for name, target in TARGETS.items()}
    floor = {name: round(raw[name]["p50"] / embed, 3) for name in FLOOR}
    floor["search"] = round(1 + sum(floor[name] for name in FLOOR), 3)
    report = {
        "benchmark": "search_latency",
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": bench.machine_info(),
        "corpus": str(args.corpus),
        "documents": have["indexed"],
        "chunks": have["chunks"],
        "queries_per_measurement": args.queries,
        "embedding_model": settings.embedding_model,
        "embedding_backend": getattr(settings, "embedding_backend", "torch"),
        "latency_ms": {name: {k: round(v, 2) for k, v in s.items()} for name, s in raw.items()},
        "ratio_to_embed_p50": ratios,
        "floor_ratio_to_embed_p50": floor,
        "target_ratio_p50": TARGETS,
        "meets_target": met,
        "cpu": cpu.result,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    machine = report["machine"]
    print()
    print(f"machine   {machine['nproc']} CPUs ({machine['cpu_model']}); machine busy {cpu.result['machine_busy_pct']}%")
    print(f"corpus    {have['indexed']} documents, {have['chunks']} chunks; {args.queries} queries per measurement")
    print(f"embed     p50 {raw['embed']['p50']:7.1f} ms   p95 {raw['embed']['p95']:7.1f} ms   (one query embedding)")
    for name in MEASURES:
        line = (f"{name:<9} p50 {raw[name]['p50']:7.1f} ms   p95 {raw[name]['p95']:7.1f} ms   "
                f"= {ratios[name]['p50']:.2f} / {ratios[name]['p95']:.2f} embeddings")
        if name in TARGETS:
            line += f"   (p50 target <= {TARGETS[name]:g}: {'OK' if met[name] else 'NOT MET'})"
        print(line)
    print(f"floor     one embedding + an authenticated request (/v1/me, p50 {raw['http_auth']['p50']:.1f} ms) + a bare "
          f"HNSW walk (p50 {raw['hnsw_walk']['p50']:.1f} ms) = {floor['search']:.2f} embeddings")
    print(f"result    {args.out}")
    return 0 if all(met.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())

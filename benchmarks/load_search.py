"""Search under load while ingestion runs: a fixed request rate from a second process, for 60 s.

1. A fresh database, the API (uvicorn, one process) and one Celery worker, as in production.
2. The first --seed documents of SciFact are ingested (untimed) so there is something to search.
3. The rest of the corpus is uploaded into a second collection; the worker is busy embedding it
   (both CPU cores) for the whole measured window.
4. A separate process sends POST /v1/search (SciFact train queries in turn, k=10, default hybrid
   mode) at a fixed rate, open loop: request i is due at t0 + i/rate whatever happened before, and
   its latency is counted from when it was due, so a slow server cannot hide queueing (no
   coordinated omission). It records throughput, p50/p95/p99 latency and every error.

    python benchmarks/load_search.py                      # 20 req/s for 60 s
    python benchmarks/load_search.py --rate 30 --seconds 30

Target: at least 20 searches/s for 60 s with zero errors while ingestion runs; p95 recorded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import httpx
import ingest_speed as bench

from tests.fixtures.services import WorkerProcess, migrate, postgres_server, scratch_database

DEFAULT_OUT = bench.ROOT / "benchmarks" / "results" / "load_search.json"
QUERIES = bench.ROOT.parent / "shared" / "data" / "scifact" / "queries.jsonl"


def _drive(base: str, key: str, collection: str, queries: list[str], rate: float, seconds: float,
           out: Any) -> None:
    """The load generator (runs in its own process): open-loop requests at a fixed rate, with API key `key`."""
    total = int(rate * seconds)
    results: list[tuple[float, int, str]] = []  # (latency ms from due time, status, error)
    with httpx.Client(base_url=base, timeout=30, limits=httpx.Limits(max_connections=64),
                      headers=bench.auth(key)) as client:

        def one(i: int, due: float) -> tuple[float, int, str]:
            try:
                r = client.post("/v1/search", json={"query": queries[i % len(queries)], "k": 10,
                                                    "collection": collection})
                err = "" if r.status_code == 200 and r.json()["results"] else f"{r.status_code}: {r.text[:200]}"
                return (time.perf_counter() - due) * 1000, r.status_code, err
            except Exception as exc:  # a refused or timed-out request is an error, not a crash
                return (time.perf_counter() - due) * 1000, 0, f"{type(exc).__name__}: {exc}"

        with ThreadPoolExecutor(64) as pool:
            t0 = time.perf_counter() + 0.5
            futures = []
            for i in range(total):
                due = t0 + i / rate
                delay = due - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                futures.append(pool.submit(one, i, due))
            results = [f.result() for f in futures]
            elapsed = time.perf_counter() - t0
    out.put({"results": results, "elapsed": elapsed})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=20.0, help="searches per second")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=1000, help="documents ingested before the load")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", bench.DEFAULT_REDIS))
    args = parser.parse_args(argv)

    lines = [line for line in bench.DEFAULT_CORPUS.read_bytes().split(b"\n") if line.strip()]
    seed, rest = b"\n".join(lines[: args.seed]) + b"\n", b"\n".join(lines[args.seed :]) + b"\n"
    queries = [json.loads(line)["text"] for line in QUERIES.read_text().splitlines() if line.strip()]
    logs = Path(os.environ.get("TMPDIR", "/tmp")) / f"pgsage-load-bench-{uuid.uuid4().hex[:6]}"
    logs.mkdir(parents=True)
    queue = f"pgsage-bench-{uuid.uuid4().hex[:8]}"
    with contextlib.ExitStack() as stack:
        print("starting Postgres, the API and a worker ...", flush=True)
        server = stack.enter_context(postgres_server())
        db_url = stack.enter_context(scratch_database(server))
        migrate(db_url)
        key = bench.admin_key(db_url, "load_search benchmark")
        env = {**os.environ, "PGSAGE_DATABASE_URL": db_url, "PGSAGE_REDIS_URL": args.redis_url,
               "PGSAGE_QUEUE_NAME": queue, "PGSAGE_DATA_DIR": str(logs / "data"),
               "PGSAGE_WORKER_CONCURRENCY": "1"}
        stack.callback(bench._drop_queue, args.redis_url, queue)
        base, _ = stack.enter_context(bench.api_server(env, logs / "api.log"))
        worker = WorkerProcess(env, logs / "worker.log")
        stack.callback(bench._worker_stop, worker)
        worker.start(timeout=300)
        bench.wait_ready(base, logs / "api.log")
        with httpx.Client(base_url=base, timeout=600, headers=bench.auth(key)) as client:
            print(f"seeding {args.seed} documents (untimed) ...", flush=True)
            job, _, _ = bench._ingest(client, "seed.jsonl", seed, "load-seed", worker, logs)
            assert job["state"] == "succeeded", job
            print(f"uploading {len(lines) - args.seed} more documents; the worker embeds them during the load",
                  flush=True)
            r = client.post("/v1/documents", files={"file": ("rest.jsonl", rest, "application/jsonl")},
                            data={"collection": "load-ingest"})
            assert r.status_code == 202, r.text
            ingest_job = r.json()["job_id"]
            time.sleep(5)  # the worker has started embedding
            before = client.get(f"/v1/jobs/{ingest_job}").json()
            print(f"driving {args.rate:g} searches/s for {args.seconds:g} s from a second process ...", flush=True)
            ctx = mp.get_context("spawn")
            out = ctx.Queue()
            proc = ctx.Process(target=_drive, args=(base, key, "load-seed", queries, args.rate, args.seconds, out))
            started = datetime.now(UTC)
            proc.start()
            report = out.get(timeout=args.seconds + 120)
            proc.join(30)
            after = client.get(f"/v1/jobs/{ingest_job}").json()
    results = report["results"]
    latencies = sorted(r[0] for r in results)
    errors = [r[2] for r in results if r[2]]
    cuts = statistics.quantiles(latencies, n=100)
    indexed_during = after["done"] - before["done"]
    summary = {
        "benchmark": "load_search",
        "timestamp": started.isoformat(timespec="seconds"),
        "machine": bench.machine_info(),
        "rate_target": args.rate,
        "seconds": args.seconds,
        "requests": len(results),
        "throughput_per_s": round(len(results) / report["elapsed"], 2),
        "ok": len(results) - len(errors),
        "errors": len(errors),
        "error_samples": errors[:10],
        "latency_ms": {"p50": round(cuts[49], 1), "p95": round(cuts[94], 1), "p99": round(cuts[98], 1),
                       "max": round(latencies[-1], 1)},
        "ingestion_during_load": {"documents_indexed": indexed_during, "job_state_after": after["state"],
                                  "total": after["total"]},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "machine"}, indent=2))
    ok = not errors and summary["throughput_per_s"] >= 0.98 * args.rate and indexed_during > 0
    print(f"{'OK' if ok else 'NOT MET'}: {summary['throughput_per_s']} searches/s, {len(errors)} errors, "
          f"p95 {summary['latency_ms']['p95']} ms, {indexed_during} documents indexed meanwhile")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

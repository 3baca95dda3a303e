"""Re-index speed against end-to-end ingest speed, measured in one run on the same corpus and machine.

1. A fresh database, the API (uvicorn) and a Celery worker with the default model; an untimed warm-up;
   then the corpus is uploaded and timed until every document's chunks and vectors are committed.
2. The worker is restarted with a changed model configuration (PGSAGE_EMBEDDING_POOLING=cls: the same
   network, different vectors). Its start notices the change and runs the re-index by itself; its
   rate is the job's chunks over the job's own span (started_at -> finished_at, which includes the
   backfill, the document vectors, the new HNSW index build and the switch), read from the database.

    python benchmarks/reindex_speed.py                 # the full SciFact corpus (~15 min in all)
    python benchmarks/reindex_speed.py --limit 300     # a quick check

Target: re-index at least 0.9 of the ingest rate (chunks/s).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import httpx
import ingest_speed as bench
import psycopg

from tests.fixtures.services import WorkerProcess, migrate, postgres_server, scratch_database

TARGET_RATIO = 0.9
DEFAULT_OUT = bench.ROOT / "benchmarks" / "results" / "reindex_speed.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=bench.DEFAULT_CORPUS)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", bench.DEFAULT_REDIS))
    args = parser.parse_args(argv)

    data = bench.read_corpus(args.corpus, args.limit)
    n_docs = sum(1 for line in data.splitlines() if line.strip())
    logs = Path(os.environ.get("TMPDIR", "/tmp")) / f"pgsage-reindex-bench-{uuid.uuid4().hex[:6]}"
    logs.mkdir(parents=True)
    queue = f"pgsage-bench-{uuid.uuid4().hex[:8]}"
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(postgres_server())
        db_url = stack.enter_context(scratch_database(server))
        migrate(db_url)
        key = bench.admin_key(db_url, "reindex_speed benchmark")
        env = {
            **os.environ,
            "PGSAGE_DATABASE_URL": db_url,
            "PGSAGE_REDIS_URL": args.redis_url,
            "PGSAGE_QUEUE_NAME": queue,
            "PGSAGE_DATA_DIR": str(logs / "data"),
            "PGSAGE_MAX_UPLOAD_BYTES": str(len(data) + (1 << 20)),
            "PGSAGE_WORKER_CONCURRENCY": "1",
        }
        stack.callback(bench._drop_queue, args.redis_url, queue)
        base, _ = stack.enter_context(bench.api_server(env, logs / "api.log"))
        worker = WorkerProcess(env, logs / "worker.log")
        stack.callback(bench._worker_stop, worker)  # also if an API call fails before the stop below
        worker.start(timeout=300)
        bench.wait_ready(base, logs / "api.log")
        with httpx.Client(base_url=base, timeout=600, headers=bench.auth(key)) as client:
            warm = b"\n".join(data.split(b"\n")[: bench.WARMUP_DOCUMENTS]) + b"\n"
            bench._ingest(client, "corpus.jsonl", warm, "bench-warmup", worker, logs)
            print(f"[ingest] uploading {n_docs} documents ...", flush=True)
            t0 = time.perf_counter()
            bench._ingest(client, "corpus.jsonl", data, "bench", worker, logs)
            ingest_s = time.perf_counter() - t0
        bench._worker_stop(worker)
        with psycopg.connect(bench._libpq(db_url)) as conn:
            chunks = conn.execute(  # the timed upload's chunks (not the warm-up's)
                "SELECT count(*) FROM chunks c JOIN documents d ON d.id = c.document_id "
                "JOIN collections k ON k.id = d.collection_id WHERE k.name = 'bench'"
            ).fetchone()[0]  # type: ignore[index]
        ingest_rate = chunks / ingest_s
        print(f"[ingest] {chunks} chunks in {ingest_s:.1f} s: {ingest_rate:.2f} chunks/s", flush=True)

        print("[reindex] restarting the worker with PGSAGE_EMBEDDING_POOLING=cls ...", flush=True)
        new_env = {**env, "PGSAGE_EMBEDDING_POOLING": "cls"}
        worker2 = WorkerProcess(new_env, logs / "worker2.log")
        stack.callback(bench._worker_stop, worker2)
        worker2.start(timeout=300)
        deadline = time.monotonic() + 7200
        row: Any = None
        while time.monotonic() < deadline:
            with psycopg.connect(bench._libpq(db_url)) as conn:
                row = conn.execute(
                    "SELECT status, total_chunks, done_chunks, extract(epoch FROM finished_at - started_at) "
                    "FROM reindex_jobs ORDER BY created_at DESC LIMIT 1"
                ).fetchone()
            if row and row[0] not in ("pending", "running"):
                break
            time.sleep(1)
        if row is None or row[0] != "succeeded":
            raise RuntimeError(f"the re-index did not succeed: {row}")
        _, total, done, reindex_s = row
        reindex_rate = done / float(reindex_s)
        print(f"[reindex] {done}/{total} chunks in {float(reindex_s):.1f} s: {reindex_rate:.2f} chunks/s", flush=True)

    ratio = reindex_rate / ingest_rate
    result = {
        "machine": bench.machine_info(),
        "documents": n_docs,
        "chunks": chunks,
        "ingest": {"seconds": round(ingest_s, 2), "chunks_per_s": round(ingest_rate, 2)},
        "reindex": {"seconds": round(float(reindex_s), 2), "chunks": done, "chunks_per_s": round(reindex_rate, 2)},
        "ratio_reindex_over_ingest": round(ratio, 3),
        "target": TARGET_RATIO,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"ratio re-index/ingest = {ratio:.3f} (target >= {TARGET_RATIO})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

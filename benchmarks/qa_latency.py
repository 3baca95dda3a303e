"""Question latency: POST /v1/ask and POST /v1/search (passage mode) against one query embedding.

Acceptance: ask latency p50 at most 3 times, and search (passage mode) p50 at most 2 times, the p50 of
one query embedding, all three measured in one run.

1. A fresh database, the API (uvicorn, one process) and one Celery worker (ingest_speed.py's helpers).
2. The SQuAD articles (48 Markdown files) ingested into one collection, untimed, as `pgsage ingest` does.
3. This process loads the same embedding model with the same Settings (app.embedding.Embedder).
4. Over a seeded sample of questions-dev.jsonl, after warm-up, in blocks of --block questions: the
   block's query embeddings here (embedder.encode([question])), then its POST /v1/search {group:
   passage, k: 5}, then its POST /v1/ask {k: 5}, each request answered before the next starts. Blocks
   let machine noise hit all three alike without a request following this process's own embedding
   (torch's threads spin after a forward pass and would take the cores from the API). Latency is the
   client's (HTTP round trip).

The API embeds the query itself with its own copy of the model, so each ratio says how much the rest
of the request (HTTP, retrieval, answering) adds to the embedding it contains. The embedding here and
the API's would compete for the machine's two cores only if they ran concurrently; they never do (the
three measurements are sequential), and the worker is idle once the corpus is ingested.

    python benchmarks/qa_latency.py                    # 200 questions after 20 of warm-up
    python benchmarks/qa_latency.py --questions 50     # a quick check
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import httpx
import ingest_speed as bench

from app.config import Settings
from app.eval.qa import Passage, QuestionResult, load_questions, score
from tests.fixtures.services import WorkerProcess, migrate, postgres_server, scratch_database

DATA = bench.ROOT.parent / "shared" / "data" / "squad-articles"
DEFAULT_OUT = bench.ROOT / "benchmarks" / "results" / "qa_latency.json"
COLLECTION = "qa-corpus"
TARGETS = {"search": 2.0, "ask": 3.0}  # at most this many query embeddings (p50 over p50)


def _summary(values: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(values, n=100) if len(values) > 1 else values * 99
    return {"p50": statistics.median(values), "p95": cuts[94], "mean": statistics.fmean(values)}


def ingest_corpus(client: httpx.Client, corpus: Path) -> int:
    """Upload the folder's files as `pgsage ingest` does (same external ids) and wait; the file count."""
    from app.cli import _expand, _ingest_files

    files = list(_expand([corpus]))
    if _ingest_files(client, files, COLLECTION, {}, wait=True, err=True):
        raise RuntimeError("the corpus did not ingest cleanly; see above")
    return len(files)


def _post(client: httpx.Client, path: str, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """(milliseconds, response body) of one request; an error answer raises."""
    t = time.perf_counter()
    r = client.post(path, json=body)
    ms = (time.perf_counter() - t) * 1000
    if r.status_code != 200:
        raise RuntimeError(f"POST {path}: {r.status_code} {r.text[:500]}")
    out: dict[str, Any] = r.json()
    return ms, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=DATA / "corpus", help="a folder of documents")
    parser.add_argument("--qa", type=Path, default=DATA / "questions-dev.jsonl", help="the question file")
    parser.add_argument("--questions", type=int, default=200, help="questions measured")
    parser.add_argument("--warmup", type=int, default=20, help="questions before the measured ones, untimed")
    parser.add_argument("--seed", type=int, default=0, help="seed of the question sample")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--block", type=int, default=10,
                        help="questions per block: their embeddings, then their searches, then their asks")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", bench.DEFAULT_REDIS))
    args = parser.parse_args(argv)

    corpus, qa, out_path = args.corpus.resolve(), args.qa.resolve(), args.out.resolve()
    os.chdir(bench.ROOT)  # the API and worker run here, so this process reads the same .env
    # SIGTERM ends the run through the finally blocks: subprocesses stopped, database dropped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    import redis

    try:
        redis.Redis.from_url(args.redis_url, socket_connect_timeout=5).ping()
    except redis.RedisError as exc:
        print(f"Redis at {args.redis_url} does not answer ({exc}); set REDIS_URL", file=sys.stderr)
        return 2
    # In random order, not the file's (grouped by article), so warm-up and measured questions span articles.
    chosen = random.Random(args.seed).sample(load_questions(qa), args.warmup + args.questions)
    warmup, measured = chosen[: args.warmup], chosen[args.warmup :]

    logs = Path(os.environ.get("TMPDIR", "/tmp")) / f"pgsage-qa-bench-{uuid.uuid4().hex[:6]}"
    logs.mkdir(parents=True)
    queue = f"pgsage-bench-{uuid.uuid4().hex[:8]}"
    errors: dict[str, str] = {}
    times: dict[str, list[float]] = {"embed": [], "search": [], "ask": []}
    results: list[QuestionResult] = []
    with contextlib.ExitStack() as stack:
        print("starting Postgres, the API and a worker ...", flush=True)
        server = stack.enter_context(postgres_server())
        db_url = stack.enter_context(scratch_database(server))
        migrate(db_url)
        key = bench.admin_key(db_url, "qa_latency benchmark")
        env = {**os.environ, "PGSAGE_DATABASE_URL": db_url, "PGSAGE_REDIS_URL": args.redis_url,
               "PGSAGE_QUEUE_NAME": queue, "PGSAGE_DATA_DIR": str(logs / "data"),
               "PGSAGE_WORKER_CONCURRENCY": "1"}
        stack.callback(bench._drop_queue, args.redis_url, queue)
        base, api_pid = stack.enter_context(bench.api_server(env, logs / "api.log"))
        worker = WorkerProcess(env, logs / "worker.log")
        stack.callback(bench._worker_stop, worker)
        worker.start(timeout=300)
        bench.wait_ready(base, logs / "api.log")
        assert worker.proc is not None
        with httpx.Client(base_url=base, timeout=120, headers=bench.auth(key)) as client:
            print(f"ingesting {corpus} (untimed) ...", flush=True)
            files = ingest_corpus(client, corpus)
            have = next(c for c in client.get("/v1/status").json()["collections"] if c["name"] == COLLECTION)
            print(f"{have['indexed']} of {files} documents indexed, {have['chunks']} chunks", flush=True)

            # The same model and Settings as the API's (it inherits this environment and reads this .env).
            settings = Settings()
            from app.embedding import Embedder

            embedder = Embedder(settings)
            search_body = {"k": args.k, "collection": COLLECTION, "group": "passage"}
            ask_body = {"k": args.k, "collection": COLLECTION}
            print(f"warming up on {len(warmup)} questions ...", flush=True)
            for q in warmup:
                embedder.encode([q.question])
                for name, path, body in (("search", "/v1/search", {**search_body, "query": q.question}),
                                         ("ask", "/v1/ask", {**ask_body, "question": q.question})):
                    if name in errors:
                        continue
                    try:
                        _post(client, path, body)
                    except RuntimeError as exc:
                        # Not measurable on this API (e.g. 422 before `group` existed): the rest still is.
                        errors[name] = str(exc)
                        print(f"warning: {exc}; {name} is not measured", file=sys.stderr, flush=True)
            print(f"measuring {len(measured)} questions: embed, search, ask in turn ...", flush=True)
            # This process's own CPU apart: its process tree holds the API, the worker and an embedded Postgres.
            own0 = sum(os.times()[:2])
            with bench.CpuWindow({"api": api_pid, "worker": worker.proc.pid}) as cpu:
                # In blocks: the block's embeddings, then its searches, then its asks. Measured one
                # straight after the other, a request paid for this process's own embedding just before it:
                # torch's threads here spin-wait for a while after each forward pass and took the cores
                # from the API (search, which followed the embedding, came out slower than ask, which
                # does more). Blocks keep the three interleaved over time against machine noise.
                for start in range(0, len(measured), args.block):
                    block = measured[start : start + args.block]
                    for q in block:
                        t = time.perf_counter()
                        embedder.encode([q.question])
                        times["embed"].append((time.perf_counter() - t) * 1000)
                    found_of: dict[str, list[Passage]] = {}
                    if "search" not in errors:
                        for q in block:
                            ms, found = _post(client, "/v1/search", {**search_body, "query": q.question})
                            times["search"].append(ms)
                            found_of[q.id] = [Passage(h["external_id"], h["text"]) for h in found["results"]]
                    answer_of: dict[str, str] = {}
                    if "ask" not in errors:
                        for q in block:
                            ms, answered = _post(client, "/v1/ask", {**ask_body, "question": q.question})
                            times["ask"].append(ms)
                            answer_of[q.id] = answered["answer"]
                    results.extend(QuestionResult(q, found_of.get(q.id, []), answer_of.get(q.id, ""), 0.0, 0.0)
                                   for q in block)
            ncpu = os.cpu_count() or 1
            cpu.result["benchmark_cpu_pct"] = round(100 * (sum(os.times()[:2]) - own0) / cpu.seconds / ncpu, 1)
            others = round(cpu.result["machine_busy_pct"] - cpu.result["benchmark_cpu_pct"]
                           - cpu.result["api_cpu_pct"] - cpu.result["worker_cpu_pct"], 1)

    raw = {name: _summary(values) for name, values in times.items() if values}
    ratios = {name: round(raw[name]["p50"] / raw["embed"]["p50"], 3) for name in TARGETS if name in raw}
    latency = {name: {key: round(v, 2) for key, v in summary.items()} for name, summary in raw.items()}
    met = {name: ratios[name] <= TARGETS[name] for name in ratios}
    quality = score(results, args.k)
    report = {
        "benchmark": "qa_latency",
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": bench.machine_info(),
        "corpus": str(corpus),
        "questions_file": str(qa),
        "documents": files,
        "chunks": have["chunks"],
        "questions": len(measured),
        "warmup": len(warmup),
        "seed": args.seed,
        "k": args.k,
        "embedding_model": settings.embedding_model,
        "latency_ms": latency,
        "ratio_p50_to_embed": ratios,
        "target_ratio": TARGETS,
        "meets_target": met,
        "complete": not errors,
        "errors": errors,
        "cpu": cpu.result,
        # Postgres counts as "other" here (a few percent when quiet); above NOISE_PCT the run is flagged.
        "other_processes_cpu_pct": others,
        "quiet": others <= bench.NOISE_PCT,
        # What the answers were worth, so a fast answer cannot be an empty one unnoticed.
        "quality": {key: round(quality[key], 4) for key in
                    ("passage_hit@1", f"passage_hit@{args.k}", "document@1", "answer_holds", "mean_answer_words")},
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2) + "\n")

    machine = report["machine"]
    print()
    print(f"machine   {machine['nproc']} CPUs ({machine['cpu_model']}), torch {machine['torch_version']} "
          f"with {machine['torch_threads']} threads; machine busy {cpu.result['machine_busy_pct']}%")
    print(f"corpus    {files} documents, {have['chunks']} chunks; {len(measured)} questions after "
          f"{len(warmup)} of warm-up, k {args.k}")
    for name in ("embed", "search", "ask"):
        if name not in latency:
            print(f"{name:<9} not measured: {errors[name]}")
            continue
        line = f"{name:<9} p50 {latency[name]['p50']:8.1f} ms   p95 {latency[name]['p95']:8.1f} ms"
        if name in ratios:
            line += (f"   {name}/embed {ratios[name]:.2f} (target <= {TARGETS[name]:g}) "
                     f"{'OK' if met[name] else 'NOT MET'}")
        print(line)
    if results and not errors:
        q = report["quality"]
        print(f"quality   passage hit@1 {q['passage_hit@1']:.3f}, hit@{args.k} {q[f'passage_hit@{args.k}']:.3f}, "
              f"answer holds {q['answer_holds']:.3f} ({q['mean_answer_words']:.1f} words)")
    if others > bench.NOISE_PCT:
        print(f"WARNING   the machine was not quiet: other processes used {others}% of the CPUs during the "
              "measurement; the ratios are not reliable")
    print(f"result    {out_path}")
    return 0 if not errors and all(met.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Worker threads and batch size for the embedding backend, chosen by measurement (issue 13, point 2).

One run, on what the worker embeds (the chunks and quotable sentences of SciFact documents, loaded and chunked
as the worker does, under their heading paths), with the configured backend (PGSAGE_EMBEDDING_BACKEND):

1. batch size x intra-op threads in one process: texts/s for each batch size with 1 thread, with all the
   machine's cores, and with as many lanes of one thread as cores (the worker's way with the onnx backends,
   embedding.Embedder), the configurations taking turns over the same texts for several rounds (median kept);
2. the same texts split between as many worker processes as cores, each on one thread (what
   PGSAGE_WORKER_CONCURRENCY=<cores> with PGSAGE_WORKER_THREADS=1 does), against one process on all cores;
3. one query at a time (as the API embeds it) on 1 thread and on all cores, p50/p95.

    python benchmarks/encode_tuning.py                  # 400 documents, 3 rounds (about 10 minutes on 2 cores)
    python benchmarks/encode_tuning.py --documents 100 --rounds 1   # a quick look

Writes benchmarks/results/encode_tuning.json and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATA = ROOT.parent / "shared" / "data" / "scifact"
BATCHES = (8, 16, 32, 64, 128)


def worker_texts(settings: Any, documents: int) -> list[str]:
    """What the worker encodes for the corpus's first documents: each chunk and each quotable sentence."""
    from app.embedding import Embedder
    from app.ingest.chunk import Chunker
    from app.ingest.load import load_upload

    lines = (DATA / "corpus.jsonl").read_bytes().splitlines()[:documents]
    data = b"\n".join(lines) + b"\n"
    embedder = Embedder(settings, threads=1)
    chunker = Chunker(embedder.tokenizer, embedder.chunk_max_tokens, settings.chunk_overlap_tokens)
    out: list[str] = []
    for doc in load_upload("corpus.jsonl", None, data, max(len(data), settings.max_upload_bytes)):
        for c in chunker.split(doc.content, kind=doc.format, title=doc.title):
            out.extend((c.embed_text, *c.sentence_texts))
    return out


def _encode_share(args: tuple[list[str], int, int]) -> float:
    """In a worker process: load the model on `threads` threads, encode the texts, return the seconds taken."""
    texts, threads, batch = args
    from app.config import Settings
    from app.embedding import Embedder, torch_threads

    torch_threads(threads)
    embedder = Embedder(Settings(), threads=threads)
    embedder.encode(texts[:batch], batch_size=batch)  # warm-up
    ready.wait()  # type: ignore[name-defined]  # every process starts the clock together
    t = time.perf_counter()
    embedder.encode(texts, batch_size=batch)
    return time.perf_counter() - t


def _init(barrier: Any) -> None:
    global ready
    ready = barrier  # type: ignore[name-defined]


def split_processes(texts: list[str], processes: int, batch: int) -> float:
    """Texts/s with the texts dealt out to `processes` worker processes of one thread each, all starting at once."""
    barrier = multiprocessing.get_context("spawn").Barrier(processes)
    shares = [texts[i::processes] for i in range(processes)]
    with multiprocessing.get_context("spawn").Pool(processes, initializer=_init, initargs=(barrier,)) as pool:
        seconds = pool.map(_encode_share, [(s, 1, batch) for s in shares])
    return len(texts) / max(seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "encode_tuning.json")
    args = parser.parse_args(argv)

    from app.config import Settings
    from app.embedding import Embedder, torch_threads
    from benchmarks.ingest_speed import machine_info

    settings = Settings()
    cores = os.cpu_count() or 1
    texts = worker_texts(settings, args.documents)
    print(f"backend {settings.embedding_backend}; {len(texts)} texts from {args.documents} documents; "
          f"{cores} cores", flush=True)

    # 1. batch x threads, one process. The torch thread count is process-wide: set per configuration.
    models = {t: Embedder(settings, threads=t) for t in sorted({1, cores})}
    # And the worker's way with the onnx backends: as many lanes of one thread as cores, on one session.
    laned = Embedder(settings, threads=cores, lanes=True)
    configurations = [(str(t), t, m) for t, m in models.items()]
    if laned.lanes > 1:
        configurations.append((f"{cores}L", 1, laned))
    seconds: dict[str, list[float]] = {}
    for r in range(args.rounds):
        for name, threads, model in configurations:
            torch_threads(threads)
            for batch in BATCHES:
                model.encode(texts[:batch], batch_size=batch)
                t = time.perf_counter()
                model.encode(texts, batch_size=batch)
                seconds.setdefault(f"{name}x{batch}", []).append(time.perf_counter() - t)
        print(f"  round {r + 1}: " + ", ".join(f"{k} {len(texts) / v[-1]:.0f}/s" for k, v in seconds.items()),
              flush=True)
    rates = {k: round(len(texts) / float(np.median(v)), 1) for k, v in seconds.items()}

    # 2. processes x 1 thread, at the best batch of one thread.
    best_single = max(BATCHES, key=lambda b: rates[f"1x{b}"])
    split = round(split_processes(texts, cores, best_single), 1) if cores > 1 else rates[f"1x{best_single}"]

    # 3. one query at a time.
    queries = [json.loads(line)["text"] for line in (DATA / "queries.jsonl").read_text().splitlines()][: args.queries]
    query_ms: dict[int, list[float]] = {t: [] for t in models}
    for q in queries:
        for threads, model in models.items():
            torch_threads(threads)
            t = time.perf_counter()
            model.encode([q])
            query_ms[threads].append((time.perf_counter() - t) * 1000)
    queries_out = {str(t): {"p50_ms": round(float(np.percentile(v, 50)), 2),
                            "p95_ms": round(float(np.percentile(v, 95)), 2)} for t, v in query_ms.items()}

    best = max(rates, key=rates.__getitem__)
    report = {
        "benchmark": "encode_tuning",
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "backend": settings.embedding_backend,
        "texts": len(texts),
        "documents": args.documents,
        "rounds": args.rounds,
        "texts_per_s": rates,
        "best_one_process": best,
        f"{cores}_processes_x_1_thread_batch_{best_single}": split,
        "query_ms_by_threads": queries_out,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print("texts/s     " + "".join(f"{'batch ' + str(b):>11}" for b in BATCHES))
    for name, threads, _ in configurations:
        row = "".join(f"{rates[f'{name}x{b}']:>11}" for b in BATCHES)
        label = f"{cores} lanes  " if name.endswith("L") else f"{threads} thread{'s' if threads > 1 else ' '}"
        print(f"{label}   {row}")
    print(f"{cores} processes x 1 thread, batch {best_single}: {split} texts/s "
          f"(one process, best: {best} at {rates[best]})")
    for t, q in queries_out.items():
        print(f"one query on {t} thread(s): p50 {q['p50_ms']} ms, p95 {q['p95_ms']} ms")
    print(f"result      {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

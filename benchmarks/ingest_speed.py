"""Ingest speed: raw model encode vs. end-to-end ingest (API -> Redis -> Celery worker -> pgvector).

Both are measured in one run, one after the other (never overlapping), on the same corpus:

(a) raw: the documents are loaded as the API loads them (load_upload), chunked with the worker's
    Chunker and settings, and Embedder.encode, built as a worker process builds it (its threads, or its
    lanes for the onnx backends), runs over every chunk text in one call as the worker calls it.
    Only the encode is timed (chunking is reported apart).
(b) end-to-end: a fresh database (tests.fixtures.services), a real Celery worker subprocess
    (concurrency 1) and the API under uvicorn in a subprocess are started and warmed up (models loaded)
    before the timer; the timer covers POST /v1/documents of the JSONL file until the job reports
    every document settled, i.e. all chunks and vectors committed.

The ratio end-to-end/raw (documents/s over documents/s) is the share of the model's speed that ingestion
keeps; the target is >= 0.9 (issue 13). Run it on a quiet machine: the machine's CPU use during each phase is
recorded so that a disturbed run can be told apart.

    python benchmarks/ingest_speed.py                   # the full SciFact corpus (~7 min per phase)
    python benchmarks/ingest_speed.py --limit 300       # a quick check
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx  # noqa: E402
import psycopg  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from app.config import Settings  # noqa: E402
from tests.fixtures.services import (  # noqa: E402
    WorkerProcess,
    free_port,
    migrate,
    postgres_server,
    scratch_database,
)

DEFAULT_CORPUS = ROOT.parent / "shared" / "data" / "scifact" / "corpus.jsonl"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "ingest_speed.json"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
TARGET_RATIO = 0.9
# CPU share (of all CPUs) used by other processes during a phase above which the run is flagged as
# disturbed; Postgres counts as "other" in the end-to-end phase (a few percent when quiet).
NOISE_PCT = 15.0
# A fixed small encode run before and after each phase; its speed should not move on a quiet machine.
PROBE_CHUNKS = 64
DRIFT_PCT = 10.0
# As often as `pgsage ingest` polls for its progress bar: the poll is the observer's cost, not ingest's.
POLL_INTERVAL_S = 1.0
WARMUP_DOCUMENTS = 32


# --- machine and CPU accounting ------------------------------------------------------------------


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    import torch

    return {
        "hostname": socket.gethostname(),
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot, from /proc/stat."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total


def _process_tree_ticks(pid: int) -> int:
    """utime+stime clock ticks of a process and its living descendants."""
    parents: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            raw = stat.read_text()
        except OSError:
            continue
        rest = raw[raw.rfind(")") + 2 :].split()
        child = int(stat.parent.name)
        parents.setdefault(int(rest[1]), []).append(child)
        ticks[child] = int(rest[11]) + int(rest[12])
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += ticks.get(p, 0)
        todo.extend(parents.get(p, []))
    return total


def _descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            raw = stat.read_text()
        except OSError:
            continue
        parents.setdefault(int(raw[raw.rfind(")") + 2 :].split()[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out.extend(kids)
        todo.extend(kids)
    return out


@dataclass
class CpuWindow:
    """Machine-wide and per-process CPU use over a phase, to tell a quiet run from a disturbed one."""

    pids: dict[str, int] = field(default_factory=dict)
    start: float = 0.0
    busy0: int = 0
    total0: int = 0
    proc0: dict[str, int] = field(default_factory=dict)
    load0: float = 0.0
    seconds: float = 0.0
    result: dict[str, Any] = field(default_factory=dict)

    def __enter__(self) -> CpuWindow:
        self.load0 = os.getloadavg()[0]
        self.busy0, self.total0 = _machine_ticks()
        self.proc0 = {name: _process_tree_ticks(pid) for name, pid in self.pids.items()}
        self.start = time.perf_counter()
        return self

    def __exit__(self, *_: object) -> None:
        self.seconds = time.perf_counter() - self.start
        busy1, total1 = _machine_ticks()
        hz = os.sysconf("SC_CLK_TCK")
        ncpu = os.cpu_count() or 1
        self.result = {
            "loadavg_1m_before": round(self.load0, 2),
            "loadavg_1m_after": round(os.getloadavg()[0], 2),
            # Share of all CPUs that was busy (any process) during the phase.
            "machine_busy_pct": round(100 * (busy1 - self.busy0) / max(total1 - self.total0, 1), 1),
        }
        for name, pid in self.pids.items():
            used = (_process_tree_ticks(pid) - self.proc0[name]) / hz
            # Share of all CPUs used by that process tree (100 = every core busy for the whole phase).
            self.result[f"{name}_cpu_pct"] = round(100 * used / max(self.seconds, 1e-9) / ncpu, 1)


# --- corpus --------------------------------------------------------------------------------------


def read_corpus(path: Path, limit: int | None) -> bytes:
    """The JSONL bytes, cut to the first `limit` documents if set."""
    data = path.read_bytes()
    if limit is None:
        return data
    lines = [line for line in data.split(b"\n") if line.strip()][:limit]
    return b"\n".join(lines) + b"\n"


# --- (a) raw encode ------------------------------------------------------------------------------


@dataclass
class Prepared:
    """The corpus as the worker sees it: loaded, chunked, with the model loaded in this process."""

    embedder: Any
    documents: int
    chunked: list[list[Any]]
    texts: list[str]
    word_pieces: int
    chunking_seconds: float


def prepare(settings: Settings, name: str, data: bytes) -> Prepared:
    from app.embedding import worker_embedders
    from app.ingest.chunk import Chunker
    from app.ingest.load import load_upload

    print("loading the model and chunking the corpus ...", flush=True)
    docs = load_upload(name, None, data, max(len(data), settings.max_upload_bytes))
    embedder = worker_embedders(settings).configured  # as a worker process builds it: threads, lanes
    chunker = Chunker(embedder.tokenizer, embedder.chunk_max_tokens, settings.chunk_overlap_tokens)
    t = time.perf_counter()
    chunked = [chunker.split(doc.content, kind=doc.format, title=doc.title) for doc in docs]
    chunk_s = time.perf_counter() - t
    # What the worker embeds: each chunk and each quotable sentence, under its heading path.
    texts = [t for chunks in chunked for c in chunks for t in (c.embed_text, *c.sentence_texts)]
    tokens = sum(c.token_count for chunks in chunked for c in chunks)
    embedder.encode(texts[: settings.embedding_batch_size])  # warm-up, untimed
    return Prepared(embedder, len(docs), chunked, texts, tokens, chunk_s)


def probe(settings: Settings, prep: Prepared) -> float:
    """Chunks/s of a small fixed encode, run between phases to see whether the machine's speed drifted."""
    texts = prep.texts[:PROBE_CHUNKS]
    t = time.perf_counter()
    prep.embedder.encode(texts)
    return round(len(texts) / (time.perf_counter() - t), 2)


def measure_raw(settings: Settings, prep: Prepared, grouped: bool) -> dict[str, Any]:
    embedder, chunked, texts = prep.embedder, prep.chunked, prep.texts
    from app.embedding import LANE_BATCH

    # As the worker's encode calls: the configured batch size on one lane, LANE_BATCH on each of several.
    batch = LANE_BATCH if embedder.lanes > 1 else settings.embedding_batch_size
    print(f"[raw] encoding {len(texts)} chunks of {prep.documents} documents ({embedder.lanes} lanes, batch size "
          f"{batch}) ...",
          flush=True)
    with CpuWindow({"benchmark": os.getpid()}) as cpu:
        t = time.perf_counter()
        vectors = embedder.encode(texts)
        encode_s = time.perf_counter() - t
    assert vectors.shape[0] == len(texts)
    chunk_s = prep.chunking_seconds
    result: dict[str, Any] = {
        "documents": prep.documents,
        "chunks": len(texts),
        "word_pieces": prep.word_pieces,
        "batch_size": batch,
        "lanes": embedder.lanes,
        "chunk_max_tokens": embedder.chunk_max_tokens,
        "chunking_seconds": round(chunk_s, 3),
        "encode_seconds": round(encode_s, 3),
        "chunks_per_s": round(len(texts) / encode_s, 2),
        "docs_per_s": round(prep.documents / encode_s, 2),
        "cpu": cpu.result,
    }
    print(f"[raw] {result['chunks_per_s']} chunks/s, {result['docs_per_s']} docs/s "
          f"({encode_s:.1f} s; chunking apart: {chunk_s:.1f} s)", flush=True)
    if grouped:
        # Diagnostic: the same encode, split into the worker's encode calls (one per task's documents),
        # to tell the cost of per-task batching (padding, short tails) from the rest of the pipeline.
        per_task = settings.ingest_batch_documents
        groups = [[t for chunks in chunked[i : i + per_task] for c in chunks for t in (c.embed_text, *c.sentence_texts)]
                  for i in range(0, len(chunked), per_task)]
        with CpuWindow({"benchmark": os.getpid()}) as gcpu:
            t = time.perf_counter()
            for group in groups:
                embedder.encode(group)
            grouped_s = time.perf_counter() - t
        result["grouped"] = {
            "documents_per_call": per_task,
            "calls": len(groups),
            "encode_seconds": round(grouped_s, 3),
            "chunks_per_s": round(len(texts) / grouped_s, 2),
            "cpu": gcpu.result,
        }
        print(f"[raw] in the worker's groups of {per_task} documents: {result['grouped']['chunks_per_s']} "
              f"chunks/s ({grouped_s:.1f} s)", flush=True)
    del vectors
    gc.collect()
    return result


# --- (b) end-to-end ------------------------------------------------------------------------------


_TASK_DONE = re.compile(r"Task ingest\.process_documents\[[^\]]+\] succeeded in ([0-9.]+)s")
_BATCH = re.compile(r"ingest batch: .*; load ([0-9.]+)s chunk ([0-9.]+)s embed ([0-9.]+)s store ([0-9.]+)s")


def worker_breakdown(log_text: str, total_s: float) -> dict[str, Any]:
    """Where the worker's time went, from its log: task time by stage, and time outside tasks."""
    tasks = [float(m.group(1)) for m in _TASK_DONE.finditer(log_text)]
    stages = [[float(x) for x in m.groups()] for m in _BATCH.finditer(log_text)]
    out: dict[str, Any] = {"tasks": len(tasks), "in_tasks": round(sum(tasks), 3),
                           "outside_tasks": round(total_s - sum(tasks), 3)}
    if stages:  # the pipeline logs its stage timings (app.ingest.pipeline)
        for i, name in enumerate(("load", "chunk", "embed", "store")):
            out[name] = round(sum(s[i] for s in stages), 3)
    return out


def _read_worker_log(path: Path, offset: int, tasks: int, timeout: float = 10) -> str:
    """The worker's log from offset, once it records `tasks` finished tasks (they log just after commit)."""
    deadline = time.monotonic() + timeout
    while True:
        with path.open("rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        if len(_TASK_DONE.findall(text)) >= tasks or time.monotonic() > deadline:
            return text
        time.sleep(0.2)


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _stop(proc: subprocess.Popen[bytes] | None, timeout: float = 30) -> None:
    """Terminate a subprocess we started, then any of its children left behind (by pid)."""
    if proc is None:
        return
    kids = _descendants(proc.pid)
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    for pid in kids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def api_server(env: dict[str, str], log_path: Path) -> Iterator[tuple[str, int]]:
    """The API under uvicorn in a subprocess (one process, no reload); yields its base URL and pid."""
    port = free_port()
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory",
             "--host", "127.0.0.1", "--port", str(port),
             "--timeout-keep-alive", str(Settings().api_keep_alive_seconds)],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            yield f"http://127.0.0.1:{port}", proc.pid
        finally:
            _stop(proc)


def wait_ready(base: str, log_path: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                return
        time.sleep(0.5)
    tail = log_path.read_text(errors="replace")[-3000:]
    raise RuntimeError(f"the API is not ready after {timeout}s:\n{tail}")


def admin_key(db_url: str, name: str = "benchmark") -> str:
    """A new admin key for every collection ("*") on this (migrated) database, for the /v1 calls."""
    from app import keys
    from app.db.session import make_engine, make_sessionmaker, session_scope

    engine = make_engine(Settings(database_url=db_url), pool_size=1)
    try:
        with session_scope(make_sessionmaker(engine)) as session:
            _, key = keys.create(session, name, "admin", [keys.ALL_COLLECTIONS])
    finally:
        engine.dispose()
    return key


def auth(key: str) -> dict[str, str]:
    """The header every /v1 request carries."""
    return {"Authorization": f"Bearer {key}"}


def _worker_stop(worker: WorkerProcess) -> None:
    kids = _descendants(worker.proc.pid) if worker.proc else []
    worker.stop()
    for pid in kids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _drop_queue(redis_url: str, queue: str) -> None:
    """Remove this run's queue keys from Redis (it is shared with others)."""
    with contextlib.suppress(Exception):
        import redis

        client = redis.Redis.from_url(redis_url)
        # The queue's list (and priority lists), and kombu's bindings of the exchange named after it.
        keys = [queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}",
                *client.scan_iter(match=f"{queue}\x06\x16*")]
        client.delete(*keys)
        client.close()


@dataclass
class Service:
    """A running service for a benchmark: fresh database, the API under uvicorn, one Celery worker."""

    db_url: str
    base: str
    api_pid: int
    worker: WorkerProcess
    key: str
    logs: Path


def service(stack: contextlib.ExitStack, name: str, redis_url: str, env: dict[str, str] | None = None,
            database: str | None = None) -> Service:
    """Start Postgres with a fresh migrated database (or use `database`, migrated), the API and one worker (its
    queue of its own), all stopped and cleaned up by the stack; the worker is started and the API ready on
    return. env: more PGSAGE_* settings."""
    logs = Path(os.environ.get("TMPDIR", "/tmp")) / f"pgsage-{name}-bench-{uuid.uuid4().hex[:6]}"
    logs.mkdir(parents=True)
    queue = f"pgsage-bench-{uuid.uuid4().hex[:8]}"
    print("starting Postgres, the API and a worker ...", flush=True)
    if database is None:
        server = stack.enter_context(postgres_server())
        db_url = stack.enter_context(scratch_database(server))
        migrate(db_url)
    else:
        db_url = database
    key = admin_key(db_url, f"{name} benchmark")
    full = {**os.environ, "PGSAGE_DATABASE_URL": db_url, "PGSAGE_REDIS_URL": redis_url, "PGSAGE_QUEUE_NAME": queue,
            "PGSAGE_DATA_DIR": str(logs / "data"), "PGSAGE_WORKER_CONCURRENCY": "1", **(env or {})}
    stack.callback(_drop_queue, redis_url, queue)
    base, api_pid = stack.enter_context(api_server(full, logs / "api.log"))
    worker = WorkerProcess(full, logs / "worker.log")
    stack.callback(_worker_stop, worker)
    worker.start(timeout=300)
    wait_ready(base, logs / "api.log")
    return Service(db_url, base, api_pid, worker, key, logs)


def _ingest(client: httpx.Client, name: str, data: bytes, collection: str,
            worker: WorkerProcess, logs: Path) -> tuple[dict[str, Any], float, int]:
    """Upload a JSONL file and poll its job until every document is settled: (job, accepted after, polls)."""
    t0 = time.perf_counter()
    r = client.post("/v1/documents", files={"file": (name, data, "application/jsonl")},
                    data={"collection": collection})
    accepted_s = time.perf_counter() - t0
    if r.status_code != 202:
        raise RuntimeError(f"upload refused: {r.status_code} {r.text[:2000]}")
    job_id = r.json()["job_id"]
    polls = 0
    while True:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        polls += 1
        if job["state"] not in ("queued", "running"):
            return job, accepted_s, polls
        if worker.proc is None or worker.proc.poll() is not None:
            raise RuntimeError("the worker died during the run; see " + str(logs / "worker.log"))
        time.sleep(POLL_INTERVAL_S)


def measure_e2e(settings: Settings, name: str, data: bytes, n_docs: int, logs: Path,
                redis_url: str) -> dict[str, Any]:
    queue = f"pgsage-bench-{uuid.uuid4().hex[:8]}"
    collection = "scifact-bench"
    with contextlib.ExitStack() as stack:
        print("[e2e] starting Postgres and a fresh database ...", flush=True)
        server = stack.enter_context(postgres_server())
        db_url = stack.enter_context(scratch_database(server))
        migrate(db_url)
        key = admin_key(db_url, "ingest_speed benchmark")
        env = {
            **os.environ,
            "PGSAGE_DATABASE_URL": db_url,
            "PGSAGE_REDIS_URL": redis_url,
            "PGSAGE_QUEUE_NAME": queue,
            "PGSAGE_DATA_DIR": str(logs / "data"),
            "PGSAGE_MAX_UPLOAD_BYTES": str(max(len(data) + (1 << 20), settings.max_upload_bytes)),
            "PGSAGE_WORKER_CONCURRENCY": "1",
        }
        stack.callback(_drop_queue, redis_url, queue)
        print("[e2e] starting the API (uvicorn) and a Celery worker, loading models ...", flush=True)
        base, api_pid = stack.enter_context(api_server(env, logs / "api.log"))
        worker = WorkerProcess(env, logs / "worker.log")
        stack.callback(_worker_stop, worker)
        worker.start(timeout=300)
        wait_ready(base, logs / "api.log")
        assert worker.proc is not None
        with httpx.Client(base_url=base, timeout=600, headers=auth(key)) as client:
            # Warm-up, untimed (the raw phase has one too): the first documents through the whole path,
            # in a collection of their own, so first-call costs are not timed. Enough for full batches of
            # long chunks: the first task of a fresh worker process was ~0.7 s slower without it.
            warm = b"\n".join(data.split(b"\n")[:WARMUP_DOCUMENTS]) + b"\n"
            _ingest(client, name, warm, "bench-warmup", worker, logs)
            time.sleep(1)  # the task logs its end just after the job settles
            worker_log_start = (logs / "worker.log").stat().st_size
            print(f"[e2e] uploading {n_docs} documents ...", flush=True)
            with CpuWindow({"worker": worker.proc.pid, "api": api_pid}) as cpu:
                t0 = time.perf_counter()
                job, accepted_s, polls = _ingest(client, name, data, collection, worker, logs)
                total_s = time.perf_counter() - t0
        if job["state"] != "succeeded" or job["indexed"] != n_docs:
            raise RuntimeError(f"the job did not index every document: {json.dumps(job)[:3000]}")
        with psycopg.connect(_libpq(db_url)) as conn:
            chunks, vectors, doc_chunks = conn.execute(
                "SELECT (SELECT count(*) FROM chunks c JOIN documents d ON d.id = c.document_id "
                "        WHERE d.collection_id = k.id), "
                "       (SELECT count(*) FROM chunk_vectors v WHERE v.collection_id = k.id), "
                "       (SELECT coalesce(sum(chunk_count), 0) FROM documents d "
                "        WHERE d.collection_id = k.id AND d.status = 'indexed') "
                "FROM collections k WHERE k.name = %s", (collection,)
            ).fetchone() or (0, 0, 0)
        breakdown = worker_breakdown(_read_worker_log(logs / "worker.log", worker_log_start,
                                                      -(-n_docs // settings.ingest_batch_documents)), total_s)
        server_span = (datetime.fromisoformat(job["updated_at"])
                       - datetime.fromisoformat(job["created_at"])).total_seconds()
        result = {
            "documents": n_docs,
            "chunks": int(chunks),
            "chunk_vectors": int(vectors),
            "tasks": breakdown.pop("tasks"),
            "batch_documents": settings.ingest_batch_documents,
            "upload_accepted_seconds": round(accepted_s, 3),
            "seconds": round(total_s, 3),
            "server_side_seconds": round(server_span, 3),
            "chunks_per_s": round(int(chunks) / total_s, 2),
            "docs_per_s": round(n_docs / total_s, 2),
            "job_polls": polls,
            "cpu": cpu.result,
            "worker_seconds": breakdown,
        }
        if int(chunks) != int(vectors) or int(chunks) != int(doc_chunks):
            raise RuntimeError(f"inconsistent counts: {chunks} chunks, {vectors} vectors, "
                               f"{doc_chunks} counted on documents")
    print(f"[e2e] {result['chunks_per_s']} chunks/s, {result['docs_per_s']} docs/s "
          f"({total_s:.1f} s; the upload was accepted after {accepted_s:.2f} s)", flush=True)
    return result


# --- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="BEIR corpus.jsonl")
    parser.add_argument("--limit", type=int, default=None, help="only the first N documents")
    parser.add_argument("--order", choices=["raw-first", "e2e-first"], default="raw-first")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the JSON result file")
    parser.add_argument("--batch-documents", type=int, default=None,
                        help="override PGSAGE_INGEST_BATCH_DOCUMENTS (documents per Celery task)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the API and worker logs")
    parser.add_argument("--grouped", action="store_true",
                        help="diagnostic: also time the raw encode split as the worker splits it (per task)")
    args = parser.parse_args(argv)

    corpus = args.corpus.resolve()
    out = args.out.resolve()
    os.chdir(ROOT)  # the API and worker run here, so read the same .env
    # SIGTERM ends the run through the finally blocks: subprocesses stopped, database dropped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    redis_url = os.environ.get("PGSAGE_REDIS_URL") or os.environ.get("REDIS_URL") or DEFAULT_REDIS
    import redis

    try:
        redis.Redis.from_url(redis_url, socket_connect_timeout=5).ping()
    except redis.RedisError as exc:
        print(f"Redis at {redis_url} does not answer ({exc}); set REDIS_URL", file=sys.stderr)
        return 2

    if args.batch_documents:  # read by this process's Settings and inherited by the API and the worker
        os.environ["PGSAGE_INGEST_BATCH_DOCUMENTS"] = str(args.batch_documents)
    settings = Settings()
    data = read_corpus(corpus, args.limit)
    n_docs = sum(1 for line in data.split(b"\n") if line.strip())
    print(f"corpus {corpus} ({n_docs} documents, {len(data) / 1e6:.1f} MB), order {args.order}", flush=True)
    prep = prepare(settings, corpus.name, data)
    logs = Path(tempfile.mkdtemp(prefix="pgsage-bench-"))
    results: dict[str, Any] = {}
    probes: dict[str, list[float]] = {}
    ok = False
    try:
        for phase in (["raw", "e2e"] if args.order == "raw-first" else ["e2e", "raw"]):
            before = probe(settings, prep)
            if phase == "raw":
                results["raw"] = measure_raw(settings, prep, args.grouped)
            else:
                results["e2e"] = measure_e2e(settings, corpus.name, data, n_docs, logs, redis_url)
            probes[phase] = [before, probe(settings, prep)]
        ok = True
    finally:
        if not ok or args.keep_logs:
            print(f"logs: {logs}", file=sys.stderr)
        else:
            shutil.rmtree(logs, ignore_errors=True)

    raw, e2e = results["raw"], results["e2e"]
    if raw["chunks"] != e2e["chunks"]:
        print(f"warning: raw chunked {raw['chunks']} chunks, ingestion stored {e2e['chunks']}",
              file=sys.stderr)
    # Documents per second: the raw phase encodes chunks and sentences alike, the database counts only chunks.
    ratio = e2e["docs_per_s"] / raw["docs_per_s"]
    machine = machine_info()
    rc, ec = raw["cpu"], e2e["cpu"]
    others = {
        "raw": round(rc["machine_busy_pct"] - rc["benchmark_cpu_pct"], 1),
        "e2e": round(ec["machine_busy_pct"] - ec["worker_cpu_pct"] - ec["api_cpu_pct"], 1),
    }
    speeds = [v for pair in probes.values() for v in pair]
    drift_pct = round(100 * (max(speeds) / min(speeds) - 1), 1)
    quiet = all(v <= NOISE_PCT for v in others.values()) and drift_pct <= DRIFT_PCT
    report = {
        "benchmark": "ingest_speed",
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "corpus": str(corpus),
        "limit": args.limit,
        "order": args.order,
        "settings": {
            "embedding_model": settings.embedding_model,
            "embedding_batch_size": settings.embedding_batch_size,
            "chunk_max_tokens": settings.chunk_max_tokens,
            "chunk_overlap_tokens": settings.chunk_overlap_tokens,
            "ingest_batch_documents": e2e["batch_documents"],
            "worker_concurrency": 1,
        },
        "machine": machine,
        "raw": raw,
        "e2e": e2e,
        "ratio": round(ratio, 4),
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio >= TARGET_RATIO,
        "other_processes_cpu_pct": others,
        "probe_chunks_per_s": probes,
        "probe_drift_pct": drift_pct,
        "quiet": quiet,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")

    print()
    print(f"machine     {machine['nproc']} CPUs ({machine['cpu_model']}), torch {machine['torch_version']} "
          f"with {machine['torch_threads']} threads")
    print(f"corpus      {n_docs} documents, {raw['chunks']} chunks ({raw['word_pieces']} word pieces)")
    print(f"raw encode  {raw['chunks_per_s']:8.2f} chunks/s {raw['docs_per_s']:8.2f} docs/s "
          f"{raw['encode_seconds']:8.1f} s   machine busy {raw['cpu']['machine_busy_pct']}%, "
          f"benchmark {raw['cpu']['benchmark_cpu_pct']}%")
    print(f"end-to-end  {e2e['chunks_per_s']:8.2f} chunks/s {e2e['docs_per_s']:8.2f} docs/s "
          f"{e2e['seconds']:8.1f} s   machine busy {e2e['cpu']['machine_busy_pct']}%, "
          f"worker {e2e['cpu']['worker_cpu_pct']}%, api {e2e['cpu']['api_cpu_pct']}%")
    ws = e2e["worker_seconds"]
    if "embed" in ws:
        print(f"worker      {e2e['tasks']} tasks: {ws['in_tasks']:.1f} s in tasks (load {ws['load']:.1f}, "
              f"chunk {ws['chunk']:.1f}, embed {ws['embed']:.1f}, store {ws['store']:.1f}), "
              f"{ws['outside_tasks']:.1f} s outside")
    if "grouped" in raw:
        grouped = raw["grouped"]
        print(f"raw grouped {grouped['chunks_per_s']:8.2f} chunks/s as {grouped['calls']} encode calls "
              f"of {grouped['documents_per_call']} documents")
    print(f"ratio       {ratio:.3f} (end-to-end / raw; target >= {TARGET_RATIO}) "
          f"{'OK' if ratio >= TARGET_RATIO else 'BELOW TARGET'}")
    print(f"probe       {PROBE_CHUNKS} chunks before/after each phase: "
          + ", ".join(f"{k} {v[0]}/{v[1]} chunks/s" for k, v in probes.items()) + f" (spread {drift_pct}%)")
    if not quiet:
        print(f"WARNING     the machine was not quiet: other processes used {others['raw']}% (raw) and "
              f"{others['e2e']}% (end-to-end, Postgres included) of the CPUs, and the probe's speed "
              f"varied by {drift_pct}%; the ratio is not reliable")
    print(f"result      {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

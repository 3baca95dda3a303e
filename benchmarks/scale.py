"""Scale: one collection grown to 10 thousand, 100 thousand and 1 million chunks, measured at each size.

The chunks are written through the store path ingestion uses (app.ingest.store: the documents' upsert under
a job, then groups of about 128 chunks' documents, each in one transaction, on two writer threads, as the worker
does: COPY of chunks,
of chunk vectors into the space's HNSW index, of sentence vectors, the BM25 postings of chunks and of the
document with their maintained statistics; the statistics compaction and ANALYZE after each batch). No model
is in the loop, but the data is real:

- text: each chunk recombines the sentences of a real chunk of SciFact or SQuAD-articles (chunked by the
  service's chunker) with about a third of its sentences swapped for those of another real chunk;
- vectors: the same mix of the two chunks' real vectors (embedded once by the configured model, cached),
  plus noise, renormalised; each sentence vector is its source chunk's vector plus more noise;
- documents carry 1 to 3 chunks and a `shard` in their metadata (1 in 20: the 5% filter).

At each size, over real questions (SciFact train queries and SQuAD-articles questions):
- store rate (chunks/s) of the step that reached the size; HNSW build time (the space's index built again
  beside it, same definition), sizes on disk (tables with their indexes, and the HNSW index alone, which is
  what must stay in memory for fast dense search);
- search p50/p95 for hybrid, dense and lexical passage search (QueryPipeline.search in process; the query
  vectors cached first, so the embedding is excluded; one embedding is timed apart);
- HNSW recall@10 against an exact scan at the default ef_search, and a hybrid search with the 5% filter
  (p50/p95, and whether it returned k results).

    pip install -e '.[bench]'        # matplotlib, for the plot
    python benchmarks/scale.py                              # 10k, 100k, 1M (hours at 1M on 2 cores)
    python benchmarks/scale.py --sizes 10000 100000         # a quicker run
    python benchmarks/scale.py --keep DIR --measure-kept --out X.json  # measure a kept collection with this code
    python benchmarks/scale.py --bulk-above 10000           # steps past 10k loaded as a bulk load is

With --bulk-above N, a step that grows the collection past N chunks is written as a bulk load or a re-index
writes (pgvector's advice for loading many vectors): the space's HNSW index is dropped, all but the step's last
--store-sample chunks go through the same store path with no HNSW index to insert into, the index is then built
with the space's own definition (that build is the size's HNSW build time), and the last --store-sample chunks
are written with the index in place: their rate is the store rate reported, what ingestion sees at that size.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
from sqlalchemy import text  # noqa: E402

from app.config import Settings  # noqa: E402
from app.db.session import make_engine, make_sessionmaker, session_scope  # noqa: E402
from app.embedding import EmbedderPool, chunker_key  # noqa: E402
from app.eval.beir import load_queries  # noqa: E402
from app.ingest import store  # noqa: E402
from app.ingest.chunk import ChunkSpan  # noqa: E402
from app.ingest.embed import Embedded  # noqa: E402
from app.ingest.load import LoadedDocument, load_upload  # noqa: E402
from app.ingest.pipeline import EMBED_GROUP_CHUNKS, chunker_for  # noqa: E402
from app.query import retrieve  # noqa: E402
from app.query.pipeline import QueryPipeline, SearchRequest  # noqa: E402
from app.reindex import spaces  # noqa: E402
from app.reindex.plan import plan  # noqa: E402
from benchmarks.hnsw_recall import as_index_type, measure_recall  # noqa: E402
from benchmarks.ingest_speed import machine_info  # noqa: E402
from tests.fixtures.services import migrate, postgres_server, scratch_database  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "scale.json"
COLLECTION = "scale"
BATCH_DOCUMENTS = 2000
WRITERS = 2  # the worker's store threads
SHARDS = 20  # metadata shard s0..s19: one shard is the 5% filter
K = 10
TABLES = ("documents", "chunks", "chunk_vectors", "sentence_vectors", "chunk_postings", "lexical_postings",
          "document_vectors")


@dataclass
class Base:
    """Real chunks (texts split in sentences) and their real vectors."""

    sentences: list[list[str]]
    titles: list[str]
    vectors: np.ndarray


def base_material(settings: Settings, embedders: EmbedderPool, cache: Path, limit: int | None) -> Base:
    embedder = embedders.configured
    chunker = chunker_for(embedder)
    docs: list[LoadedDocument] = []
    corpus = (DATA / "scifact" / "corpus.jsonl").read_bytes()
    docs += load_upload("corpus.jsonl", None, corpus, len(corpus) + 1)
    for path in sorted((DATA / "squad-articles" / "corpus").glob("*.md")):
        data = path.read_bytes()
        docs += load_upload(path.name, None, data, len(data) + 1)
    if limit:
        docs = docs[:limit]
    sentences, titles, texts = [], [], []
    for doc in docs:
        for chunk in chunker.split(doc.content, kind=doc.format, title=doc.title):
            parts = [chunk.text[s:e] for s, e in chunk.sentences] or [chunk.text]
            sentences.append(parts)
            titles.append(chunk.heading_path[0] if chunk.heading_path else (doc.title or ""))
            texts.append(chunk.embed_text)
    key = f"{embedder.spec.fingerprint[:16]}-{len(texts)}"
    path = cache / f"scale-base-{key}.npy"
    if path.exists():
        vectors = np.load(path)
    else:
        print(f"embedding {len(texts)} real chunks once (cached in {path}) ...", flush=True)
        t = time.perf_counter()
        vectors = embedder.encode(texts)
        print(f"  {len(texts) / (time.perf_counter() - t):.0f} chunks/s", flush=True)
        cache.mkdir(parents=True, exist_ok=True)
        np.save(path, vectors)
    return Base(sentences, titles, vectors.astype(np.float32))


def _unit(m: np.ndarray) -> np.ndarray:
    return (m / np.linalg.norm(m, axis=-1, keepdims=True)).astype(np.float32)


class Synthesizer:
    """Documents of recombined real chunks, with vectors mixed from the real ones (see the module)."""

    def __init__(self, base: Base, seed: int = 7) -> None:
        self.base = base
        self.rng = random.Random(seed)
        self.np = np.random.default_rng(seed)
        self.dim = base.vectors.shape[1]

    def chunk(self, ordinal: int, at: int, title: str) -> tuple[ChunkSpan, np.ndarray, np.ndarray]:
        n = len(self.base.sentences)
        b, c = self.rng.randrange(n), self.rng.randrange(n)
        own, other = self.base.sentences[b], self.base.sentences[c]
        picked: list[tuple[str, int]] = []
        for i, s in enumerate(own):
            if other and self.rng.random() < 0.33:
                picked.append((other[i % len(other)], c))
            else:
                picked.append((s, b))
        body, spans, pos = [], [], 0
        for s, _ in picked:
            spans.append((pos, pos + len(s)))
            body.append(s)
            pos += len(s) + 1
        chunk_text = " ".join(body)
        share = sum(1 for _, src in picked if src == c) / len(picked)
        mixed = (1 - share) * self.base.vectors[b] + share * self.base.vectors[c]
        vector = _unit(mixed + self.np.normal(0, 0.15 / np.sqrt(self.dim), self.dim))
        sources = np.stack([self.base.vectors[src] for _, src in picked])
        noise = self.np.normal(0, 0.35 / np.sqrt(self.dim), sources.shape)
        span = ChunkSpan(ordinal, chunk_text, max(1, len(chunk_text) // 4), at, at + len(chunk_text), (title,),
                         sentences=tuple(spans))
        return span, vector, _unit(sources + noise)

    def document(self, i: int) -> tuple[LoadedDocument, list[ChunkSpan], Embedded]:
        title = f"{self.base.titles[self.rng.randrange(len(self.base.titles))]} ({i})"
        spans, vectors, sentence_rows, at = [], [], [], 0
        for ordinal in range(self.rng.choice((1, 2, 2, 3))):
            span, vec, sents = self.chunk(ordinal, at, title)
            spans.append(span)
            vectors.append(vec)
            sentence_rows.append(sents)
            at = span.char_end + 2
        content = "\n\n".join(s.text for s in spans)
        doc = LoadedDocument(f"scale-{i}", title, content, metadata={"shard": f"s{i % SHARDS}"})
        return doc, spans, Embedded(np.stack(vectors), np.concatenate(sentence_rows))


def grow(factory: Any, synth: Synthesizer, space_id: int, chunker: str, cid: int, start_doc: int,
         chunks_wanted: int) -> tuple[int, int, float]:
    """Write documents from start_doc on until chunks_wanted more chunks are stored; (docs, chunks, seconds)."""
    docs_written = chunks_written = 0
    seconds = 0.0
    i = start_doc
    with ThreadPoolExecutor(WRITERS) as writers:
        while chunks_written < chunks_wanted:
            batch = []
            while len(batch) < BATCH_DOCUMENTS and chunks_written + sum(len(s) for _, s, _ in batch) < chunks_wanted:
                batch.append(synth.document(i))
                i += 1
            t = time.perf_counter()
            with session_scope(factory) as session:
                job = store.create_job(session, "ingest", cid, {"source": "benchmarks/scale.py"})
                queued = store.upsert_documents(session, cid, [d for d, _, _ in batch], job).queued
                pending = {p.content_hash: p for p in store.pending_documents(session, queued)}

            def write(group: list[tuple[store.PendingDocument, list[ChunkSpan], Embedded]]) -> None:
                with session_scope(factory) as session:
                    written = store.write_documents(session, [
                        store.DocumentWrite(doc, [store.ChunkSet(chunker, spans, {space_id: embedded})])
                        for doc, spans, embedded in group])
                assert all(written.values())

            # Groups of about EMBED_GROUP_CHUNKS chunks, one transaction each, as the worker writes them.
            groups: list[list[tuple[store.PendingDocument, list[ChunkSpan], Embedded]]] = [[]]
            for d, s, e in batch:
                if groups[-1] and sum(len(g[1]) for g in groups[-1]) + len(s) > EMBED_GROUP_CHUNKS:
                    groups.append([])
                groups[-1].append((pending[d.content_hash], s, e))
            list(writers.map(write, groups))
            with session_scope(factory) as session:
                store.compact_lexical_statistics(session)
            with session_scope(factory) as session:
                store.analyze_grown(session)
            seconds += time.perf_counter() - t
            docs_written += len(batch)
            chunks_written += sum(len(s) for _, s, _ in batch)
            print(f"  {chunks_written}/{chunks_wanted} chunks, {chunks_written / seconds:.0f} chunks/s",
                  end="\r", flush=True)
    print()
    return docs_written, chunks_written, seconds


def _count_chunks(factory: Any, cid: int) -> int:
    with session_scope(factory) as session:
        return session.execute(text("SELECT count(*) FROM chunks WHERE collection_id = :c"), {"c": cid}).scalar_one()


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _summary(times: list[float]) -> dict[str, float]:
    return {"p50_ms": round(statistics.median(times), 2), "p95_ms": round(_pct(times, 0.95), 2)}


def build_space_index(engine: Any, space: Any, settings: Settings, name: str | None = None, kind: str | None = None,
                      graph: spaces.HnswGraph | None = None) -> float:
    """Build the space's HNSW index (under its own name, or `name` beside it, of another vector type or graph) as
    a re-index builds it; seconds."""
    ddl = spaces.index_statement("chunk_vectors", space.id, int(space.dimension), kind or space.index_type,
                                 graph=graph or spaces.HnswGraph.of(settings), name=name)
    t = time.perf_counter()
    with engine.connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        spaces.build_memory(conn, settings.hnsw_build_memory)
        conn.execute(text(ddl))
        conn.execute(text("RESET maintenance_work_mem"))
    return time.perf_counter() - t


def bulk_grow(engine: Any, factory: Any, synth: Synthesizer, space: Any, settings: Settings, chunker: str,
              cid: int, start_doc: int, chunks_wanted: int, sample: int) -> tuple[int, int, float, float]:
    """Grow by chunks_wanted as a bulk load: index dropped, all but `sample` chunks written, index built, the
    sample written with the index in place; (docs, sample chunks, their seconds, index build seconds)."""
    index = spaces.index_name("chunk_vectors", space.id)
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text(f"DROP INDEX {index}"))
    docs, _, _ = grow(factory, synth, space.id, chunker, cid, start_doc, chunks_wanted - sample)
    print("  building the space's HNSW index ...", flush=True)
    build_s = build_space_index(engine, space, settings)
    more, chunks, seconds = grow(factory, synth, space.id, chunker, cid, start_doc + docs, sample)
    return docs + more, chunks, seconds, build_s


def measure(engine: Any, factory: Any, pipeline: QueryPipeline, space: Any, cid: int, queries: list[str],
            vectors: np.ndarray, settings: Settings, build_index: bool,
            other_index_types: tuple[str, ...] = (), ef_searches: tuple[int, ...] = ()) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with engine.connect() as conn:  # settled statistics and visibility map, as autovacuum leaves a table
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        for table in TABLES:
            conn.execute(text(f"VACUUM (ANALYZE) {table}"))
    with session_scope(factory) as session:
        sizes = {t: session.execute(text("SELECT pg_total_relation_size(CAST(:t AS regclass))"), {"t": t}).scalar_one()
                 for t in TABLES}
        index = spaces.index_name("chunk_vectors", space.id)
        hnsw = session.execute(text("SELECT pg_relation_size(CAST(:n AS regclass))"), {"n": index}).scalar_one()
        out["chunks"] = session.execute(text("SELECT count(*) FROM chunks WHERE collection_id = :c"),
                                        {"c": cid}).scalar_one()
    out["sizes_mib"] = {t: round(b / 2**20, 1) for t, b in sizes.items()}
    out["sizes_mib"]["hnsw_index"] = round(hnsw / 2**20, 1)
    out["sizes_mib"]["total"] = round(sum(sizes.values()) / 2**20, 1)
    if build_index:
        name = f"{index}_scale_build"
        out["hnsw_build_s"] = round(build_space_index(engine, space, settings, name), 1)
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(text(f"DROP INDEX {name}"))
    # Searches, the query embedding excluded: each query's vector is cached by a first, untimed pass, which also
    # brings the pages each measured search reads into the cache (the filtered one too: cold, it read ~3x longer).
    for q in queries:
        with session_scope(factory) as session:
            pipeline.search(session, SearchRequest(q, K, COLLECTION, group="passage"))
            pipeline.search(session, SearchRequest(q, K, COLLECTION, filters={"shard": "s0"}, group="passage"))
    for mode in ("hybrid", "dense", "lexical"):
        times = []
        for q in queries:
            with session_scope(factory) as session:
                t = time.perf_counter()
                pipeline.search(session, SearchRequest(q, K, COLLECTION, overrides={"mode": mode}, group="passage"))
                times.append((time.perf_counter() - t) * 1000)
        out[mode] = _summary(times)
    times, full = [], 0
    for q in queries:
        with session_scope(factory) as session:
            t = time.perf_counter()
            result = pipeline.search(session, SearchRequest(q, K, COLLECTION, filters={"shard": "s0"}, group="passage"))
            times.append((time.perf_counter() - t) * 1000)
            full += len(result.hits) == K
    out["hybrid_filtered_5pct"] = {**_summary(times), "returned_k": round(full / len(queries), 4)}
    # HNSW recall@10 against an exact scan of the same rows.
    dim, mid = int(space.dimension), int(space.id)
    exact_ms, truths = [], []
    with session_scope(factory) as session:
        for vec in vectors:
            literal = retrieve.vector_literal(vec)
            session.execute(text("SET LOCAL enable_indexscan = off"))
            session.execute(text("SET LOCAL enable_bitmapscan = off"))
            t = time.perf_counter()
            truth = set(session.execute(text(f"""
                SELECT chunk_id FROM chunk_vectors WHERE model_id = {mid} AND collection_id = :c
                 ORDER BY (embedding::vector({dim})) <=> CAST(:q AS vector({dim})) LIMIT {K}"""),
                {"c": cid, "q": literal}).scalars().all())
            exact_ms.append((time.perf_counter() - t) * 1000)
            truths.append(truth)
            session.execute(text("RESET enable_indexscan"))
            session.execute(text("RESET enable_bitmapscan"))
    recalls, _ = measure_recall(factory, space, vectors, truths, cid, settings.hnsw_ef_search,
                                settings.hnsw_max_scan_tuples)
    out["recall_at_10"] = round(statistics.fmean(recalls), 4)
    out["exact_scan_ms_p50"] = round(statistics.median(exact_ms), 1)
    sweep: dict[str, Any] = {}
    for ef in ef_searches:  # what other ef_search values buy, for choosing the default
        hits_recall, times = measure_recall(factory, space, vectors, truths, cid, ef, settings.hnsw_max_scan_tuples)
        sweep[str(ef)] = {"recall_at_10": round(statistics.fmean(hits_recall), 4), "dense_leg": _summary(times)}
    out["ef_search"] = sweep
    for kind in other_index_types:
        out[kind] = other_index(engine, factory, space, cid, vectors, truths, kind, settings)
    return out


def other_index(engine: Any, factory: Any, space: Any, cid: int, vectors: np.ndarray, truths: list[set[int]],
                kind: str, settings: Settings) -> dict[str, Any]:
    """An HNSW index of another type (halfvec) built beside the space's own, as a space of that type gets it:
    its build time, size and recall@10 against the same exact top 10; dropped after. `kind` may name the graph's
    m too ("halfvec:m=13"); else the configured m."""
    index = spaces.index_name("chunk_vectors", space.id)
    vector_type, _, option = kind.partition(":m=")
    graph = spaces.HnswGraph.of(settings)
    if option:
        graph = spaces.HnswGraph(int(option), graph.ef_construction)
    m = graph.links(vector_type, int(space.dimension))
    name = f"{index}_{vector_type}_m{m}"
    build_s = build_space_index(engine, space, settings, name, vector_type, graph)
    with session_scope(factory) as session:
        size = session.execute(text("SELECT pg_relation_size(CAST(:n AS regclass))"), {"n": name}).scalar_one()
    recalls, times = measure_recall(factory, as_index_type(space, vector_type), vectors, truths, cid,
                                    settings.hnsw_ef_search, settings.hnsw_max_scan_tuples)
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text(f"DROP INDEX {name}"))
    return {"index_mib": round(size / 2**20, 1), "build_s": round(build_s, 1), "m": m,
            "recall_at_10": round(statistics.fmean(recalls), 4), "dense_leg": _summary(times)}


def questions(n: int, seed: int = 11) -> list[str]:
    scifact = list(load_queries(DATA / "scifact").values())
    squad = [json.loads(line)["question"] for line in
             (DATA / "squad-articles" / "questions-dev.jsonl").read_text().splitlines() if line.strip()]
    rng = random.Random(seed)
    return rng.sample(scifact, n // 2) + rng.sample(squad, n - n // 2)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["chunks"] for r in results]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label in (("hybrid", "hybrid"), ("dense", "dense"), ("lexical", "lexical"),
                       ("hybrid_filtered_5pct", "hybrid, 5% filter")):
        ax.plot(sizes, [r[key]["p95_ms"] for r in results], marker="o", label=f"{label} p95")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("chunks in the collection")
    ax.set_ylabel("search latency, ms (query embedding excluded)")
    ax.set_title("pgsage search latency against collection size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def open_collection(stack: contextlib.ExitStack, db_url: str, cache: Path, pool_size: int) -> tuple[Any, ...]:
    """The database migrated, the configured model's space active and the benchmark's collection made: settings,
    engine (disposed with the stack), session factory, embedders, space and collection id."""
    migrate(db_url)
    settings = Settings(database_url=db_url, data_dir=cache / "data")
    engine = make_engine(settings, pool_size=pool_size)
    stack.callback(engine.dispose)
    factory = make_sessionmaker(engine)
    embedders = EmbedderPool(settings)
    with session_scope(factory) as session:
        plan(session, embedders.configured.spec, graph=spaces.HnswGraph.of(settings))
        space = spaces.active(session)
        assert space is not None
        cid = store.collection_id(session, COLLECTION, create=True)
        session.expunge(space)
    return settings, engine, factory, embedders, space, cid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--build-index-up-to", type=int, default=1_000_000,
                        help="measure the HNSW build time at sizes up to this many chunks")
    parser.add_argument("--index-types", nargs="*", default=["halfvec"],
                        help="HNSW index types to build beside the space's own at each size, for size and recall: "
                             "halfvec or vector, optionally with the graph's m (halfvec:m=13)")
    parser.add_argument("--ef-search", type=int, nargs="*", default=[40, 100, 200, 400],
                        help="ef_search values whose recall@10 and dense-leg latency are measured at each size")
    parser.add_argument("--bulk-above", type=int, default=None,
                        help="grow steps past this many chunks as a bulk load: HNSW index dropped, rebuilt, a sample "
                             "of the step written with it in place for the store rate")
    parser.add_argument("--store-sample", type=int, default=4000,
                        help="chunks written with the index in place at the end of a bulk step (its store rate)")
    parser.add_argument("--base-documents", type=int, default=None, help="use only this many real documents")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", "/tmp")) / "pgsage")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--keep", type=Path, default=None,
                        help="build in an embedded server under this new directory and keep it (stopped) after")
    parser.add_argument("--measure-kept", action="store_true",
                        help="measure the collection a run kept in --keep as it is, with this code (nothing grown)")
    args = parser.parse_args(argv)
    sizes = sorted(args.sizes)
    if args.measure_kept and not args.keep:
        parser.error("--measure-kept needs --keep")
    result: dict[str, Any] = {"benchmark": "scale", "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
                              "machine": machine_info(), "queries": args.queries, "sizes": []}
    with contextlib.ExitStack() as stack:
        if args.keep:  # an embedded server of its own that outlives the run, for looking into the results
            from app.embedded import embedded_database_url, stop_embedded_database

            if (args.keep / "pg").exists() != args.measure_kept:
                parser.error(f"{args.keep} already holds a database; give a new directory" if not args.measure_kept
                             else f"{args.keep} holds no database to measure")
            db_url = embedded_database_url(args.keep)
            stack.callback(stop_embedded_database, args.keep)
        else:
            server = stack.enter_context(postgres_server())
            db_url = stack.enter_context(scratch_database(server))
        settings, engine, factory, embedders, space, cid = open_collection(stack, db_url, args.cache, WRITERS + 1)
        chunker = chunker_key(space.params or {})
        pipeline = QueryPipeline(settings, embedders, None)
        qs = questions(args.queries)
        t = time.perf_counter()
        vectors = embedders.configured.encode(qs, batch_size=1)
        result["query_embedding_ms_mean"] = round((time.perf_counter() - t) * 1000 / len(qs), 2)
        print(f"one query embedding: {result['query_embedding_ms_mean']} ms (mean of {len(qs)})", flush=True)
        others = tuple(k for k in args.index_types if k.partition(":")[0] != space.index_type)
        if args.measure_kept:
            print("measuring the kept collection ...", flush=True)
            row = {"size": None, "measured_kept": True,
                   **measure(engine, factory, pipeline, space, cid, qs, vectors, settings, False,
                             others, tuple(args.ef_search))}
            row["size"] = row["chunks"]
            result["sizes"].append(row)
            print(json.dumps(row), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")
            return 0
        base = base_material(settings, embedders, args.cache, args.base_documents)
        print(f"base: {len(base.sentences)} real chunks", flush=True)
        synth = Synthesizer(base)
        have, next_doc = 0, 0
        for size in sizes:
            print(f"[{size}] growing the collection from {have} chunks ...", flush=True)
            bulk = args.bulk_above is not None and size > args.bulk_above and size - have > args.store_sample
            row: dict[str, Any] = {"size": size}
            t = time.perf_counter()
            if bulk:
                docs, chunks, seconds, build_s = bulk_grow(engine, factory, synth, space, settings, chunker, cid,
                                                           next_doc, size - have, args.store_sample)
                row.update(bulk_load=True, hnsw_build_s=round(build_s, 1), store_sample_chunks=chunks)
            else:
                docs, chunks, seconds = grow(factory, synth, space.id, chunker, cid, next_doc, size - have)
            row["grow_s"] = round(time.perf_counter() - t, 1)
            next_doc += docs
            have = int(_count_chunks(factory, cid))
            print(f"[{size}] measuring ...", flush=True)
            row.update({"store_chunks_per_s": round(chunks / seconds, 1), "store_s": round(seconds, 1),
                   **measure(engine, factory, pipeline, space, cid, qs, vectors, settings,
                             size <= args.build_index_up_to and not bulk,
                             others, tuple(args.ef_search))})
            result["sizes"].append(row)
            print(json.dumps(row), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")  # after each size: a long run keeps its parts
    plot(result["sizes"], args.out.with_suffix(".png"))
    print(f"\n{'chunks':>9} {'store/s':>8} {'build s':>8} {'HNSW MiB':>9} {'total MiB':>10} {'hybrid p50/p95':>15} "
          f"{'dense p50/p95':>14} {'lexical p50/p95':>16} {'5% filter p95, k':>17} {'recall@10':>9}")
    for r in result["sizes"]:
        f = r["hybrid_filtered_5pct"]
        print(f"{r['chunks']:>9} {r['store_chunks_per_s']:>8} {r.get('hnsw_build_s', '-'):>8} "
              f"{r['sizes_mib']['hnsw_index']:>9} {r['sizes_mib']['total']:>10} "
              f"{r['hybrid']['p50_ms']:>7}/{r['hybrid']['p95_ms']:<7} "
              f"{r['dense']['p50_ms']:>6}/{r['dense']['p95_ms']:<7} "
              f"{r['lexical']['p50_ms']:>7}/{r['lexical']['p95_ms']:<8} {f['p95_ms']:>9}, {f['returned_k']:<6} "
              f"{r['recall_at_10']:>9}")
    for r in result["sizes"]:
        for kind in args.index_types:
            if kind in r:
                h = r[kind]
                kind = f"{kind} (m {h.get('m', '?')})"
                print(f"{r['chunks']:>9} {kind} index: {h['index_mib']} MiB "
                      f"({h['index_mib'] / max(r['sizes_mib']['hnsw_index'], 1e-9):.2f} of the space's), built in "
                      f"{h['build_s']} s, recall@10 {h['recall_at_10']} (space's: {r['recall_at_10']}), "
                      f"dense leg p95 {h['dense_leg']['p95_ms']} ms")
    for r in result["sizes"]:
        cells = [f"{ef}: recall {v['recall_at_10']} dense leg p95 {v['dense_leg']['p95_ms']} ms"
                 for ef, v in r["ef_search"].items()]
        print(f"{r['chunks']:>9} ef_search: " + ", ".join(cells))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

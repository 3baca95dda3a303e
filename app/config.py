"""One Settings class, read from PGSAGE_* environment variables and an optional .env file."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "all-MiniLM-L6-v2"


class Settings(BaseSettings):
    """Every configurable knob of pgsage; each key is documented in .env.example."""

    model_config = SettingsConfigDict(env_prefix="PGSAGE_", env_file=".env", env_file_encoding="utf-8", extra="ignore")

    # External services. Unset means the embedded default (pgserver + a file-system broker).
    database_url: str | None = Field(default=None, validation_alias=AliasChoices("PGSAGE_DATABASE_URL", "DATABASE_URL"))
    redis_url: str | None = Field(default=None, validation_alias=AliasChoices("PGSAGE_REDIS_URL", "REDIS_URL"))
    # A streaming replica of the database for searches and answers (writes, jobs and key checks stay on the
    # primary). A read waits up to read_replica_wait_ms for the replica to replay what the primary had
    # committed when the request began, else reads the primary; an unreachable replica is retried after
    # read_replica_retry_seconds.
    database_read_url: str | None = None
    read_replica_wait_ms: int = Field(default=50, ge=0, le=10_000)
    read_replica_retry_seconds: float = Field(default=10.0, gt=0)
    data_dir: Path = Path(".pgsage")

    # Embedding model and chunking: together they make the model fingerprint.
    embedding_model: str = DEFAULT_MODEL
    embedding_revision: str | None = None
    embedding_pooling: Literal["mean", "cls", "max"] | None = None
    embedding_normalize: bool = True
    embedding_dimension: int | None = Field(default=None, ge=8, le=4096)
    embedding_batch_size: int = Field(default=32, ge=1, le=1024)
    embedding_device: str = "cpu"
    # What runs the model: torch, or onnxruntime on an ONNX file exported from the model on first use and
    # cached under data_dir (onnx: float32; onnx-int8: dynamically quantised for the CPU). The backend and
    # the file's hash are part of the fingerprint, so a change re-indexes like any model change. onnx-int8 by
    # measurement: 2.3x torch's encode rate, 4x its query speed, SciFact nDCG@10 and squad-articles passage
    # hit@5 within 0.005 of torch's (benchmarks/embedding_backends.py, BENCHMARKS.md).
    embedding_backend: Literal["torch", "onnx", "onnx-int8"] = "onnx-int8"
    # The int8 file's instruction set; auto reads this CPU's. Pin it when API and workers run on different CPUs.
    embedding_quantization: Literal["auto", "avx2", "avx512", "avx512_vnni", "arm64"] = "auto"
    chunk_max_tokens: int = Field(default=256, ge=16, le=8192)
    chunk_overlap_tokens: int = Field(default=32, ge=0)

    # Ingestion.
    max_upload_bytes: int = Field(default=50 * 1024 * 1024, ge=1024)
    # Every upload (and a document sent as JSON) is parsed in a child process within these (a 413 beyond them).
    parse_memory_mb: int = Field(default=768, ge=64)
    parse_seconds: float = Field(default=60.0, gt=0)
    pdf_max_pages: int = Field(default=5000, ge=1)
    # The text one upload may yield, and per byte of it: beyond either, a 413 naming the setting before anything
    # is stored (a 125 KB DOCX can hold 60 million characters; a CSV repeats its column names in every record).
    max_document_chars: int = Field(default=20_000_000, ge=1000)
    max_expansion_ratio: float = Field(default=100.0, gt=0)
    # What extracts a PDF's text: pdfium (pypdfium2), pypdf or pdfplumber (pdfminer.six, tables as rows).
    # Chosen by measurement on real filings (BENCHMARKS.md, PDF libraries): pdfium is 20x faster than pypdf and
    # keeps a table's row on one line.
    pdf_library: Literal["pypdf", "pdfium", "pdfplumber"] = "pdfium"
    max_documents_per_request: int = Field(default=10_000, ge=1)
    ingest_batch_documents: int = Field(default=256, ge=1, le=10_000)
    ingest_stall_minutes: int = Field(default=15, ge=1)
    # A deleted collection's documents go this many per transaction (short locks, steady progress).
    delete_batch_documents: int = Field(default=500, ge=1, le=100_000)
    # A worker's claim on a document lasts this long; a document whose worker died is sent again after it.
    ingest_lease_seconds: int = Field(default=900, ge=5)
    # A document that kills its worker this many times (a crash, a time limit) fails with its error.
    ingest_max_attempts: int = Field(default=3, ge=1, le=100)
    # Hard limit on one ingest task (a batch of documents); the worker process running it is replaced.
    ingest_task_time_limit: int = Field(default=3600, ge=5)

    # Model lifecycle (re-indexing when the embedding model changes).
    reindex_batch_chunks: int = Field(default=256, ge=1, le=10_000)
    reindex_retention_hours: float = Field(default=24.0, ge=0)
    reindex_check_seconds: float = Field(default=60.0, ge=5)
    reindex_stale_seconds: float = Field(default=120.0, ge=10)
    # Optional quality gate: a BEIR folder (queries.jsonl, qrels/<split>.tsv) whose corpus is ingested in
    # a collection; the switch happens only if the new space's nDCG@10 is within the margin of the old one's.
    reindex_eval_dir: Path | None = None
    reindex_eval_split: str = "test"
    reindex_eval_collection: str = "eval"
    reindex_eval_margin: float = Field(default=0.01, ge=0, le=1)
    reindex_eval_max_queries: int = Field(default=300, ge=1)

    # Retrieval: dense (HNSW over chunk vectors) and lexical (BM25) legs, fused, then reranked.
    search_mode: Literal["hybrid", "dense", "lexical"] = "hybrid"
    # passage: the k best chunks (several per document allowed); document: one result per document.
    search_group: Literal["passage", "document"] = "passage"
    search_candidates: int = Field(default=100, ge=1, le=1000)
    # Defaults chosen on the SciFact train split (benchmarks/retrieval_tuning.py, BENCHMARKS.md).
    search_fusion: Literal["zscore", "convex", "rrf"] = "zscore"
    search_dense_weight: float = Field(default=0.5, ge=0, le=1)
    search_document_weight: float = Field(default=0.5, ge=0, le=10)
    # Passage ranking (chosen on the squad-articles dev questions, BENCHMARKS.md): the dense leg's share
    # beside BM25, the weight of the passage's document (its vector and BM25), and of its best sentence.
    passage_dense_weight: float = Field(default=0.35, ge=0, le=1)
    passage_document_weight: float = Field(default=0.25, ge=0, le=10)
    passage_sentence_weight: float = Field(default=1.0, ge=0, le=10)
    # ... and of the question's terms in its document's title (IDF-weighted), a field of its own: which of a
    # company's filings (or a product's manuals) is about the year or version asked (BENCHMARKS.md, issue 15).
    passage_title_weight: float = Field(default=0.5, ge=0, le=10)
    # The passage lexical leg reads each query term's best this-many postings (by BM25 term weight), not all of
    # them, so its cost follows the question and not the collection; 0 reads every posting (exact BM25 top n).
    lexical_depth: int = Field(default=4000, ge=0, le=1_000_000)
    bm25_k1: float = Field(default=0.9, ge=0, le=10)
    bm25_b: float = Field(default=0.4, ge=0, le=1)
    rerank: str = "none"
    rerank_depth: int = Field(default=30, ge=1, le=1000)
    prf_docs: int = Field(default=3, ge=1, le=100)
    prf_beta: float = Field(default=0.5, ge=0, le=10)

    # HNSW and answers.
    # The HNSW index's vector type: vector (float32) or halfvec (float16: half the index's size and memory).
    # The stored vectors stay float32, so every exact signal keeps full precision. Part of the model's
    # fingerprint: changing it builds a new space through the re-index, with zero downtime.
    vector_index_type: Literal["vector", "halfvec"] = "vector"
    # HNSW graph quality (pgvector's defaults are m 16, ef_construction 64). At a million chunks ef_construction
    # 256 with ef_search 200 reaches recall@10 0.95 where 64 / 100 gives 0.80 (BENCHMARKS.md, issue 14); the
    # build takes about 3.6x as long. Applies to indexes built from now on (new spaces, re-indexes).
    # m unset: pgvector's 16, or fewer where that fits more elements to an index page (a 384-d halfvec index:
    # 13, 8 elements to a page instead of 7; spaces.default_m).
    hnsw_m: int | None = Field(default=None, ge=2, le=100)
    hnsw_ef_construction: int = Field(default=256, ge=4, le=1000)
    hnsw_ef_search: int = Field(default=200, ge=1, le=1000)
    hnsw_max_scan_tuples: int = Field(default=20_000, ge=100)
    # Postgres's maintenance_work_mem while an HNSW index is built (a re-index's new space): pgvector builds in
    # memory while the graph fits, and much more slowly on disk after (about 2.2 GB for a million 384-d vectors).
    hnsw_build_memory: str = Field(default="1GB", pattern=r"^[1-9][0-9]{0,6}(kB|MB|GB)$")
    search_max_k: int = Field(default=100, ge=1, le=1000)
    max_query_chars: int = Field(default=2000, ge=16)
    answer_min_score: float = Field(default=0.30, ge=-1.0, le=1.0)
    # The extractive answer quotes at most this many sentences, and a second one only while the answer
    # stays within answer_max_words words.
    answer_max_sentences: int = Field(default=2, ge=1, le=20)
    answer_max_words: int = Field(default=60, ge=5, le=1000)

    # When set, GET /metrics needs `Authorization: Bearer <this>` (Prometheus: `authorization.credentials`).
    metrics_token: SecretStr | None = None

    # Optional OpenAI-compatible LLM for generated answers.
    llm_base_url: str | None = None
    llm_api_key: SecretStr = SecretStr("not-needed")
    llm_model: str | None = None
    llm_timeout_s: float = Field(default=60.0, gt=0)
    llm_max_tokens: int = Field(default=400, ge=16)

    # API limits: request bodies other than uploads, and requests per API key (0: no limit), kept in
    # Redis so every API process shares them (in memory with the embedded default).
    max_request_bytes: int = Field(default=1024 * 1024, ge=1024)
    rate_limit_per_minute: int = Field(default=3000, ge=0)
    rate_limit_burst: int = Field(default=100, ge=1)
    # Requests without a valid key (none, unknown, revoked), per client address: beyond this they get 429.
    auth_failures_per_minute: int = Field(default=60, ge=0)
    auth_failures_burst: int = Field(default=20, ge=1)

    # Worker and API.
    worker_concurrency: int = Field(default=1, ge=1, le=64)
    # Threads each worker process embeds on (torch's intra-op pool; for the onnx backends as many lanes of one
    # thread, see embedding.Embedder). Unset: the machine's cores shared out between the worker processes, so
    # they never oversubscribe the CPU.
    worker_threads: int | None = Field(default=None, ge=1, le=256)
    # Worker processes lower their CPU priority by this much, so that on a shared machine questions
    # (the API) are answered promptly while ingestion and re-indexing take the CPU left over.
    worker_nice: int = Field(default=10, ge=0, le=19)

    @property
    def worker_embed_threads(self) -> int:
        """Threads one worker process embeds on: PGSAGE_WORKER_THREADS, or its share of the machine's cores."""
        return self.worker_threads or max(1, (os.cpu_count() or 1) // self.worker_concurrency)
    # Threads torch uses to embed one query in the API. One: a short question gains little from a second
    # thread (11.3 -> 14.2 ms here), while that thread spin-waits against Postgres and the request's own
    # work, which run beside the embedding; measured in BENCHMARKS.md (question latency).
    query_encode_threads: int = Field(default=1, ge=1, le=256)
    # Recent query vectors kept per API process (0: none); a repeated question skips the model.
    query_cache_size: int = Field(default=1024, ge=0, le=1_000_000)
    queue_name: str = Field(default="pgsage", pattern=r"^[A-Za-z0-9_.:-]{1,100}$")
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8000, ge=1, le=65535)
    # Idle keep-alive connections stay open this long. Longer than clients' and load balancers' own idle
    # timeouts (httpx: 5 s, AWS ALB: 60 s), so the server never closes a connection a client is reusing.
    api_keep_alive_seconds: int = Field(default=75, ge=1, le=3600)

    @field_validator("redis_url", "llm_base_url", "llm_model", "embedding_revision", "reindex_eval_dir", mode="before")
    @classmethod
    def _empty_is_unset(cls, v: object) -> object:
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("rerank")
    @classmethod
    def _reranker(cls, v: str) -> str:
        from app.query.rerank import is_known

        if is_known(v):
            return v
        raise ValueError("PGSAGE_RERANK must be none, prf or cross-encoder:<model name or path>")

    @field_validator("llm_api_key", mode="before")
    @classmethod
    def _empty_key(cls, v: object) -> object:
        # OpenAI-compatible local servers need no key, but the client refuses an empty one.
        return "not-needed" if v is None or (isinstance(v, str) and not v.strip()) else v

    @field_validator("database_url", "database_read_url")
    @classmethod
    def _sqlalchemy_driver(cls, v: str | None) -> str | None:
        """Accept plain postgres:// URLs and pin the psycopg 3 driver."""
        if not v:
            return None
        for prefix in ("postgres://", "postgresql://"):
            if v.startswith(prefix):
                return "postgresql+psycopg://" + v[len(prefix) :]
        if not v.startswith("postgresql+psycopg://"):
            raise ValueError("DATABASE_URL must be a postgresql:// URL (psycopg 3 driver)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.chunk_overlap_tokens >= self.chunk_max_tokens // 2:
            raise ValueError("PGSAGE_CHUNK_OVERLAP_TOKENS must be under half of PGSAGE_CHUNK_MAX_TOKENS")
        if bool(self.llm_base_url) != bool(self.llm_model):
            raise ValueError("set both PGSAGE_LLM_BASE_URL and PGSAGE_LLM_MODEL, or neither")
        return self

    @property
    def broker_url(self) -> str:
        """Redis when configured, else Kombu's file-system transport under the data directory."""
        return self.redis_url or "filesystem://localhost/"  # the host is ignored; without one Kombu warns

    @property
    def broker_dir(self) -> Path:
        return self.data_dir.resolve() / "broker"


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()

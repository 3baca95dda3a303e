"""Rerank: reorder the fused candidates with a stronger (slower) scorer, built once per process.

Rerankers are named in settings or per request:
  - "none": keep the fused order;
  - "cross-encoder:<name or path>": a sentence-transformers CrossEncoder reading (query, passage) pairs;
  - "prf": dense pseudo-relevance feedback (Rocchio): the query vector is moved toward the
    centroid of the top fused documents' vectors and the candidates are re-scored with it, then fused
    again with BM25. It needs nothing beyond the embedding model, so it works offline.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from app.errors import BadInput, NotFound


@dataclass
class Passage:
    title: str | None
    text: str


class Reranker(Protocol):
    name: str

    def scores(self, query: str, passages: Sequence[Passage]) -> list[float]: ...


class CrossEncoderReranker:
    """Scores (query, title + passage) pairs with a sentence-transformers CrossEncoder."""

    def __init__(self, model: str, device: str = "cpu", max_length: int = 512) -> None:
        from sentence_transformers import CrossEncoder

        self.name = f"cross-encoder:{model}"
        self.model = CrossEncoder(model, device=device, max_length=max_length)
        self._lock = threading.Lock()

    def scores(self, query: str, passages: Sequence[Passage]) -> list[float]:
        if not passages:
            return []
        pairs = [(query, f"{p.title}\n{p.text}" if p.title else p.text) for p in passages]
        with self._lock:
            out = self.model.predict(pairs, batch_size=32, show_progress_bar=False, convert_to_numpy=True)
        return [float(x) for x in np.asarray(out).reshape(len(pairs), -1)[:, -1]]


def rocchio(query: np.ndarray, feedback: np.ndarray, beta: float) -> np.ndarray:
    """The query moved toward the mean of the feedback vectors, renormalised."""
    if feedback.size == 0 or beta <= 0:
        return query
    moved = query + beta * feedback.mean(axis=0)
    out: np.ndarray = moved / max(float(np.linalg.norm(moved)), 1e-12)
    return out


def is_known(name: str) -> bool:
    """Whether a reranker name is one pgsage can build (none, prf, cross-encoder:<model>)."""
    return name in ("none", "prf") or (name.startswith("cross-encoder:") and len(name) > len("cross-encoder:"))


def _available(model: str) -> bool:
    """Whether a model can be loaded without a download: a local folder, or in the Hugging Face cache."""
    try:
        if Path(model).expanduser().exists():
            return True
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(model, "config.json"), str)
    except Exception:  # not a valid repository id either
        return False


class RerankerPool:
    """Rerankers by name, each built on first use and kept for the life of the process."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self._built: dict[str, Reranker] = {}
        self._lock = threading.Lock()

    @staticmethod
    def check(name: str) -> str:
        """The name if it is one pgsage knows, else a 422."""
        if is_known(name):
            return name
        raise BadInput(f"unknown reranker {name!r}: use none, prf or cross-encoder:<model name or path>")

    def get(self, name: str) -> Reranker:
        """A model-backed reranker (cross-encoder:...); raises BadInput when it cannot be loaded."""
        with self._lock:
            found = self._built.get(name)
            if found is not None:
                return found
            if not name.startswith("cross-encoder:"):
                raise BadInput(f"{name!r} is not a model-backed reranker")
            model = name.split(":", 1)[1]
            if not _available(model):
                raise NotFound(f"no reranker model {model!r} on this server (neither a folder nor in its model cache)")
            try:
                built = CrossEncoderReranker(name.split(":", 1)[1], self.device)
            except Exception as exc:  # a missing folder or a non-cross-encoder model
                raise BadInput(f"cannot load reranker {name!r}: {exc}") from None
            self._built[name] = built
            return built

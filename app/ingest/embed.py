"""Embed: one batched encode call for the chunks of many documents, split back per document."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from app.embedding import Embedder
from app.ingest.chunk import ChunkSpan


def embed_documents(embedder: Embedder, chunked: Sequence[Sequence[ChunkSpan]]) -> list[np.ndarray]:
    """Vectors for each document's chunks, encoded together so batches stay full."""
    texts = [c.text for chunks in chunked for c in chunks]
    matrix = embedder.encode(texts)
    out: list[np.ndarray] = []
    start = 0
    for chunks in chunked:
        out.append(matrix[start : start + len(chunks)])
        start += len(chunks)
    return out

"""Embed: one batched encode call for the chunks and sentences of many documents, split back per document."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from app.embedding import Embedder
from app.ingest.chunk import ChunkSpan


@dataclass
class Embedded:
    """One document's vectors in one space: a row per chunk, and a row per quotable sentence (chunks in order)."""

    chunks: np.ndarray
    sentences: np.ndarray


def embed_documents(embedder: Embedder, chunked: Sequence[Sequence[ChunkSpan]]) -> list[Embedded]:
    """Vectors for each document's chunks and sentences (heading path and text), encoded together so batches
    stay full (the model sorts them by length)."""
    chunk_texts = [c.embed_text for chunks in chunked for c in chunks]
    sentence_texts = [t for chunks in chunked for c in chunks for t in c.sentence_texts]
    matrix = embedder.encode(chunk_texts + sentence_texts)
    chunk_rows, sentence_rows = matrix[: len(chunk_texts)], matrix[len(chunk_texts) :]
    out: list[Embedded] = []
    at_chunk = at_sentence = 0
    for chunks in chunked:
        n_sentences = sum(len(c.sentences) for c in chunks)
        out.append(Embedded(chunk_rows[at_chunk : at_chunk + len(chunks)],
                            sentence_rows[at_sentence : at_sentence + n_sentences]))
        at_chunk += len(chunks)
        at_sentence += n_sentences
    return out

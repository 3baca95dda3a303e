"""Token-aware chunking with the embedding model's own tokenizer.

Paragraphs, then sentences, are the units; units are packed greedily up to the token budget, and
each new chunk starts with the previous chunk's trailing sentences (up to the overlap budget).
A sentence longer than the budget is cut at token boundaries.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

_PARAGRAPH = re.compile(r"\n\s*\n")
# A sentence ends at . ! ? (optionally followed by closing quotes/brackets) and whitespace.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")


@dataclass(frozen=True)
class ChunkSpan:
    ordinal: int
    text: str
    token_count: int
    char_start: int
    char_end: int


@dataclass(frozen=True)
class _Unit:
    start: int
    end: int
    tokens: int
    paragraph: int


def sentence_spans(text: str) -> list[tuple[int, int, int]]:
    """(start, end, paragraph index) of every non-blank sentence."""
    spans: list[tuple[int, int, int]] = []
    para_start = 0
    paragraphs = [*_PARAGRAPH.finditer(text), None]
    for p_index, sep in enumerate(paragraphs):
        para_end = sep.start() if sep else len(text)
        pos = para_start
        for m in _SENTENCE_END.finditer(text, para_start, para_end):
            spans.append((pos, m.start(), p_index))
            pos = m.end()
        spans.append((pos, para_end, p_index))
        para_start = sep.end() if sep else len(text)
    out = []
    for start, end, p in spans:
        # Trim whitespace so spans point at text.
        while start < end and text[start].isspace():
            start += 1
        while end > start and text[end - 1].isspace():
            end -= 1
        if end > start:
            out.append((start, end, p))
    return out


class Chunker:
    """Splits text into ChunkSpans of at most max_tokens word pieces."""

    def __init__(self, tokenizer: Any, max_tokens: int, overlap_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.overlap_tokens = overlap_tokens

    def _units(self, text: str) -> list[_Unit]:
        spans = sentence_spans(text)
        if not spans:
            return []
        enc = self.tokenizer(
            [text[s:e] for s, e, _ in spans],
            add_special_tokens=False,
            return_offsets_mapping=True,
            return_attention_mask=False,
            return_token_type_ids=False,
        )
        units: list[_Unit] = []
        for (start, end, para), ids, offsets in zip(spans, enc["input_ids"], enc["offset_mapping"], strict=True):
            n = len(ids)
            if n == 0:
                continue
            if n <= self.max_tokens:
                units.append(_Unit(start, end, n, para))
                continue
            # An over-long sentence: cut it at token boundaries.
            for i in range(0, n, self.max_tokens):
                window = offsets[i : i + self.max_tokens]
                units.append(_Unit(start + window[0][0], start + window[-1][1], len(window), para))
        return units

    def split(self, text: str) -> list[ChunkSpan]:
        """Chunk the text; every chunk's span indexes into the original string."""
        units = self._units(text)
        chunks: list[ChunkSpan] = []
        current: list[_Unit] = []
        tokens = 0

        def emit() -> None:
            start, end = current[0].start, current[-1].end
            chunks.append(ChunkSpan(len(chunks), text[start:end], tokens, start, end))

        for unit in units:
            if current and tokens + unit.tokens > self.max_tokens:
                emit()
                # Carry trailing units as overlap, unless the overlap would crowd out the new unit.
                carry: list[_Unit] = []
                carried = 0
                for prev in reversed(current):
                    if carried + prev.tokens > self.overlap_tokens:
                        break
                    carry.insert(0, prev)
                    carried += prev.tokens
                if carried + unit.tokens > self.max_tokens or len(carry) == len(current):
                    carry, carried = [], 0
                current, tokens = carry, carried
            current.append(unit)
            tokens += unit.tokens
        if current:
            emit()
        return chunks

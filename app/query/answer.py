"""Answer: an extractive answer with a citation per sentence, or an LLM answer over numbered chunks."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app.embedding import Embedder
from app.errors import UpstreamError
from app.ingest.chunk import sentence_spans
from app.query.retrieve import Hit

NO_ANSWER = "I could not find anything in this collection that answers the question."
SYSTEM_PROMPT = (
    "You answer questions using only the numbered sources given to you. After every sentence, cite "
    "the sources it relies on by their numbers in square brackets, like [1] or [2][3]. If the sources "
    "do not contain the answer, say that you don't know. Be brief."
)
RELATIVE_MARGIN = 0.15
# A citation marker with the space before it, so a dropped marker leaves no double space.
_CITATION = re.compile(r"(?P<space>\s?)\[(?P<numbers>\d+(?:\s*[,;]\s*\d+)*)\]")


@dataclass
class Answer:
    answer: str
    citations: list[dict[str, Any]] = field(default_factory=list)
    mode: str = "extractive"


def _citation(n: int, hit: Hit, quote: str | None = None) -> dict[str, Any]:
    return {
        "n": n,
        "chunk_id": hit.chunk_id,
        "document_id": hit.document_id,
        "external_id": hit.external_id,
        "title": hit.title,
        "score": round(hit.score, 4),
        "text": hit.text,
        "quote": quote,
    }


def _is_heading(sentence: str) -> bool:
    """Markdown headings and title lines: short and without closing punctuation."""
    return sentence.startswith("#") or (len(sentence.split()) < 12 and sentence[-1] not in ".!?:;)\"'")


class ExtractiveAnswerer:
    """Picks the retrieved sentences closest to the question and cites the chunk of each."""

    def __init__(self, max_sentences: int) -> None:
        self.max_sentences = max_sentences

    def answer(self, embedder: Embedder, question_vec: np.ndarray, hits: Sequence[Hit], min_score: float) -> Answer:
        """Sentences are embedded by the same model as the question (the active space's)."""
        candidates: list[tuple[int, int, str]] = []  # (hit rank, start, sentence)
        seen: set[str] = set()
        for rank, hit in enumerate(hits):
            for start, end, _ in sentence_spans(hit.text):
                sentence = hit.text[start:end].strip()
                key = " ".join(sentence.lower().split())
                if _is_heading(sentence) or len(sentence.split()) < 4 or key in seen:
                    continue  # headings, fragments, and sentences seen in an overlapping chunk
                seen.add(key)
                candidates.append((rank, start, sentence))
        if not candidates:
            return Answer(NO_ANSWER, [], "extractive")
        sims = embedder.encode([c[2] for c in candidates]) @ question_vec
        order = np.argsort(-sims)
        # Keep sentences about as relevant as the best one; a weak runner-up only adds noise.
        floor = max(min_score, float(sims[order[0]]) - RELATIVE_MARGIN)
        chosen = [int(i) for i in order[: self.max_sentences] if sims[i] >= floor] or [int(order[0])]
        chosen.sort(key=lambda i: (candidates[i][0], candidates[i][1]))
        numbers: dict[int, int] = {}
        citations: list[dict[str, Any]] = []
        parts = []
        for i in chosen:
            rank, _, sentence = candidates[i]
            if rank not in numbers:
                numbers[rank] = len(numbers) + 1
                citations.append(_citation(numbers[rank], hits[rank], sentence))
            parts.append(f"{sentence} [{numbers[rank]}]")
        return Answer(" ".join(parts), citations, "extractive")


def resolve_citations(content: str, sources: int) -> tuple[str, list[int]]:
    """The answer with markers naming no given source removed, and the source numbers it cites."""
    cited: list[int] = []

    def resolve(match: re.Match[str]) -> str:
        numbers = [int(x) for x in re.split(r"\s*[,;]\s*", match["numbers"])]
        valid = [n for n in numbers if 1 <= n <= sources]
        cited.extend(n for n in valid if n not in cited)
        if len(valid) == len(numbers):
            return match[0]
        return f"{match['space']}[{', '.join(map(str, valid))}]" if valid else ""

    return _CITATION.sub(resolve, content).strip(), sorted(cited)


class LLMAnswerer:
    """Asks an OpenAI-compatible chat model, giving it the numbered chunks, and keeps what it cites."""

    def __init__(self, client: Any, model: str, max_tokens: int) -> None:
        self.client = client
        self.model = model
        self.max_tokens = max_tokens

    @staticmethod
    def prompt(question: str, hits: Sequence[Hit]) -> list[dict[str, str]]:
        sources = "\n\n".join(
            f"[{i}] {hit.title + ': ' if hit.title else ''}{hit.text}" for i, hit in enumerate(hits, start=1)
        )
        return [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": f"Sources:\n\n{sources}\n\nQuestion: {question}"},
        ]

    def answer(self, question: str, hits: Sequence[Hit]) -> Answer:
        import openai

        try:
            response = self.client.chat.completions.create(
                model=self.model,
                messages=self.prompt(question, hits),
                max_tokens=self.max_tokens,
                temperature=0.0,
            )
        except openai.OpenAIError as exc:
            raise UpstreamError(f"the language model did not answer: {exc}") from None
        content = (response.choices[0].message.content or "").strip() if response.choices else ""
        if not content:
            raise UpstreamError("the language model returned an empty answer")
        content, cited = resolve_citations(content, len(hits))
        if not content:
            raise UpstreamError("the language model returned an empty answer")
        return Answer(content, [_citation(n, hits[n - 1]) for n in cited], "llm")

"""Answer: an extractive answer with a citation per sentence, or an LLM answer over numbered chunks."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from app.errors import UpstreamError
from app.query.retrieve import Hit, SentenceScore

NO_ANSWER = "I could not find anything in this collection that answers the question."
SYSTEM_PROMPT = (
    "You answer questions using only the numbered sources given to you. After every sentence, cite "
    "the sources it relies on by their numbers in square brackets, like [1] or [2][3]. If the sources "
    "do not contain the answer, say that you don't know. Be brief."
)
# A citation marker with the space before it, so a dropped marker leaves no double space.
# (Possessive: a long list of numbers with no closing bracket is given up on without backtracking.)
_CITATION = re.compile(r"(?P<space>\s?)\[(?P<numbers>\d++(?:\s*+[,;]\s*+\d++)*+)\]")


def _open_tail(text: str) -> int:
    """Where the end of streamed text that more text could still change begins: trailing space, and a marker not
    yet closed with the space before it. (A scan from the end; the pattern it replaces, searched, rescanned a run
    of spaces from each of them.)"""
    end = len(text.rstrip())
    bracket = text.rfind("[", 0, end)
    if bracket >= 0 and all(c.isdecimal() or c.isspace() or c in ",;" for c in text[bracket + 1 : end]):
        return len(text[:bracket].rstrip())
    return end


@dataclass
class Answer:
    answer: str
    citations: list[dict[str, Any]] = field(default_factory=list)
    mode: str = "extractive"
    # The answer's pieces in order (one per sentence, extractive): " ".join(parts) == answer.
    parts: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class AnswerEvent:
    """One event of a streamed answer: its name and its data (a JSON object)."""

    event: Literal["citations", "token", "done"]
    data: dict[str, Any]


def answer_events(answer: Answer) -> Iterator[AnswerEvent]:
    """An answer already made, as events: its citations, one token per part, then the whole answer."""
    yield AnswerEvent("citations", {"citations": answer.citations})
    for i, part in enumerate(answer.parts):
        # The separator travels with the part, so the tokens concatenate to the answer.
        yield AnswerEvent("token", {"text": f" {part}" if i else part})
    yield AnswerEvent("done", {"answer": answer.answer, "mode": answer.mode, "citations": answer.citations})


def _citation(n: int, hit: Hit, quote: str | None = None) -> dict[str, Any]:
    return {
        "n": n,
        "chunk_id": hit.chunk_id,
        "document_id": hit.document_id,
        "external_id": hit.external_id,
        "title": hit.title,
        "heading_path": hit.heading_path,
        "page_start": hit.page_start,
        "page_end": hit.page_end,
        "score": round(hit.score, 4),
        "text": hit.text,
        "quote": quote,
    }


def _source_label(hit: Hit) -> str:
    """Where a numbered source comes from: its heading path (or title), and pages."""
    where = " > ".join(hit.heading_path) or hit.title or ""
    if hit.page_start is not None:
        pages = f"p. {hit.page_start}" if hit.page_end in (None, hit.page_start) else \
            f"pp. {hit.page_start}-{hit.page_end}"
        where = f"{where} ({pages})" if where else pages
    return f"{where}: " if where else ""


# Weights of the sentence score (chosen on the squad-articles dev questions, BENCHMARKS.md): the share of
# the question's rarer terms the sentence holds, and how far its passage ranks below the best one.
OVERLAP_WEIGHT = 0.2
PASSAGE_WEIGHT = 0.1
# A further sentence is quoted only if it scores within this of the best one (a weak runner-up is noise).
FURTHER_SENTENCE_MARGIN = 0.2
# Between two sentences quoted from one passage (the quote is what the passage says, not one span of it).
QUOTE_GAP = " … "
NOT_QUOTABLE = ("The passages cited below are the closest I found, but none of their sentences answers the "
                "question directly.")


class ExtractiveAnswerer:
    """Quotes the sentence (or two) of the retrieved passages that best answers the question, each cited.

    A sentence's score is its vector's similarity to the question (the vectors are made at ingest),
    plus the share of the question's terms it holds (IDF-weighted, relative to the best sentence),
    plus its passage's fused score relative to the best passage's. Only quotable sentences are
    candidates: prose sentences and whole list items, never headings, code, tables or fragments.
    """

    def __init__(self, max_sentences: int, max_words: int) -> None:
        self.max_sentences = max_sentences
        self.max_words = max_words

    def answer(self, hits: Sequence[Hit], sentences: Sequence[SentenceScore]) -> Answer:
        by_chunk = {h.chunk_id: (rank, h) for rank, h in enumerate(hits)}
        seen: set[str] = set()
        candidates: list[tuple[float, int, SentenceScore, str]] = []
        top_overlap = max((s.overlap for s in sentences), default=0.0) or 1.0
        top_passage = max((h.score for h in hits), default=0.0)
        for s in sentences:
            rank, hit = by_chunk[s.chunk_id]
            quote = hit.text[s.start : s.end].strip()
            key = " ".join(quote.lower().split())
            if not quote or key in seen:  # a sentence seen in an overlapping chunk
                continue
            seen.add(key)
            score = s.similarity + OVERLAP_WEIGHT * s.overlap / top_overlap + PASSAGE_WEIGHT * (hit.score - top_passage)
            candidates.append((score, rank, s, quote))
        if not candidates:
            citations = [_citation(n, h) for n, h in enumerate(hits[:3], start=1)]
            return Answer(NOT_QUOTABLE, citations, "extractive", [NOT_QUOTABLE])
        candidates.sort(key=lambda c: -c[0])
        chosen = [candidates[0]]
        words = len(candidates[0][3].split())
        for candidate in candidates[1 : self.max_sentences]:
            if candidate[0] < candidates[0][0] - FURTHER_SENTENCE_MARGIN:
                break
            if words + len(candidate[3].split()) <= self.max_words:
                chosen.append(candidate)
                words += len(candidate[3].split())
        chosen.sort(key=lambda c: (c[1], c[2].start))  # in reading order
        numbers: dict[int, int] = {}
        quotes: dict[int, list[str]] = {}
        parts = []
        for _, rank, _, quote in chosen:
            if rank not in numbers:
                numbers[rank] = len(numbers) + 1
            quotes.setdefault(rank, []).append(quote)
            parts.append(f"{quote} [{numbers[rank]}]")
        citations = [_citation(n, hits[rank], QUOTE_GAP.join(quotes[rank])) for rank, n in numbers.items()]
        return Answer(" ".join(parts), citations, "extractive", parts)


def _resolve_markers(content: str, sources: int, cited: list[int]) -> str:
    """The text with markers naming no given source removed; the numbers it cites are added to `cited`."""

    def resolve(match: re.Match[str]) -> str:
        numbers = [int(x) for x in re.split(r"\s*[,;]\s*", match["numbers"])]
        valid = [n for n in numbers if 1 <= n <= sources]
        cited.extend(n for n in valid if n not in cited)
        if len(valid) == len(numbers):
            return match[0]
        return f"{match['space']}[{', '.join(map(str, valid))}]" if valid else ""

    return _CITATION.sub(resolve, content)


def resolve_citations(content: str, sources: int) -> tuple[str, list[int]]:
    """The answer with markers naming no given source removed, and the source numbers it cites."""
    cited: list[int] = []
    return _resolve_markers(content, sources, cited).strip(), sorted(cited)


class CitationStream:
    """resolve_citations applied to text arriving in pieces: what each piece adds to the resolved answer.

    A marker still open, and trailing space, are held back until the text after them arrives, so the
    pieces concatenate to exactly what resolve_citations gives for the whole text.
    """

    def __init__(self, sources: int) -> None:
        self.sources = sources
        self.cited: list[int] = []
        self._held = ""  # raw text that later text may still change
        self._space = ""  # resolved trailing space, given out only if more text follows
        self._started = False

    def feed(self, delta: str) -> str:
        """The resolved text that `delta` makes final (often empty)."""
        text = self._held + delta
        end = _open_tail(text)
        self._held = text[end:]
        return self._give(_resolve_markers(text[:end], self.sources, self.cited))

    def close(self) -> str:
        """The rest, once the text is complete (trailing space is dropped, as the answer is stripped)."""
        rest, self._held = self._held, ""
        return self._give(_resolve_markers(rest, self.sources, self.cited))

    def _give(self, resolved: str) -> str:
        if not self._started:
            resolved = resolved.lstrip()
            if not resolved:
                return ""
            self._started = True
        body = resolved.rstrip()
        if not body:
            self._space += resolved
            return ""
        out, self._space = self._space + body, resolved[len(body):]
        return out


class LLMAnswerer:
    """Asks an OpenAI-compatible chat model, giving it the numbered chunks, and keeps what it cites."""

    def __init__(self, client: Any, model: str, max_tokens: int) -> None:
        self.client = client
        self.model = model
        self.max_tokens = max_tokens

    @staticmethod
    def prompt(question: str, hits: Sequence[Hit]) -> list[dict[str, str]]:
        sources = "\n\n".join(
            f"[{i}] {_source_label(hit)}{hit.text}" for i, hit in enumerate(hits, start=1)
        )
        return [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": f"Sources:\n\n{sources}\n\nQuestion: {question}"},
        ]

    def _complete(self, question: str, hits: Sequence[Hit], **extra: Any) -> Any:
        return self.client.chat.completions.create(
            model=self.model, messages=self.prompt(question, hits), max_tokens=self.max_tokens, temperature=0.0,
            **extra,
        )

    def answer(self, question: str, hits: Sequence[Hit]) -> Answer:
        import openai

        try:
            response = self._complete(question, hits)
        except openai.OpenAIError as exc:
            raise UpstreamError(f"the language model did not answer: {exc}") from None
        content = (response.choices[0].message.content or "").strip() if response.choices else ""
        if not content:
            raise UpstreamError("the language model returned an empty answer")
        content, cited = resolve_citations(content, len(hits))
        if not content:
            raise UpstreamError("the language model returned an empty answer")
        return Answer(content, [_citation(n, hits[n - 1]) for n in cited], "llm")

    def stream(self, question: str, hits: Sequence[Hit]) -> Iterator[AnswerEvent]:
        """The numbered sources, the answer's text as the model writes it, then the answer and what it cites.

        Raises UpstreamError mid-stream when the model fails; the events so far stand.
        """
        import httpx
        import openai

        yield AnswerEvent("citations", {"citations": [_citation(n, h) for n, h in enumerate(hits, start=1)]})
        markers = CitationStream(len(hits))
        pieces: list[str] = []
        response: Any = None
        try:
            response = self._complete(question, hits, stream=True)
            for chunk in response:
                delta = chunk.choices[0].delta.content if chunk.choices else None
                piece = markers.feed(delta or "")
                if piece:
                    pieces.append(piece)
                    yield AnswerEvent("token", {"text": piece})
        # A connection dropped while reading the body surfaces from httpx, not wrapped by openai.
        except (openai.OpenAIError, httpx.HTTPError) as exc:
            raise UpstreamError(f"the language model did not answer: {exc}") from None
        finally:
            if response is not None:
                response.close()  # also when the client went away: the model stops generating
        last = markers.close()  # an unclosed "[" at the very end is text
        if last:
            pieces.append(last)
            yield AnswerEvent("token", {"text": last})
        content = "".join(pieces)
        if not content:
            raise UpstreamError("the language model returned an empty answer")
        citations = [_citation(n, hits[n - 1]) for n in sorted(markers.cited)]
        yield AnswerEvent("done", {"answer": content, "mode": "llm", "citations": citations})

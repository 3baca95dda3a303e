"""Question answering over documents, scored SQuAD-style: does a passage, or the answer, hold a gold answer?"""

from __future__ import annotations

import json
import random
import re
import statistics
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

_ARTICLES = frozenset({"a", "an", "the"})
_ASCII_PUNCTUATION = frozenset(string.punctuation)
# The markers the answer step puts after each sentence ("[1]", "[2, 3]"); they are not answer text,
# and left in they would let a gold answer such as "2" hold by accident.
_CITATION = re.compile(r"\[\d+(?:\s*[,;]\s*\d+)*\]")


@dataclass(frozen=True)
class Question:
    """One line of a question file."""

    id: str
    question: str
    answers: tuple[str, ...]
    document: str
    # Gold evidence passages, when the file gives them ({"evidence": [{"text", "page"}]}, FinanceBench's form).
    evidence: tuple[str, ...] = ()


@dataclass(frozen=True)
class Passage:
    """A retrieved passage: the document it comes from (external id) and its text."""

    document: str
    text: str


@dataclass(frozen=True)
class QuestionResult:
    """What the service returned for one question, with the client-measured latencies."""

    question: Question
    passages: Sequence[Passage]
    answer: str
    search_ms: float
    ask_ms: float


def tokens(text: str) -> list[str]:
    """The normalised words of a text, as SQuAD's official script makes them: lower case, ASCII
    punctuation deleted, the articles a/an/the dropped, split on whitespace.

    Exactly the official rule, so figures compare with published ones; under it 33 of the 5,665 gold
    answers of squad-articles' questions-dev do not hold even in their own article (a gold answer
    "1185" where the text has "(1185", an en dash and "1200)"), so no system reaches 1.0.
    """
    text = "".join(ch for ch in text.lower() if ch not in _ASCII_PUNCTUATION)
    return [w for w in text.split() if w not in _ARTICLES]


def normalise(text: str) -> str:
    """SQuAD's answer normalisation, whitespace collapsed to single spaces."""
    return " ".join(tokens(text))


def holds(text: str, answers: Sequence[str]) -> bool:
    """Whether some gold answer occurs in the text as whole words (a contiguous run of its tokens)."""
    padded = f" {normalise(text)} "
    # Tokens hold no spaces, so a space-delimited substring is exactly a token subsequence.
    return any(gold and f" {gold} " in padded for gold in map(normalise, answers))


_EVIDENCE_TOKEN = re.compile(r"[a-z]+|\d+(?:[.,]\d+)*")


def evidence_tokens(text: str) -> set[str]:
    """The distinct tokens evidence coverage compares: lower case, words of 3+ characters, every number."""
    return {t for t in _EVIDENCE_TOKEN.findall(text.lower()) if len(t) >= 3 or t[0].isdigit()}


def covers(passage: str, evidence: Sequence[str]) -> bool:
    """Whether the passage covers some gold evidence: at least half of the distinct tokens of the smaller of the
    two are shared (financebench's README)."""
    mine = evidence_tokens(passage)
    for gold in map(evidence_tokens, evidence):
        smaller = min(len(mine), len(gold))
        if smaller and len(mine & gold) >= 0.5 * smaller:
            return True
    return False


def strip_citations(answer: str) -> str:
    """The answer text without its citation markers."""
    return " ".join(_CITATION.sub(" ", answer).split())


def load_questions(path: Path) -> list[Question]:
    """Read a question file (JSON Lines of {id, question, answers, document}); ValueError names a bad line."""
    questions = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                answers = obj["answers"]
                if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
                    raise ValueError("answers must be a list of strings")
                evidence = obj.get("evidence") or []
                if not isinstance(evidence, list) or not all(isinstance(e, dict) and isinstance(e.get("text"), str)
                                                             for e in evidence):
                    raise ValueError("evidence must be a list of {text, page} objects")
                question = Question(str(obj["id"]), str(obj["question"]), tuple(answers), str(obj["document"]),
                                    tuple(e["text"] for e in evidence if e["text"].strip()))
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{n}: not a question ({type(exc).__name__}: {exc})") from None
            if not question.question.strip():
                raise ValueError(f"{path}:{n}: the question is empty")
            questions.append(question)
    return questions


def select(
    questions: Sequence[Question], *, max_questions: int | None = None, sample: int | None = None, seed: int = 0
) -> list[Question]:
    """A seeded random sample (kept in file order) if asked, then the first max_questions."""
    chosen = list(questions)
    if sample is not None and sample < len(chosen):
        picked = sorted(random.Random(seed).sample(range(len(chosen)), sample))
        chosen = [chosen[i] for i in picked]
    return chosen[:max_questions] if max_questions is not None else chosen


def percentiles(values: Sequence[float]) -> tuple[float, float]:
    """(p50, p95) as statistics.quantiles computes them (the BEIR eval's definition)."""
    if not values:
        return 0.0, 0.0
    cuts = statistics.quantiles(values, n=100) if len(values) > 1 else list(values) * 99
    return cuts[49], cuts[94]


def score(results: Sequence[QuestionResult], k: int = 5) -> dict[str, float]:
    """Passage hit@1 and hit@k, document@1, answer holds, mean answer words, latency p50/p95 (ms); with gold
    evidence in the question file, evidence@1 and evidence@k too."""
    if not results:
        raise ValueError("no question to score")
    n = len(results)
    hit1 = sum(holds(r.passages[0].text, r.question.answers) for r in results if r.passages)
    hitk = sum(any(holds(p.text, r.question.answers) for p in r.passages[:k]) for r in results)
    doc1 = sum(bool(r.passages) and r.passages[0].document == r.question.document for r in results)
    answers = [strip_citations(r.answer) for r in results]
    held = sum(holds(a, r.question.answers) for a, r in zip(answers, results, strict=True))
    ask50, ask95 = percentiles([r.ask_ms for r in results])
    search50, search95 = percentiles([r.search_ms for r in results])
    with_evidence = [r for r in results if r.question.evidence]
    evidence = {}
    if with_evidence:
        m = len(with_evidence)
        evidence = {
            "evidence@1": sum(bool(r.passages) and covers(r.passages[0].text, r.question.evidence)
                              for r in with_evidence) / m,
            f"evidence@{k}": sum(any(covers(p.text, r.question.evidence) for p in r.passages[:k])
                                 for r in with_evidence) / m,
        }
    return {
        **evidence,
        "passage_hit@1": hit1 / n,
        f"passage_hit@{k}": hitk / n,
        "document@1": doc1 / n,
        "answer_holds": held / n,
        "mean_answer_words": sum(len(a.split()) for a in answers) / n,
        "ask_latency_ms_p50": ask50,
        "ask_latency_ms_p95": ask95,
        "search_latency_ms_p50": search50,
        "search_latency_ms_p95": search95,
        "questions": float(n),
    }

"""QA metric code (app/eval/qa.py) against hand-made cases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.eval.qa import (
    Passage,
    Question,
    QuestionResult,
    holds,
    load_questions,
    normalise,
    score,
    select,
    strip_citations,
)


def test_normalise_lower_cases_and_drops_punctuation_and_articles() -> None:
    assert normalise("The  Quick, brown fox!") == "quick brown fox"
    assert normalise("An apple a day") == "apple day"
    assert normalise("theatre another") == "theatre another"  # articles only as whole words
    assert normalise("  \n ") == ""
    assert normalise("U.S.-led") == "usled"  # SQuAD deletes punctuation


def test_normalise_unicode() -> None:
    assert normalise("Forêt AMAZONIENNE") == "forêt amazonienne"
    # Only ASCII punctuation goes, as in SQuAD's official script.
    assert normalise("“Resign”") == "“resign”"
    assert normalise("1185\u20131200") == "1185\u20131200"
    assert normalise("São\u00a0Paulo") == "são paulo"  # a no-break space is whitespace


def test_holds_ignores_punctuation_and_articles() -> None:
    assert holds("He said: Resign!", ["resign"])
    assert holds("prices rose to nearly $12.", ["$12"])
    assert holds("the Roman Empire fell", ["during the Roman Empire", "the Roman Empire"])
    assert holds("members of the Organization of Arab Petroleum Exporting Countries (OAPEC)", ["OAPEC"])
    assert holds("from (1185 to 1200)", ["(1185"])
    assert not holds("from (1185\u20131200)", ["1185"])  # the official rule keeps the en dash


def test_holds_needs_whole_words() -> None:
    assert not holds("oil cost $120 a barrel", ["12"])
    assert not holds("in 1120 and 2012", ["12"])
    assert holds("oil cost $12 a barrel", ["12"])
    assert not holds("catalogue", ["cat"])
    assert not holds("Roman law of the Empire", ["Roman Empire"])  # in order and contiguous
    assert holds("Roman, Empire", ["roman empire"])


def test_holds_with_no_usable_answer() -> None:
    assert not holds("any text at all", [])
    # A gold answer that normalises to nothing ("the", ".") would hold anywhere; it does not count.
    assert not holds("any text at all", ["the", "..."])
    assert not holds("", ["x"])


def test_holds_any_of_several_answers() -> None:
    answers = ["October 1973", "1973", "October"]
    assert holds("It began in 1973.", answers)
    assert holds("in October", answers)
    assert not holds("in 1974", answers)


def test_strip_citations() -> None:
    assert strip_citations("It began in 1973. [1] Prices rose [2, 3].") == "It began in 1973. Prices rose ."
    assert not holds(strip_citations("Two sentences. [2]"), ["2"])
    assert strip_citations("see [a] note") == "see [a] note"


def _write(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((json.dumps(r) if not isinstance(r, str) else r) + "\n" for r in rows))
    return path


def test_load_questions(tmp_path: Path) -> None:
    path = _write(tmp_path / "q.jsonl", [
        {"id": "q1", "question": "When?", "answers": ["1973", "October"], "document": "oil.md"},
        "",
        {"id": 2, "question": "Who?", "answers": [], "document": "sub/b.md"},
    ])
    assert load_questions(path) == [
        Question("q1", "When?", ("1973", "October"), "oil.md"),
        Question("2", "Who?", (), "sub/b.md"),
    ]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ('{"id": "q1", "question": "When?"', "q.jsonl:1: not a question"),
        ({"id": "q1", "question": "When?", "answers": ["x"]}, "KeyError"),
        ({"id": "q1", "question": "When?", "answers": "1973", "document": "a.md"}, "list of strings"),
        ({"id": "q1", "question": "  ", "answers": ["x"], "document": "a.md"}, "the question is empty"),
    ],
)
def test_load_questions_names_the_bad_line(tmp_path: Path, row: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_questions(_write(tmp_path / "q.jsonl", [row]))


def test_select_first_and_sample() -> None:
    questions = [Question(str(i), f"q{i}", ("a",), "d.md") for i in range(10)]
    assert [q.id for q in select(questions, max_questions=3)] == ["0", "1", "2"]
    sampled = select(questions, sample=4, seed=7)
    assert len(sampled) == 4
    assert sampled == select(questions, sample=4, seed=7)  # the seed fixes it
    assert [int(q.id) for q in sampled] == sorted(int(q.id) for q in sampled)  # in file order
    assert select(questions, sample=4, seed=8) != sampled
    assert select(questions, sample=50) == questions
    assert len(select(questions, sample=4, max_questions=2)) == 2


def _result(answers: tuple[str, ...], document: str, passages: list[tuple[str, str]], answer: str,
            ms: float) -> QuestionResult:
    return QuestionResult(Question("q", "?", answers, document), [Passage(d, t) for d, t in passages], answer,
                          search_ms=ms, ask_ms=2 * ms)


def test_score_by_hand() -> None:
    results = [
        # First passage holds it, from the right document; the answer holds it.
        _result(("1973",), "oil.md", [("oil.md", "in 1973"), ("x.md", "no")], "It was 1973. [1]", 10),
        # Third passage holds it; first passage from another document; the answer does not.
        _result(("OAPEC",), "oil.md", [("x.md", "no"), ("oil.md", "no"), ("oil.md", "OAPEC did")], "No. [1]", 20),
        # Nothing holds it, but the first passage is from the right document.
        _result(("zeppelin",), "air.md", [("air.md", "balloons")], "Balloons fly [1]", 30),
        # Only the sixth passage holds it: outside hit@5. No passages would count as misses too.
        _result(("six",), "n.md", [("n.md", str(i)) for i in range(5)] + [("n.md", "six")], "", 40),
    ]
    out = score(results, k=5)
    assert out["passage_hit@1"] == 0.25
    assert out["passage_hit@5"] == 0.5
    assert out["document@1"] == 0.75
    assert out["answer_holds"] == 0.25
    assert out["mean_answer_words"] == (3 + 1 + 2 + 0) / 4  # citation markers are not words
    assert out["search_latency_ms_p50"] == pytest.approx(25.0)
    assert out["ask_latency_ms_p50"] == pytest.approx(50.0)
    assert out["search_latency_ms_p50"] <= out["search_latency_ms_p95"]
    assert out["questions"] == 4
    assert score(results, k=6)["passage_hit@6"] == 0.75


def test_score_with_empty_answers_and_no_passages() -> None:
    out = score([_result((), "a.md", [], "anything", 5.0)], k=5)
    assert out["passage_hit@1"] == out["passage_hit@5"] == out["document@1"] == out["answer_holds"] == 0.0
    assert out["search_latency_ms_p50"] == out["search_latency_ms_p95"] == 5.0
    with pytest.raises(ValueError, match="no question"):
        score([], k=5)


def test_evidence_coverage_as_financebench_defines_it(tmp_path: Path) -> None:
    from app.eval.qa import Passage, Question, QuestionResult, covers, evidence_tokens, load_questions, score

    # Lower case, words of 3+ characters, every number.
    assert evidence_tokens("Net sales rose 18.3% to $10.2 billion in Q4 of FY 2022") == {
        "net", "sales", "rose", "18.3", "10.2", "billion", "4", "2022"}  # "Q4" gives its number
    gold = "Net sales increased 18.3% to $10.2 billion compared to $8.6 billion in fiscal 2021."
    # Half of the smaller side's tokens shared: a short passage inside the evidence covers it...
    assert covers("Net sales increased 18.3% to $10.2 billion.", [gold])
    # ...a passage about something else does not, and neither does an empty one.
    assert not covers("Gross margin fell to 38.1% on higher freight costs.", [gold])
    assert not covers("", [gold])
    assert covers("unrelated", ["not this", gold, "increased sales"]) is False

    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"id": "1", "question": "How much did net sales grow?", "answers": ["18.3%"],
                                "document": "ULTA.pdf", "evidence": [{"text": gold, "page": 4}]}) + "\n"
                    + json.dumps({"id": "2", "question": "Another?", "answers": ["x"], "document": "a.md"}) + "\n")
    [with_evidence, without] = load_questions(path)
    assert with_evidence.evidence == (gold,)
    assert without.evidence == ()
    results = [QuestionResult(with_evidence, [Passage("ULTA.pdf", "Costs."), Passage("ULTA.pdf", gold)], "", 1, 1)]
    scores = score(results, 5)
    assert (scores["evidence@1"], scores["evidence@5"]) == (0.0, 1.0)
    assert "evidence@1" not in score([QuestionResult(without, [Passage("a.md", "x")], "", 1, 1)], 5)
    assert Question("3", "q", ("a",), "d").evidence == ()

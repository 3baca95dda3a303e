"""Loader fuzzing (hypothesis): malformed PDF, HTML, JSONL and random bytes never crash or hang a loader.

Every input either loads into documents the chunker can split (spans that index the content, token
budgets kept) or is refused with a 4xx AppError and a message. Anything else (an uncaught
exception, a 5xx, an example slower than the deadline) fails the test.
"""

from __future__ import annotations

import json
from functools import cache
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.config import Settings
from app.errors import AppError
from app.ingest.chunk import Chunker
from app.ingest.load import LoadedDocument, load_upload
from tests.fixtures.helpers import make_pdf

LIMIT = 1 << 20
NAMES = ["doc.txt", "doc.md", "doc.html", "doc.pdf", "doc.jsonl", "doc", "doc.bin"]
FUZZ = settings(max_examples=300, deadline=5000, suppress_health_check=[HealthCheck.too_slow])
BASE_PDF = make_pdf(["Fuzzing a PDF loader.", "Second line of text (with parentheses).", "Third line."])


@cache
def _chunker() -> Chunker:
    from transformers import AutoTokenizer

    from app.embedding import resolve_model_path

    s = Settings()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(s.embedding_model))
    return Chunker(tokenizer, 254, s.chunk_overlap_tokens)


def _load_or_refuse(name: str, data: bytes) -> list[LoadedDocument]:
    refused: AppError | None = None
    try:
        docs = load_upload(name, None, data, LIMIT)
    except AppError as exc:
        refused = exc
    if refused is not None:
        assert 400 <= refused.status_code < 500, refused
        assert str(refused).strip()
        return []
    assert docs
    chunker = _chunker()
    for doc in docs:
        content = doc.content
        assert content.strip()
        assert "\x00" not in content
        json.dumps({"t": content, "m": doc.metadata})  # storable as text and JSONB
        for chunk in chunker.split(content):
            assert 0 <= chunk.char_start < chunk.char_end <= len(content)
            assert content[chunk.char_start : chunk.char_end] == chunk.text
            assert 0 < chunk.token_count <= chunker.max_tokens
    return docs


@FUZZ
@given(name=st.sampled_from(NAMES), data=st.binary(min_size=0, max_size=4096))
def test_random_bytes(name: str, data: bytes) -> None:
    _load_or_refuse(name, data)


@FUZZ
@given(
    flips=st.lists(st.tuples(st.integers(0, len(BASE_PDF) - 1), st.integers(0, 255)), max_size=20),
    cut=st.integers(0, len(BASE_PDF)),
    junk=st.binary(max_size=200),
)
def test_mutated_pdfs(flips: list[tuple[int, int]], cut: int, junk: bytes) -> None:
    pdf = bytearray(BASE_PDF)
    for pos, value in flips:
        pdf[pos] = value
    _load_or_refuse("doc.pdf", bytes(pdf[:cut]) + junk)


HTML_PIECES = st.sampled_from([
    "<html>", "</html>", "<head>", "<title>", "</title>", "<body>", "<script>", "</script>", "<style>",
    "<p>", "</p>", "<div", ">", "<!--", "-->", "<![CDATA[", "]]>", "&amp;", "&#0;", "&#xD800;", "&#1114112;",
    "&nosuch;", "<br/>", "<h1>", "</h1>", "<img src=x onerror=alert(1)>", "\x00", "\ufeff", "\r\n", " ",
    "text", "ünïcödé", "<table><tr><td>", "<",
])


@FUZZ
@given(parts=st.lists(st.one_of(HTML_PIECES, st.text(max_size=20)), max_size=60))
def test_tag_soup_html(parts: list[str]) -> None:
    _load_or_refuse("doc.html", "".join(parts).encode("utf-8", "surrogatepass"))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
DOC_LINES = st.fixed_dictionaries(
    {"_id": st.one_of(st.text(max_size=12), st.integers(), JSON_VALUES)},
    optional={
        "title": st.one_of(st.text(max_size=30), JSON_VALUES),
        "text": st.one_of(st.text(max_size=80), JSON_VALUES),
        "metadata": JSON_VALUES,
    },
)


@FUZZ
@given(lines=st.lists(st.one_of(DOC_LINES.map(json.dumps), JSON_VALUES.map(json.dumps), st.text(max_size=40)),
                      min_size=1, max_size=12))
def test_malformed_jsonl(lines: list[str]) -> None:
    _load_or_refuse("doc.jsonl", "\n".join(lines).encode("utf-8", "surrogatepass"))


def test_deeply_nested_json_is_refused_not_crashed() -> None:
    deep: Any = "x"
    for _ in range(5000):
        deep = [deep]
    line = json.dumps({"_id": "a", "text": "ok", "metadata": {"deep": "PLACEHOLDER"}}).replace(
        '"PLACEHOLDER"', "[" * 5000 + "]" * 5000
    )
    assert _load_or_refuse("doc.jsonl", line.encode()) == []

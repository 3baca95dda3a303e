"""Structure-aware chunking with the real tokenizer: Markdown and HTML on their structure, PDF pages, plain text."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from app.embedding import resolve_model_path
from app.ingest.chunk import Chunker, ChunkSpan, answer_sentences, markdown_blocks
from app.ingest.load import load_upload
from tests.fixtures.helpers import make_pdf

BUDGET = 254


@pytest.fixture(scope="module")
def tokenizer() -> object:
    return AutoTokenizer.from_pretrained(resolve_model_path("all-MiniLM-L6-v2"))


@pytest.fixture(scope="module")
def chunker(tokenizer: object) -> Chunker:
    return Chunker(tokenizer, BUDGET, 32)


def tokens(tokenizer: object, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])  # type: ignore[operator]


LONG_PARAGRAPH = " ".join(
    f"Sentence number {i} of the long paragraph talks about glaciers, moraines and the slow flow of ice."
    for i in range(40)
)
GUIDE = f"""# Field guide

An introduction to the guide, one short paragraph.

## Glaciers

A glacier is a persistent body of dense ice that moves under its own weight.

- Valley glaciers fill mountain valleys.
- Ice sheets cover whole continents.
- Piedmont glaciers spread out on plains.

| glacier | length (km) |
| --- | --- |
| Lambert | 400 |
| Baltoro | 63 |

### Measuring flow

```python
def flow(speed_m_per_day):
    return speed_m_per_day * 365
```

{LONG_PARAGRAPH}

## Volcanoes

Volcanoes form where magma reaches the surface.
"""


def spans_are_exact(text: str, chunks: list[ChunkSpan]) -> None:
    for c in chunks:
        assert text[c.char_start : c.char_end] == c.text


def test_markdown_blocks_and_heading_paths() -> None:
    blocks = markdown_blocks(GUIDE, "Field guide")
    kinds = [(b.kind, b.path) for b in blocks]
    assert kinds[0] == ("paragraph", ("Field guide",))
    assert ("list", ("Field guide", "Glaciers")) in kinds
    assert ("table", ("Field guide", "Glaciers")) in kinds
    assert ("code", ("Field guide", "Glaciers", "Measuring flow")) in kinds
    assert kinds[-1] == ("paragraph", ("Field guide", "Volcanoes"))
    # Headings are in the paths, not in the blocks.
    assert not any(GUIDE[b.start : b.end].startswith("#") for b in blocks)


def test_markdown_chunks_keep_blocks_whole_and_sections_apart(chunker: Chunker, tokenizer: object) -> None:
    chunks = chunker.split(GUIDE, kind="markdown", title="Field guide")
    spans_are_exact(GUIDE, chunks)
    by_path: dict[tuple[str, ...], list[ChunkSpan]] = {}
    for c in chunks:
        by_path.setdefault(c.heading_path, []).append(c)
        assert 0 < c.token_count <= BUDGET
        # The budget holds with the heading path the chunk is embedded with.
        assert tokens(tokenizer, c.embed_text) <= BUDGET + 2
    # The small blocks of one section are packed together, whole: paragraph, list and table.
    [glaciers] = by_path[("Field guide", "Glaciers")]
    assert "persistent body of dense ice" in glaciers.text
    assert "- Valley glaciers fill mountain valleys.\n- Ice sheets" in glaciers.text
    assert "| Lambert | 400 |\n| Baltoro | 63 |" in glaciers.text
    # Never across a heading.
    assert all("Volcanoes form" not in c.text for c in chunks if c.heading_path[-1] != "Volcanoes")
    [volcanoes] = by_path[("Field guide", "Volcanoes")]
    assert volcanoes.text == "Volcanoes form where magma reaches the surface."
    # The code block stays whole; the paragraph too long for a chunk is split at sentence ends.
    measuring = by_path[("Field guide", "Glaciers", "Measuring flow")]
    assert any(c.text.startswith("```python") and c.text.endswith("```") for c in measuring)
    prose = [c for c in measuring if "Sentence number" in c.text]
    assert len(prose) >= 3
    for c in prose:
        assert c.text.startswith("Sentence number")
        assert c.text.endswith("ice.")


def test_long_lists_tables_and_code_split_at_lines(chunker: Chunker) -> None:
    rows = "\n".join(f"| row {i} | value {i} with a few words to fill it up |" for i in range(120))
    items = "\n".join(f"- item {i} of a long list with several words in it" for i in range(120))
    code = "\n".join(f"    total_{i} = compute(values[{i}], weight={i})" for i in range(120))
    text = f"# Big\n\n| a | b |\n| --- | --- |\n{rows}\n\n{items}\n\n```\n{code}\n```\n"
    chunks = chunker.split(text, kind="markdown", title="Big")
    spans_are_exact(text, chunks)
    assert len(chunks) > 6
    for c in chunks:
        assert c.token_count <= BUDGET
        lines = c.text.split("\n")
        for line in lines:
            stripped = line.strip()
            # Every line is a whole line of the source: splits fall between lines only.
            assert stripped in {ln.strip() for ln in text.split("\n")}, line


def test_html_is_chunked_on_its_structure(chunker: Chunker) -> None:
    html = b"""<html><head><title>Kitchen notes</title><style>p {color: red}</style></head><body>
    <h1>Kitchen notes</h1><p>Bread needs <b>time</b> and warmth.</p>
    <h2>Tools</h2><ul><li>A Dutch oven.</li><li>A sharp knife.<ul><li>Keep it honed.</li></ul></li></ul>
    <table><tr><th>Flour</th><th>Water</th></tr><tr><td>500 g</td><td>350 g</td></tr></table>
    <h2>Code</h2><pre>hydration = water / flour
print(hydration)</pre><script>alert(1)</script></body></html>"""
    [doc] = load_upload("notes.html", None, html, 1 << 20)
    assert doc.format == "markdown"
    assert doc.title == "Kitchen notes"
    assert "alert" not in doc.content
    assert "color" not in doc.content
    chunks = chunker.split(doc.content, kind=doc.format, title=doc.title)
    spans_are_exact(doc.content, chunks)
    paths = {c.heading_path: c.text for c in chunks}
    assert paths[("Kitchen notes",)] == "Bread needs time and warmth."
    tools = paths[("Kitchen notes", "Tools")]
    assert "- A Dutch oven.\n- A sharp knife.\n  - Keep it honed." in tools
    assert "| Flour | Water |\n| --- | --- |\n| 500 g | 350 g |" in tools
    assert paths[("Kitchen notes", "Code")] == "```\nhydration = water / flour\nprint(hydration)\n```"


def test_pdf_chunks_know_their_pages(chunker: Chunker) -> None:
    page = [f"Line {i} of the report says something about revenue and costs in the quarter." for i in range(30)]
    data = make_pdf(["Annual report, page one."], page, [], ["The last page mentions the auditors."])
    [doc] = load_upload("report.pdf", None, data, 1 << 20)
    assert doc.format == "pdf"
    chunks = chunker.split(doc.content, kind=doc.format, title=doc.title)
    spans_are_exact(doc.content, chunks)
    assert chunks[0].page_start == 1
    assert chunks[-1].page_end == 4
    assert "auditors" in chunks[-1].text
    assert all(c.page_start is not None and c.page_end is not None and c.page_start <= c.page_end for c in chunks)
    # A chunk spanning the page break says so.
    assert any(c.page_start == 1 and c.page_end == 2 for c in chunks) or chunks[1].page_start == 2


def test_plain_text_keeps_paragraph_splitting_with_the_title_as_context(chunker: Chunker) -> None:
    text = "First paragraph about tides.\n\nSecond paragraph about the moon.\n\n" + LONG_PARAGRAPH
    chunks = chunker.split(text, kind="text", title="Tides")
    spans_are_exact(text, chunks)
    assert all(c.heading_path == ("Tides",) for c in chunks)
    assert chunks[0].text.startswith("First paragraph")
    assert chunks[0].embed_text == "Tides\n\n" + chunks[0].text
    # Chunks after the first overlap by trailing sentences, as before.
    assert chunks[1].char_start < chunks[0].char_end


def test_answer_sentences_are_prose_and_whole_list_items_only() -> None:
    text = (
        "Glaciers move slowly downhill. They carve valleys over time!\n\n"
        "- Valley glaciers fill mountain valleys\n- tiny\n\n"
        "| glacier | length |\n| --- | --- |\n| Lambert | 400 km long and wide |\n\n"
        "```\nspeed = distance / time for the glacier\n```\n\nOk then."
    )
    quoted = [text[s:e] for s, e in answer_sentences(text)]
    assert quoted == ["Glaciers move slowly downhill.", "They carve valleys over time!",
                      "Valley glaciers fill mountain valleys"]


@pytest.mark.parametrize(("text", "sentences"), [
    ("Sticky magma erupts, as at Mount St. Helens in 1980. Runny magma flows.",
     ["Sticky magma erupts, as at Mount St. Helens in 1980.", "Runny magma flows."]),
    ("Levels of vitamin D. Patients were treated. Smith et al. found no effect. See Fig. 2 for details.",
     ["Levels of vitamin D.", "Patients were treated.", "Smith et al. found no effect.", "See Fig. 2 for details."]),
    ("John F. Kennedy spoke. A. B. Smith wrote it. Dr. Ng agreed, e.g. on taxes. It ended.",
     ["John F. Kennedy spoke.", "A. B. Smith wrote it.", "Dr. Ng agreed, e.g. on taxes.", "It ended."]),
    ("No. 5 is next. The answer is no. Done!", ["No. 5 is next.", "The answer is no.", "Done!"]),
])
def test_sentences_do_not_end_at_abbreviations_or_initials(text: str, sentences: list[str]) -> None:
    from app.ingest.chunk import sentence_spans

    assert [text[s:e] for s, e, _ in sentence_spans(text)] == sentences

"""Chunk: split a document into passages of at most a token budget, along its structure.

Markdown (and HTML, which the loader turns into Markdown) is split on its structure: headings open
sections, and paragraphs, lists, tables and code blocks stay whole where they fit the budget; blocks
of one section are packed together up to the budget, never across a heading. A block too large for
one chunk is split at sentence boundaries (prose) or line boundaries (lists, tables, code). Plain
text and PDF text are split on paragraphs, then sentences, with the previous chunk's trailing
sentences carried over as overlap. Every chunk records its heading path (document title > section >
subsection), which is embedded and indexed with it as its context, and a PDF chunk records the pages
it spans (the loader separates pages with form feeds). Token counts are the embedding model's own
word pieces, and the budget leaves room for the context.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

# Bump when the chunks made from the same text change: a new version re-chunks every collection
# through the re-index path.
CHUNKER_VERSION = 3
PAGE_BREAK = "\f"
HEADING_SEPARATOR = " > "
# At most this many word pieces of a chunk's budget go to its heading path.
MAX_CONTEXT_TOKENS = 48

_PARAGRAPH = re.compile(r"\n\s*\n")
# A sentence ends at . ! ? (optionally followed by closing quotes/brackets) and whitespace...
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")
# ...but not after an abbreviation that does not end sentences ("Mount St. Helens", "Dr. Ng", "e.g. this",
# "Smith et al. found"), nor after a capitalised name's initial followed by a capitalised word ("John F. Kennedy";
# "vitamin D. Patients" still ends a sentence, its word before the letter being lower case).
_ABBREVIATION = re.compile(
    r"(?:^|[\s(\[\"'])(?i:mr|mrs|ms|dr|prof|st|mt|ft|jr|sr|vs|e\.g|i\.e|cf|et al|approx|ca|dept|capt|lt|sgt|"
    r"u\.s|u\.k)\.$")
# Abbreviations that stand before a number only ("No. 5", "Fig. 2", "pp. 10-12"): "the answer is no. Then" ends.
_NUMBERED = re.compile(r"(?:^|[\s(\[\"'])(?i:no|nos|fig|figs|vol|pp|p|eq|ref|sec)\.$")
_INITIAL = re.compile(r"(?:^|\s)(?:[A-Z][\w'-]*|[A-Z]\.)\s+[A-Z]\.$")
_LONE_INITIAL = re.compile(r"\s*[A-Z]\.")  # a sentence so far only an initial: "A. B. Smith wrote"
_SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(```+|~~~+)")
_LIST_ITEM = re.compile(r"^ {0,3}(?:[-*+]|\d{1,9}[.)])[ \t]+")
_TABLE_ROW = re.compile(r"^ {0,3}\|")
_RULE = re.compile(r"^ {0,3}([-*_])(?:[ \t]*+\1){2,}+[ \t]*+$")
# Emphasis and code marks, and links ([text](target)). Neither bracket part may hold its own opening bracket, so
# a scan that fails stops at the next one: with [^\]]* a line of "[" was rescanned from each (quadratic).
_MARKUP = re.compile(r"[*_`]+|\[([^\[\]\n]*)\]\([^()\n]*\)")
# A heading's text beyond this is cut (a heading path is context, and its first words say what a section is).
MAX_HEADING_CHARS = 300


@dataclass(frozen=True)
class ChunkSpan:
    ordinal: int
    text: str
    token_count: int
    char_start: int
    char_end: int
    heading_path: tuple[str, ...] = ()
    page_start: int | None = None
    page_end: int | None = None
    # Spans, within text, of the sentences an answer may quote (each also gets a vector).
    sentences: tuple[tuple[int, int], ...] = ()

    @property
    def sentence_texts(self) -> list[str]:
        """What is embedded for each quotable sentence: the heading path, then the sentence."""
        return [with_context(self.context, self.text[s:e]) for s, e in self.sentences]

    @property
    def context(self) -> str:
        """The heading path as one line: Title > Section > Subsection."""
        return HEADING_SEPARATOR.join(self.heading_path)

    @property
    def embed_text(self) -> str:
        """What is embedded and indexed: the heading path, then the text (unless it already leads with it)."""
        return with_context(self.context, self.text)


def with_context(context: str, text: str) -> str:
    if not context or text[: len(context) + 20].lower().startswith(context.lower()):
        return text
    return f"{context}\n\n{text}"


@dataclass(frozen=True)
class _Unit:
    start: int
    end: int
    tokens: int
    paragraph: int


@dataclass(frozen=True)
class Block:
    """A structural block of a Markdown text: its span, kind and the headings above it."""

    start: int
    end: int
    kind: str  # paragraph, list, table, code, quote
    path: tuple[str, ...]


def sentence_spans(text: str, start: int = 0, end: int | None = None) -> list[tuple[int, int, int]]:
    """(start, end, paragraph index) of every non-blank sentence of text[start:end]."""
    end = len(text) if end is None else end
    spans: list[tuple[int, int, int]] = []
    para_start = start
    paragraphs = [*_PARAGRAPH.finditer(text, start, end), None]
    for p_index, sep in enumerate(paragraphs):
        para_end = sep.start() if sep else end
        pos = para_start
        for m in _SENTENCE_END.finditer(text, para_start, para_end):
            if _no_end(text, pos, m.start(), m.end(), para_end):
                continue
            spans.append((pos, m.start(), p_index))
            pos = m.end()
        spans.append((pos, para_end, p_index))
        para_start = sep.end() if sep else end
    trimmed = [(*_trim(text, s, e), p) for s, e, p in spans]
    return [(s, e, p) for s, e, p in trimmed if e > s]


def _no_end(text: str, start: int, stop: int, after: int, end: int) -> bool:
    """Whether the full stop at text[stop - 1] ends no sentence: an abbreviation, or an initial, followed by
    more of the sentence (a word that is capitalised or a number)."""
    before = text[max(start, stop - 24):stop]
    if _ABBREVIATION.search(before):
        return True
    following = text[after:min(end, after + 1)]
    if following.isdigit() and _NUMBERED.search(before):
        return True
    return following.isupper() and bool(_INITIAL.search(before) or _LONE_INITIAL.fullmatch(text, start, stop))


def _trim(text: str, start: int, end: int) -> tuple[int, int]:
    """The span without its leading and trailing whitespace."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _lines(text: str, start: int, end: int) -> Iterator[tuple[int, int]]:
    """(start, end) of each line of text[start:end], without its newline."""
    pos = start
    while pos < end:
        nl = text.find("\n", pos, end)
        stop = end if nl < 0 else nl
        yield pos, stop
        pos = stop + 1


def heading_text(raw: str) -> str:
    """A heading as plain text: emphasis, code marks and link targets dropped; at most MAX_HEADING_CHARS."""
    text = " ".join(_MARKUP.sub(lambda m: m.group(1) or "", raw[: 4 * MAX_HEADING_CHARS]).split())
    if len(text) <= MAX_HEADING_CHARS:
        return text
    cut = text[:MAX_HEADING_CHARS]
    return cut.rsplit(" ", 1)[0] if " " in cut else cut


def atx_heading(line: str) -> tuple[int, str] | None:
    """(level, raw text) of a Markdown ATX heading line ("## Text ##"), or None.

    String scanning, not the pattern `^ {0,3}(#{1,6})[ \t]+(.*?)[ \t]*#*[ \t]*$` it replaces (same result): the
    lazy group against the trailing blanks and hashes backtracked cubically, 18 s for a 6 KB line."""
    body = line.lstrip(" ")
    if len(line) - len(body) > 3:
        return None
    text = body.lstrip("#")
    level = len(body) - len(text)
    if not 1 <= level <= 6 or text[:1] not in (" ", "\t"):
        return None
    # The closing sequence: trailing blanks, hashes, blanks.
    return level, text.strip(" \t").rstrip("#").rstrip(" \t")


def markdown_blocks(text: str, title: str | None = None) -> list[Block]:
    """The blocks of a Markdown text with their heading paths; the document title is the path's root."""
    root = (heading_text(title),) if title and heading_text(title) else ()
    headings: list[tuple[int, str]] = []  # (level, text) of the open headings
    blocks: list[Block] = []
    lines = list(_lines(text, 0, len(text)))
    i = 0

    def path() -> tuple[str, ...]:
        names = tuple(name for _, name in headings)
        return root + names[1:] if root and names and names[0].lower() == root[0].lower() else root + names

    def heading(level: int, raw: str) -> None:
        while headings and headings[-1][0] >= level:
            headings.pop()
        name = heading_text(raw)
        if name:
            headings.append((level, name))

    while i < len(lines):
        start, end = lines[i]
        line = text[start:end]
        if not line.strip():
            i += 1
            continue
        atx = atx_heading(line)
        if _RULE.match(line):
            i += 1
            continue
        if atx:
            heading(*atx)
            i += 1
            continue
        fence = _FENCE.match(line)
        if fence:
            marker = fence.group(1)
            j = i + 1
            while j < len(lines) and not text[lines[j][0] : lines[j][1]].lstrip().startswith(marker):
                j += 1
            last = min(j, len(lines) - 1)
            blocks.append(Block(start, lines[last][1], "code", path()))
            i = last + 1
            continue
        kind = "table" if _TABLE_ROW.match(line) else "list" if _LIST_ITEM.match(line) else \
            "quote" if line.lstrip().startswith(">") else "paragraph"
        j = i + 1
        while j < len(lines):
            nxt = text[lines[j][0] : lines[j][1]]
            if not nxt.strip():
                # A list goes on past a blank line when the next line is another item or indented.
                if kind == "list" and j + 1 < len(lines):
                    after = text[lines[j + 1][0] : lines[j + 1][1]]
                    if _LIST_ITEM.match(after) or after.startswith(("  ", "\t")):
                        j += 1
                        continue
                break
            if atx_heading(nxt) or _FENCE.match(nxt):
                break
            if kind == "paragraph" and _SETEXT.match(nxt) and j == i + 1:
                # "Title\n=====" is a heading (level 1 with =, 2 with -).
                break
            if kind == "paragraph" and (_LIST_ITEM.match(nxt) or _TABLE_ROW.match(nxt)):
                break
            if kind == "table" and not _TABLE_ROW.match(nxt):
                break
            j += 1
        if kind == "paragraph" and j == i + 1 and j < len(lines) and _SETEXT.match(text[lines[j][0] : lines[j][1]]):
            heading(1 if text[lines[j][0] : lines[j][1]].strip().startswith("=") else 2, line)
            i = j + 1
            continue
        blocks.append(Block(start, lines[j - 1][1], kind, path()))
        i = j
    trimmed = [(_trim(text, b.start, b.end), b) for b in blocks]
    return [Block(s, e, b.kind, b.path) for (s, e), b in trimmed if e > s]


# A sentence the answerer may quote has at least this many words; shorter ones are fragments.
MIN_SENTENCE_WORDS = 4


def answer_sentences(text: str) -> list[tuple[int, int]]:
    """(start, end) in a chunk's text of each sentence an answer may quote: the sentences of its prose and
    its whole list items; never a heading, a table row, code, or a fragment of a few words."""
    out: list[tuple[int, int]] = []
    for block in markdown_blocks(text):
        if block.kind in ("paragraph", "quote"):
            spans = [(s, e) for s, e, _ in sentence_spans(text, block.start, block.end)]
        elif block.kind == "list":
            spans = [_trim(text, s + len(m.group(0)), e) for s, e in _lines(text, block.start, block.end)
                     if (m := _LIST_ITEM.match(text[s:e]))]
        else:
            continue
        out.extend((s, e) for s, e in spans if len(text[s:e].split()) >= MIN_SENTENCE_WORDS)
    return out


class Chunker:
    """Splits a document into ChunkSpans of at most max_tokens word pieces, context included."""

    def __init__(self, tokenizer: Any, max_tokens: int, overlap_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.overlap_tokens = overlap_tokens

    def _count(self, texts: Sequence[str]) -> list[int]:
        if not texts:
            return []
        # verbose=False: counting a long text is no "sequence longer than the model's maximum" (nothing is cut).
        enc = self.tokenizer(list(texts), add_special_tokens=False, return_attention_mask=False,
                             return_token_type_ids=False, verbose=False)
        return [len(ids) for ids in enc["input_ids"]]

    def _context_budget(self, path: tuple[str, ...]) -> tuple[tuple[str, ...], int]:
        """The path as kept (inner headings dropped first if long) and the word pieces it takes."""
        while True:
            context = HEADING_SEPARATOR.join(path)
            tokens = self._count([context])[0] + 2 if context else 0  # and the blank line after it
            if tokens <= MAX_CONTEXT_TOKENS or len(path) <= 1:
                return path, min(tokens, MAX_CONTEXT_TOKENS)
            path = path[:1] + path[2:]

    def _units(self, text: str, spans: Sequence[tuple[int, int, int]], budget: int) -> list[_Unit]:
        """Token-counted units for the spans; a span over the budget is cut at token boundaries."""
        if not spans:
            return []
        enc = self.tokenizer(
            [text[s:e] for s, e, _ in spans],
            add_special_tokens=False,
            return_offsets_mapping=True,
            return_attention_mask=False,
            return_token_type_ids=False,
            verbose=False,
        )
        units: list[_Unit] = []
        for (start, end, para), ids, offsets in zip(spans, enc["input_ids"], enc["offset_mapping"], strict=True):
            n = len(ids)
            if n == 0:
                continue
            if n <= budget:
                units.append(_Unit(start, end, n, para))
                continue
            for i in range(0, n, budget):
                window = offsets[i : i + budget]
                units.append(_Unit(start + window[0][0], start + window[-1][1], len(window), para))
        return units

    def _pack(self, units: list[_Unit], budget: int, overlap: int) -> list[tuple[int, int, int]]:
        """Greedy packing of units into (start, end, tokens) up to the budget, with trailing-unit overlap."""
        out: list[tuple[int, int, int]] = []
        current: list[_Unit] = []
        tokens = 0
        for unit in units:
            if current and tokens + unit.tokens > budget:
                out.append((current[0].start, current[-1].end, tokens))
                # Carry trailing units as overlap, unless the overlap would crowd out the new unit.
                carry: list[_Unit] = []
                carried = 0
                for prev in reversed(current):
                    if carried + prev.tokens > overlap:
                        break
                    carry.insert(0, prev)
                    carried += prev.tokens
                if carried + unit.tokens > budget or len(carry) == len(current):
                    carry, carried = [], 0
                current, tokens = carry, carried
            current.append(unit)
            tokens += unit.tokens
        if current:
            out.append((current[0].start, current[-1].end, tokens))
        return out

    def split(self, text: str, *, kind: str = "text", title: str | None = None) -> list[ChunkSpan]:
        """Chunk the text (kind: text, markdown or pdf); every chunk's span indexes into the original string."""
        if kind == "markdown":
            return self._split_markdown(text, title)
        path, context_tokens = self._context_budget((heading_text(title),) if title and heading_text(title) else ())
        budget = max(self.max_tokens - context_tokens, self.max_tokens // 2)
        pieces = self._pack(self._units(text, sentence_spans(text), budget), budget, self.overlap_tokens)
        return self._spans(text, [(s, e, n, path) for s, e, n in pieces], pages=kind == "pdf")

    def _split_markdown(self, text: str, title: str | None) -> list[ChunkSpan]:
        blocks = markdown_blocks(text, title)
        sized = self._count([text[b.start : b.end] for b in blocks])
        pieces: list[tuple[int, int, int, tuple[str, ...]]] = []
        section: list[tuple[Block, int]] = []

        def close_section() -> None:
            if not section:
                return
            path, context_tokens = self._context_budget(section[0][0].path)
            budget = max(self.max_tokens - context_tokens, self.max_tokens // 2)
            units: list[_Unit] = []
            for index, (block, tokens) in enumerate(section):
                if tokens <= budget:
                    units.append(_Unit(block.start, block.end, tokens, index))
                    continue
                # Too large: its own chunks, split at sentences (prose) or lines (lists, tables, code).
                for s, e, n in self._pack(units, budget, 0):
                    pieces.append((s, e, n, path))
                units = []
                if block.kind in ("paragraph", "quote"):
                    inner = self._units(text, sentence_spans(text, block.start, block.end), budget)
                    overlap = self.overlap_tokens
                else:
                    lines = [(*_trim(text, s, e), 0) for s, e in _lines(text, block.start, block.end)]
                    inner = self._units(text, [(s, e, p) for s, e, p in lines if e > s], budget)
                    overlap = 0
                pieces.extend((s, e, n, path) for s, e, n in self._pack(inner, budget, overlap))
            pieces.extend((s, e, n, path) for s, e, n in self._pack(units, budget, 0))
            section.clear()

        for block, tokens in zip(blocks, sized, strict=True):
            if section and block.path != section[0][0].path:
                close_section()
            section.append((block, tokens))
        close_section()
        return self._spans(text, pieces, pages=False)

    @staticmethod
    def _spans(text: str, pieces: list[tuple[int, int, int, tuple[str, ...]]], *, pages: bool) -> list[ChunkSpan]:
        chunks: list[ChunkSpan] = []
        for s, e, n, path in pieces:
            if n == 0:  # only characters the tokenizer drops (control or zero-width ones): nothing to embed
                continue
            first = last = None
            if pages:
                first = text.count(PAGE_BREAK, 0, s) + 1
                last = first + text.count(PAGE_BREAK, s, e)
            body = text[s:e]
            chunks.append(ChunkSpan(len(chunks), body, n, s, e, path, first, last, tuple(answer_sentences(body))))
        return chunks

"""Load: turn an upload (or a JSON body) into plain-text documents, or refuse it with a clear error.

Loading runs in the request, so bad input is refused with a 4xx before anything is written.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from app.errors import AppError, BadInput, TooLarge, UnsupportedMedia
from app.ingest import office, sandbox
from app.ingest.chunk import PAGE_BREAK, atx_heading
from app.ingest.sandbox import Budget
from app.validation import MAX_JSON_DEPTH, check_metadata, check_text

TEXT_KINDS = {
    ".txt": "text",
    ".text": "text",
    ".md": "markdown",
    ".markdown": "markdown",
    ".html": "html",
    ".htm": "html",
    ".pdf": "pdf",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".docx": "docx",
    ".pptx": "pptx",
    ".xlsx": "xlsx",
    ".csv": "csv",
    ".tsv": "csv",
}
CONTENT_TYPES = {
    "text/plain": "text",
    "text/markdown": "markdown",
    "text/html": "html",
    "application/pdf": "pdf",
    "application/jsonl": "jsonl",
    "application/x-ndjson": "jsonl",
    "application/jsonlines": "jsonl",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": "docx",
    "application/vnd.openxmlformats-officedocument.presentationml.presentation": "pptx",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet": "xlsx",
    "text/csv": "csv",
    "text/tab-separated-values": "csv",
}
# Zip packages read by the office loaders (in the parsing sandbox: a small package can inflate).
OFFICE = {"docx": office.load_docx, "pptx": office.load_pptx, "xlsx": office.load_xlsx}
MAX_EXTERNAL_ID = 512
MAX_TITLE = 1000
MAX_PDF_PAGES = 5000
# The text one upload may yield (the settings' defaults: PGSAGE_MAX_DOCUMENT_CHARS, PGSAGE_MAX_EXPANSION_RATIO).
MAX_DOCUMENT_CHARS = 20_000_000
MAX_EXPANSION_RATIO = 100.0


@dataclass
class LoadedDocument:
    external_id: str | None
    title: str | None
    text: str
    source: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    # How the chunker reads the text: text (paragraphs), markdown (structure; HTML arrives as Markdown),
    # pdf (paragraphs, with pages separated by form feeds).
    format: str = "text"
    # What the index will not hold of it, said to the uploader (not stored): e.g. a PDF's scanned pages.
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Whatever a loader found (a first heading of a megabyte, a PDF's Title field), a title is at most
        # MAX_TITLE characters, cut at a word: the database's title terms (a tsvector) cannot hold an unbounded one.
        title = (self.title or "").strip()
        if len(title) > MAX_TITLE:
            cut = title[:MAX_TITLE]
            title = cut.rsplit(None, 1)[0] if len(cut.split(None, 1)) > 1 else cut
        self.title = title or None

    @property
    def content(self) -> str:
        """What is chunked and embedded: the title leads, since it carries much of the meaning."""
        if self.title and self.title.lower() not in self.text[: len(self.title) + 200].lower():
            return f"{self.title}\n\n{self.text}"
        return self.text

    @property
    def content_hash(self) -> str:
        return hashlib.sha256(self.content.encode("utf-8")).hexdigest()


def detect_kind(filename: str | None, content_type: str | None) -> str:
    """The loader for a file, by extension first, then declared content type."""
    suffix = PurePosixPath(filename or "").suffix.lower()
    if suffix in TEXT_KINDS:
        return TEXT_KINDS[suffix]
    ctype = (content_type or "").split(";")[0].strip().lower()
    if ctype in CONTENT_TYPES:
        return CONTENT_TYPES[ctype]
    raise UnsupportedMedia(
        f"cannot tell the type of {filename or 'the upload'!r}: use one of {', '.join(sorted(set(TEXT_KINDS)))}"
    )


def unstorable(value: Any, path: str = "", depth: int = 0) -> str | None:
    """Why Postgres cannot store this value (text and jsonb hold no NUL, no lone surrogate and only finite
    numbers), or None."""
    if depth > MAX_JSON_DEPTH:
        return f"{path[:60]}... is nested more than {MAX_JSON_DEPTH} levels deep"
    if isinstance(value, str):
        if "\x00" in value:
            return f"{path or 'a string'} contains a NUL character (\\u0000)"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return f"{path or 'a string'} contains an unpaired surrogate (invalid Unicode)"
        return None
    if isinstance(value, float) and not math.isfinite(value):
        # JSON parsers take NaN, Infinity and 1e999; jsonb does not.
        return f"{path or 'a number'} is {value!r}, not a finite number"
    if isinstance(value, dict):
        for key, item in value.items():
            shown = str(key).encode("unicode_escape").decode("ascii")[:100]
            sub = f"{path}.{shown}" if path else shown
            problem = unstorable(key, f"the key {sub}") or unstorable(item, sub, depth + 1)
            if problem:
                return problem
    if isinstance(value, list):
        for i, item in enumerate(value):
            problem = unstorable(item, f"{path}[{i}]", depth + 1)
            if problem:
                return problem
    return None


def check_storable(value: Any, where: str, path: str = "") -> None:
    """Refuse, with a 4xx, strings that would make the database reject the whole write."""
    problem = unstorable(value, path)
    if problem:
        raise BadInput(f"{where}: {problem}, which cannot be stored")


def _plain(text: str) -> str:
    """Extracted text (PDF) made storable: NULs dropped, lone surrogates replaced."""
    return text.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")


def _decode(data: bytes, name: str) -> str:
    if b"\x00" in data:
        raise BadInput(f"{name} looks like binary data, not text (it contains NUL bytes)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BadInput(f"{name} is not valid UTF-8 (bad byte at offset {exc.start})") from None
    controls = sum(1 for ch in text[:8192] if unicodedata.category(ch) == "Cc" and ch not in "\n\r\t\f")
    if controls > 0.05 * min(len(text), 8192):
        raise BadInput(f"{name} looks like binary data, not text (too many control characters)")
    return text


def _clean(text: str) -> str:
    # U+FEFF (a byte-order mark, or a zero-width no-break space) is no text: alone it made a chunk of no tokens.
    text = text.replace("\ufeff", "").replace("\r\n", "\n").replace("\r", "\n")
    # Trailing blanks cut line by line: the pattern [ \t\f\v]+\n rescanned a run of blanks from each of its
    # characters, so a megabyte of spaces took minutes (quadratic).
    text = "\n".join(line.rstrip(" \t\f\v") for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def _require_text(text: str, name: str) -> str:
    if not text.strip():
        raise BadInput(f"{name} has no text to index")
    return text


# A title has a word in it; "0000909832-21-000014" (a filing's accession number, as some PDFs carry) has none.
_READS_AS_TITLE = re.compile(r"[^\W\d_]{2,}")


def name_title(name: str) -> str:
    """A file's name as a title: its stem with underscores as spaces ("AMAZON_2017_10K.pdf" -> "AMAZON 2017 10K"),
    so the words are words to the analyser and the heading path (Markdown would read underscores as emphasis)."""
    stem = PurePosixPath(name).stem
    return " ".join(re.sub(r"_+", " ", stem).split()) or stem


def _markdown_title(text: str) -> str | None:
    """The first level-1 ATX heading's text, read as the chunker reads headings (linear in the line)."""
    for line in text.split("\n"):
        heading = atx_heading(line)
        if heading and heading[0] == 1 and heading[1]:
            return heading[1]
    return None


_HEADINGS = {f"h{n}": n for n in range(1, 7)}
_SKIPPED = ("script", "style", "noscript", "template", "svg")


def _html_markdown(root: Any) -> str:
    """The element's content as Markdown: headings, paragraphs, lists, tables and code blocks kept as such,
    so the chunker can split HTML on its structure."""
    from bs4.element import NavigableString, PreformattedString, Tag

    blocks: list[str] = []
    inline: list[str] = []

    def flush() -> None:
        line = " ".join("".join(inline).split())
        if line:
            blocks.append(line)
        inline.clear()

    def cells(row: Tag) -> str:
        texts = [" ".join(c.get_text(" ").split()).replace("|", "\\|") for c in row.find_all(["th", "td"])]
        return "| " + " | ".join(texts) + " |"

    def nested_lists(li: Tag) -> list[Tag]:
        """The lists inside an item that belong to it, not to an item nested deeper (a walk that stops at every
        deeper item: searching the item's whole subtree for each item was quadratic in the nesting)."""
        found: list[Tag] = []
        stack = list(reversed(li.contents))
        while stack:
            node = stack.pop()
            if isinstance(node, Tag) and node.name != "li":
                if node.name in ("ul", "ol"):
                    found.append(node)
                stack.extend(reversed(node.contents))
        return found

    def items(lst: Tag, depth: int) -> list[str]:
        out: list[str] = []
        for n, li in enumerate(lst.find_all("li", recursive=False), start=1):
            marker = f"{n}." if lst.name == "ol" else "-"
            nested = nested_lists(li)
            for c in nested:
                c.extract()
            text = " ".join(li.get_text(" ").split())
            if text:
                out.append(f"{'  ' * depth}{marker} {text}")
            for c in nested:
                out.extend(items(c, depth + 1))
        return out

    def walk(node: Tag) -> None:
        for child in node.children:
            if isinstance(child, NavigableString):
                if not isinstance(child, PreformattedString):  # comments, doctypes, CDATA
                    inline.append(str(child))
                continue
            if not isinstance(child, Tag) or child.name in _SKIPPED:
                continue
            name = child.name
            if name in _HEADINGS:
                flush()
                text = " ".join(child.get_text(" ").split())
                if text:
                    blocks.append("#" * _HEADINGS[name] + " " + text)
            elif name == "pre":
                flush()
                code = child.get_text().strip("\n")
                if code.strip():
                    blocks.append("```\n" + code.replace("```", "` ` `") + "\n```")
            elif name in ("ul", "ol"):
                flush()
                lines = items(child, 0)
                if lines:
                    blocks.append("\n".join(lines))
            elif name == "table":
                flush()
                rows = [cells(r) for r in child.find_all("tr")]
                rows = [r for r in rows if r.strip("| ")]
                if rows:
                    width = rows[0].count(" | ") + 1
                    blocks.append("\n".join([rows[0], "|" + " --- |" * width, *rows[1:]]))
            elif name == "br":
                inline.append(" ")
            elif name in ("p", "div", "section", "article", "main", "header", "footer", "aside", "nav",
                          "blockquote", "figure", "figcaption", "dl", "dt", "dd", "li", "address", "details",
                          "summary", "body", "form", "fieldset", "hr"):
                flush()
                walk(child)
                flush()
            else:
                walk(child)

    try:
        if _deeper_than(root, MAX_HTML_DEPTH):
            raise RecursionError
        walk(root)
        flush()
    except RecursionError:  # absurdly deep nesting: plain text, one line a block
        return _clean("\n\n".join(" ".join(line.split()) for line in root.get_text("\n").split("\n")))
    return _clean("\n\n".join(blocks))


# Elements nested deeper than this are read as plain text, not as structure: real pages nest a few dozen deep, and
# the structural walk's work on a list grows with the depth it sits at.
MAX_HTML_DEPTH = 256


def _deeper_than(root: Any, limit: int) -> bool:
    """Whether any element is nested more than limit deep under root (a walk with a stack, not recursion)."""
    from bs4.element import Tag

    stack = [(root, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in node.contents if isinstance(child, Tag))
    return False


def _load_html(text: str) -> tuple[str | None, str]:
    from bs4 import BeautifulSoup

    # Markup opened after the last ">" can never close: html.parser rescans such an opening ("<a<a<a...",
    # "</</...") from each "<" to the end (quadratic: 64 KB took 3.3 s), then keeps it as text. Escaped, it is
    # the same text, read once.
    last = text.rfind(">")
    if "<" in text[last + 1 :]:
        text = text[: last + 1] + text[last + 1 :].replace("<", "&lt;")
    soup = BeautifulSoup(text, "html.parser")
    for tag in soup(list(_SKIPPED)):
        tag.decompose()
    title = soup.title.get_text(" ", strip=True) if soup.title else None
    if not title and soup.h1:
        title = soup.h1.get_text(" ", strip=True)
    if soup.head:
        soup.head.decompose()
    return title or None, _html_markdown(soup)


def _load_pdf(data: bytes, name: str, max_pages: int, library: str,
              limit: TextLimit) -> tuple[str | None, str, dict[str, Any]]:
    if not data.lstrip().startswith(b"%PDF-"):
        raise BadInput(f"{name} is not a PDF (it does not start with %PDF-)")
    if library not in PDF_LIBRARIES:
        raise ValueError(f"unknown PDF library {library!r}; one of {', '.join(PDF_LIBRARIES)}")
    # An encrypted PDF with an empty user password (an owner password only restricts printing or copying, as many
    # published filings do) opens like any other with each library; one that needs a password to open is a 4xx.
    try:
        raw, title = _PDF_PAGES[library](data, name, max_pages, _counter(limit.check))
    except (AppError, MemoryError):
        raise
    except Exception as exc:
        # A library's failure anywhere in its use (open, a page, close: pdfplumber raises from its `with` exit)
        # on a malformed file is the file's fault: a 4xx, whatever the library calls it.
        raise _unreadable(name, exc) from None
    pages = _tidy_pages([_clean(_plain(page)) for page in raw])
    title = _plain(title).strip() if title else None
    if title and not _READS_AS_TITLE.search(title):
        title = None  # an identifier in the Title field (an EDGAR accession number...): the file name is better
    # Pages are kept apart by form feeds (empty pages too), so chunks can say which pages they span.
    text = ("\n" + PAGE_BREAK + "\n").join(pages)
    if not text.replace(PAGE_BREAK, "").strip():
        raise BadInput(f"{name} has no extractable text (a scanned PDF needs OCR first)")
    meta: dict[str, Any] = {"pages": len(pages)}
    blank = [n for n, page in enumerate(pages, start=1) if not page.strip()]
    if blank:  # scanned pages (no text layer): said, so a reader knows what the index cannot find
        meta["pages_without_text"] = blank
    return title, text, meta


def _counter(check: Callable[[int], None]) -> Callable[[str], str]:
    """A pass-through for page texts that checks the text so far against the limit (a compressed stream can
    inflate to gigabytes of text: the extraction stops at the page that crosses it)."""
    total = 0

    def count(page: str) -> str:
        nonlocal total
        total += len(page)
        check(total)
        return page

    return count


def _too_many_pages(name: str, pages: int, max_pages: int) -> None:
    if max_pages and pages > max_pages:
        raise TooLarge(f"{name} has {pages} pages, over the {max_pages}-page limit (PGSAGE_PDF_MAX_PAGES)")


def _password_protected(name: str) -> BadInput:
    return BadInput(f"{name} is password-protected: it opens only with a password; send a copy without one")


def _unreadable(name: str, exc: BaseException) -> BadInput:
    return BadInput(f"{name} is a corrupt or unreadable PDF: {exc or type(exc).__name__}")


def _pages_pypdf(data: bytes, name: str, max_pages: int, count: Callable[[str], str]) -> tuple[list[str], str | None]:
    from pypdf import PdfReader
    from pypdf.errors import DependencyError, FileNotDecryptedError

    try:
        reader = PdfReader(io.BytesIO(data), strict=False)  # decrypts AES through `cryptography`
        _too_many_pages(name, len(reader.pages), max_pages)
        pages = [count(page.extract_text() or "") for page in reader.pages]
        info = reader.metadata
        return pages, str(info.title) if info is not None and info.title else None
    except FileNotDecryptedError:
        raise _password_protected(name) from None
    except DependencyError as exc:  # an encryption this install cannot read: say which, not a 500
        raise BadInput(f"{name} uses an encryption pgsage cannot read: {exc}") from None


def _pages_pdfium(data: bytes, name: str, max_pages: int,
                  count: Callable[[str], str]) -> tuple[list[str], str | None]:
    """PDFium (Chrome's PDF engine) through pypdfium2: decrypts natively, lines in the page's reading order."""
    import pypdfium2 as pdfium
    import pypdfium2.raw as pdfium_c

    try:
        pdf = pdfium.PdfDocument(data)
    except pdfium.PdfiumError as exc:
        if getattr(exc, "err_code", None) == pdfium_c.FPDF_ERR_PASSWORD:
            raise _password_protected(name) from None
        raise
    try:
        _too_many_pages(name, len(pdf), max_pages)
        pages = []
        for i in range(len(pdf)):
            page = pdf[i]
            textpage = page.get_textpage()
            text = textpage.get_text_bounded().replace("\r\n", "\n").replace("\r", "\n")
            # PDFium gives a hyphen that ends a line as \x02 and joins the lines: put the line end back, and
            # _join_hyphens decides as for the other libraries.
            pages.append(count(text.replace("\x02", "-\n")))
            textpage.close()
            page.close()
        title = pdf.get_metadata_dict(skip_empty=True).get("Title")
        return pages, title
    finally:
        pdf.close()


def _pages_pdfplumber(data: bytes, name: str, max_pages: int,
                      count: Callable[[str], str]) -> tuple[list[str], str | None]:
    """pdfminer.six through pdfplumber, with its tables as rows: each table's rows, cells separated by " | ",
    put where the table stands among the page's lines (by its top edge)."""
    import pdfplumber
    from pdfminer.pdfdocument import PDFPasswordIncorrect
    from pdfplumber.utils.exceptions import PdfminerException

    try:
        with pdfplumber.open(io.BytesIO(data)) as pdf:
            _too_many_pages(name, len(pdf.pages), max_pages)
            pages = [count(_plumbed_page(page)) for page in pdf.pages]
            title = pdf.metadata.get("Title")
            return pages, title if isinstance(title, str) else None
    except PdfminerException as exc:
        cause = exc.args[0] if exc.args else exc
        if isinstance(cause, PDFPasswordIncorrect):
            raise _password_protected(name) from None
        raise _unreadable(name, cause) from None
    except PDFPasswordIncorrect:
        raise _password_protected(name) from None


def _plumbed_page(page: Any) -> str:
    tables = page.find_tables()
    boxes = [t.bbox for t in tables]

    def outside(obj: dict[str, Any]) -> bool:
        x, y = (obj["x0"] + obj["x1"]) / 2, (obj["top"] + obj["bottom"]) / 2
        return not any(x0 <= x <= x1 and top <= y <= bottom for x0, top, x1, bottom in boxes)

    items: list[tuple[float, str]] = [
        (line["top"], line["text"]) for line in page.filter(outside).extract_text_lines(return_chars=False)
    ]
    for table, (_, top, _, _) in zip(tables, boxes, strict=True):
        # Empty cells are dropped: ruling lines split a figure from its "$" and "%" into cells of their own.
        rows = [" | ".join(c for c in (" ".join((cell or "").split()) for cell in row) if c) for row in table.extract()]
        items.append((top, "\n".join(r for r in rows if r)))
    items.sort(key=lambda item: item[0])
    return "\n".join(text for _, text in items if text)


# The PDF text extractors pgsage can use (PGSAGE_PDF_LIBRARY); each gives a page's text in reading order, and
# the same clean-up follows (running headers and footers, hyphens). Compared on FinanceBench in BENCHMARKS.md.
_PDF_PAGES = {"pypdf": _pages_pypdf, "pdfium": _pages_pdfium, "pdfplumber": _pages_pdfplumber}
PDF_LIBRARIES = tuple(_PDF_PAGES)


# Lines at each end of a page where running headers and footers sit.
_EDGE_LINES = 3


def _edge_key(line: str, page: int) -> str:
    """A header or footer line with its numbers blanked, so "Page 3 of 90" and "Page 4 of 90" count as one: a line
    repeating on most pages' edges is a running one. A bare number is keyed by its distance from the page's
    index, so page numbers (3 on the third page, 4 on the fourth) count as one and a table's last cell does not."""
    words = " ".join(line.split()).lower()
    bare = re.fullmatch(r"[-\u2013\u2014(\s]*(\d{1,5})[-\u2013\u2014)\s]*", words)
    if bare:
        return f"#{int(bare.group(1)) - page}"
    return re.sub(r"\d+", "#", words)


def _tidy_pages(pages: list[str]) -> list[str]:
    """Page texts as a reader sees them: running headers, footers and page numbers that repeat on most pages
    dropped from the pages' edges, and words broken by a hyphen at a line end joined (see _join_hyphens)."""
    lines = [page.split("\n") if page else [] for page in pages]
    with_text = [ls for ls in lines if any(line.strip() for line in ls)]
    repeated: set[str] = set()
    if len(with_text) >= 3:
        seen: dict[str, int] = {}
        for page, ls in enumerate(lines):
            edges = {_edge_key(line, page) for line in ls[:_EDGE_LINES] + ls[-_EDGE_LINES:] if line.strip()}
            for key in edges:
                seen[key] = seen.get(key, 0) + 1
        repeated = {key for key, n in seen.items() if n >= max(3, 0.6 * len(with_text))}
    out = []
    for page, ls in enumerate(lines):
        top, bottom = 0, len(ls)
        while top < min(bottom, _EDGE_LINES) and _is_running(ls[top], page, repeated):
            top += 1
        while bottom > max(top, len(ls) - _EDGE_LINES) and _is_running(ls[bottom - 1], page, repeated):
            bottom -= 1
        out.append("\n".join(ls[top:bottom]).strip())
    return _join_hyphens(out)


def _join_hyphens(pages: list[str]) -> list[str]:
    """A word broken at a line end ("environ-" / "mental") joined, by what the document itself writes: as one word
    when it writes the whole word elsewhere ("environmental"), else with its hyphen ("long-" / "term" is
    "long-term": filings set from HTML are not hyphenated, so most line-end hyphens are the word's own)."""
    words = {w.lower() for page in pages for w in re.findall(r"[A-Za-z]+", page)}

    def join(m: re.Match[str]) -> str:
        head, tail = m.group(1), m.group(2)
        return head + tail if (head + tail).lower() in words else f"{head}-{tail}"

    # The look-behind starts a match only at a word's first letter: without it a long run of letters was rescanned
    # from each of its letters (quadratic); a match could only ever start there anyway.
    return [re.sub(r"(?<![A-Za-z])([A-Za-z]+)-\n([a-z]+)", join, page) for page in pages]


def _is_running(line: str, page: int, repeated: set[str]) -> bool:
    """An edge line that is blank, or a header, footer or page number that repeats on most pages. (A lone
    number on only a few pages' edges, such as a table's last cell, stays.)"""
    return not line.strip() or _edge_key(line, page) in repeated


def _scan_warnings(name: str, blank: list[int]) -> list[str]:
    """The uploader's warning for a PDF's pages without a text layer (scanned: nothing on them can be found until
    they are OCR'd)."""
    if not blank:
        return []
    shown = ", ".join(map(str, blank[:20])) + (f" and {len(blank) - 20} more" if len(blank) > 20 else "")
    if len(blank) == 1:
        return [f"{name}: page {shown} has no text layer (scanned?); nothing on it can be found until it is OCR'd"]
    return [f"{name}: pages {shown} have no text layer (scanned?); nothing on them can be found until they are "
            "OCR'd"]


def _check_metadata(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadInput(f"{where}: metadata must be a JSON object")
    return value


def check_external_id(value: Any, where: str) -> str | None:
    """External ids are non-empty strings (numbers are accepted and turned into strings)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise BadInput(f"{where}: id must be a string")
    ext = str(value).strip()
    if not ext or len(ext) > MAX_EXTERNAL_ID or any(unicodedata.category(c) == "Cc" for c in ext):
        raise BadInput(f"{where}: id must be 1-{MAX_EXTERNAL_ID} printable characters")
    return ext


def _file_name(filename: str | None) -> str:
    """An upload's base name, which is its external id when no path is sent: printable, at most MAX_EXTERNAL_ID."""
    name = PurePosixPath(filename or "upload").name or "upload"
    shown = name[:100].encode("unicode_escape").decode("ascii")
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in name):
        raise BadInput(f"the file name {shown!r} holds a control character, NUL or unpaired surrogate: send a "
                       "printable name (or a 'path' field)")
    if len(name) > MAX_EXTERNAL_ID:
        raise BadInput(f"the file name {shown!r}... is over {MAX_EXTERNAL_ID} characters: send a shorter one")
    return name


def check_path(value: str) -> str:
    """A file's path as its external id: relative POSIX, 1-512 printable characters, no `..` or empty segments."""
    # Refused rather than normalised: `./a.md`, `a//a.md` and `a.md` must not become three ids for one file.
    where = f"the path field {value[:100]!r}"
    if not value or len(value) > MAX_EXTERNAL_ID:
        raise BadInput(f"{where}: a path must be 1-{MAX_EXTERNAL_ID} characters")
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in value):
        raise BadInput(f"{where}: a path must be printable characters (no NUL, control characters or surrogates)")
    if value.startswith("/"):
        raise BadInput(f"{where}: a path must be relative to the folder ingested, not absolute")
    parts = value.split("/")
    if ".." in parts:
        raise BadInput(f"{where}: a path must not contain '..' segments")
    if any(part in ("", ".") for part in parts):
        raise BadInput(f"{where}: a path must be normalised (no empty or '.' segments, no trailing '/')")
    return value


def _load_jsonl(text: str, name: str) -> list[LoadedDocument]:
    docs: list[LoadedDocument] = []
    seen: set[str] = set()
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{name} line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadInput(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})") from None
        except RecursionError:
            raise BadInput(f"{where}: the JSON is nested too deeply") from None
        except ValueError as exc:  # an integer literal over Python's 4,300-digit limit
            raise BadInput(f"{where}: malformed JSON ({exc})") from None
        if not isinstance(obj, dict):
            raise BadInput(f'{where}: each line must be a JSON object like {{"_id", "title", "text"}}')
        check_storable(obj, where)
        body = obj.get("text")
        if not isinstance(body, str) or not body.strip():
            raise BadInput(f'{where}: "text" must be a non-empty string')
        ext = check_external_id(obj.get("_id", obj.get("id", obj.get("external_id"))), where)
        if ext is None:
            # A line's id is what a later upload replaces it by; without one the file cannot be sent again.
            raise BadInput(f'{where}: each line needs an "_id" (a non-empty string or number)')
        if ext in seen:
            raise BadInput(f"{where}: duplicate id {ext!r} in the same file")
        seen.add(ext)
        title = obj.get("title")
        if title is not None and not isinstance(title, str):
            raise BadInput(f'{where}: "title" must be a string')
        try:  # the API's rules for a title and metadata (a title's line breaks and tabs are its own)
            check_text(" ".join((title or "").split()), f'{where}: "title"', one_line=True, blank_ok=True)
            check_metadata(obj.get("metadata") or {}, f"{where}: metadata")
        except ValueError as exc:
            raise BadInput(str(exc)) from None
        docs.append(
            LoadedDocument(
                ext,
                title,
                _clean(body),
                source=name,
                metadata=_check_metadata(obj.get("metadata"), where),
            )
        )
    if not docs:
        raise BadInput(f"{name} holds no documents")
    return docs


def load_upload(
    filename: str | None,
    content_type: str | None,
    data: bytes,
    max_bytes: int,
    *,
    external_id: str | None = None,
    budget: Budget | None = None,
    max_pages: int = MAX_PDF_PAGES,
    pdf_library: str = "pdfium",
    max_chars: int = MAX_DOCUMENT_CHARS,
    max_ratio: float = MAX_EXPANSION_RATIO,
) -> list[LoadedDocument]:
    """Parse one uploaded file into documents; raise a 4xx AppError on anything unusable.

    With a budget, every format is parsed in a child process within it (see sandbox): no parse, however
    hostile the file, holds the API's threads or memory. The API passes one; tests may parse in-process."""
    # The base name is the id only when the client sends no path: documents stored before paths keep theirs.
    name = external_id or _file_name(filename)
    if len(data) > max_bytes:
        raise TooLarge(f"{name} is larger than the {max_bytes}-byte upload limit")
    if not data.strip():
        raise BadInput(f"{name} is empty")
    kind = detect_kind(filename, content_type)
    limit = TextLimit(name, len(data), max_chars, max_ratio)
    args = (kind, data, name, max_pages, pdf_library, limit)
    docs: list[LoadedDocument] = sandbox.run(_parse, args, budget, name) if budget else _parse(*args)
    return docs


@dataclass(frozen=True)
class TextLimit:
    """How much text an upload may yield: PGSAGE_MAX_DOCUMENT_CHARS, and PGSAGE_MAX_EXPANSION_RATIO times its
    size (a zip package, a compressed PDF stream or a CSV of long column names can yield far more text than
    it has bytes)."""

    name: str
    size: int
    max_chars: int
    max_ratio: float

    @property
    def chars(self) -> int:
        return min(self.max_chars, max(int(self.size * self.max_ratio), 1))

    def check(self, chars: int) -> None:
        """A 413 naming the limit once the text yielded so far is over it."""
        if chars <= self.chars:
            return
        if self.chars == self.max_chars:
            raise TooLarge(f"{self.name} yields more than {self.max_chars:,} characters of text, the limit of one "
                           "upload (PGSAGE_MAX_DOCUMENT_CHARS)")
        raise TooLarge(f"{self.name} yields more than {self.chars:,} characters of text from {self.size:,} bytes, "
                       f"over {self.max_ratio:g} characters a byte (PGSAGE_MAX_EXPANSION_RATIO)")


def _parse(kind: str, data: bytes, name: str, max_pages: int, pdf_library: str,
           limit: TextLimit) -> list[LoadedDocument]:
    """The documents of an upload of this kind (in the sandbox when the API calls), within the text limit."""
    if kind == "pdf":
        title, text, meta = _load_pdf(data, name, max_pages, pdf_library, limit)
        docs = [LoadedDocument(name, title or name_title(name), text, source=name, metadata=meta, format="pdf",
                               warnings=_scan_warnings(name, meta.get("pages_without_text", [])))]
    elif kind in OFFICE:
        title, markdown = OFFICE[kind](data, name, limit.check)
        limit.check(len(markdown))
        docs = [LoadedDocument(name, title or name_title(name), _require_text(_clean(markdown), name),
                               source=name, format="markdown")]
    elif kind == "csv":
        _, markdown = office.load_csv(_decode(data, name), name, limit.check)
        limit.check(len(markdown))
        docs = [LoadedDocument(name, name_title(name), _require_text(_clean(markdown), name), source=name,
                               format="markdown")]
    elif kind == "jsonl":
        docs = _load_jsonl(_decode(data, name), name)
    elif kind == "html":
        title, body = _load_html(_decode(data, name))
        docs = [LoadedDocument(name, title or name_title(name), _require_text(body, name), source=name,
                               format="markdown")]
    else:
        body = _require_text(_clean(_decode(data, name)), name)
        title = _markdown_title(body) if kind == "markdown" else None
        docs = [LoadedDocument(name, title or name_title(name), body, source=name,
                               format="markdown" if kind == "markdown" else "text")]
    limit.check(sum(len(doc.text) for doc in docs))
    return docs


def load_json(text: str, title: str | None, metadata: dict[str, Any] | None, external_id: str | None,
              max_chars: int = MAX_DOCUMENT_CHARS) -> LoadedDocument:
    """A document sent as a JSON body (the API runs it in the parsing sandbox, as it does every upload)."""
    check_storable({"text": text, "title": title, "metadata": metadata}, "the document")
    TextLimit("the document", len(text), max_chars, 1.0).check(len(text))
    body = _require_text(_clean(text), "the document's text")
    doc = LoadedDocument(
        check_external_id(external_id, "external_id"), title, body, source="api", metadata=metadata or {}
    )
    if doc.external_id is None:
        # No id given: the content is the identity, so resending it is a no-op.
        doc.external_id = "sha256:" + doc.content_hash[:32]
    return doc

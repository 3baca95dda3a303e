"""Office formats to Markdown, so the chunker sees their structure: DOCX, PPTX, XLSX and CSV.

- DOCX: headings (Title, Heading 1-9) become Markdown headings, so they make the heading path; list paragraphs
  list items; tables Markdown tables (one row per line, cells apart), in document order.
- PPTX: one section per slide under its title, its text (bullets as list items), its tables, and its speaker
  notes.
- XLSX: one section per sheet; each row a record with its column names ("Region: West; Sales: 1200"), the
  header being the sheet's first non-empty row. CSV: the same for its one table.

Each function takes the file's bytes and returns (title or None, Markdown). A file the library cannot read is a
BadInput naming the format; the API runs these in the parsing sandbox (a zip package can inflate), tests may
call them directly.
"""

from __future__ import annotations

import csv
import io
import zipfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import date, datetime, time
from typing import Any

from app.errors import AppError, BadInput

# Rows of a sheet or CSV file beyond this are refused (a record per row; the upload limit bounds CSV anyway).
MAX_ROWS = 1_000_000
# Each loader is handed a check of the text it has made so far (the loader's TextLimit.check): a package of a
# hundred kilobytes can inflate to tens of millions of characters, and a CSV of long column names repeats them
# in every record, so the loaders stop at the block that crosses the limit rather than at the end.
Check = Callable[[int], None]


def _unchecked(chars: int) -> None:
    """No limit (a caller that bounds the text itself)."""


def _cell(value: Any) -> str:
    """A cell's value as text: integral floats without '.0', dates in ISO form, one line."""
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    elif isinstance(value, datetime | date | time):
        value = value.isoformat()
    return " ".join(str(value).split())


def _table(rows: Iterable[list[str]]) -> str:
    """A Markdown table, the first row as its header; '|' in cells escaped."""
    lines: list[str] = []
    for i, row in enumerate(rows):
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
        if i == 0:
            lines.append("|" + " --- |" * len(row))
    return "\n".join(lines)


def _records(rows: Iterator[list[str]], what: str, check: Check) -> list[str]:
    """Rows as list items of 'column: value' pairs (empty cells left out); the first non-empty row names the
    columns (a blank name becomes 'column N')."""
    header: list[str] | None = None
    out: list[str] = []
    chars = 0
    for n, row in enumerate(rows):
        if n >= MAX_ROWS:
            raise BadInput(f"{what} has more than {MAX_ROWS:,} rows")
        if not any(row):
            continue
        if header is None:
            header = [c or f"column {i + 1}" for i, c in enumerate(row)]
            continue
        names = header + [f"column {i + 1}" for i in range(len(header), len(row))]
        pairs = [f"{names[i]}: {c}" for i, c in enumerate(row) if c]
        out.append("- " + "; ".join(pairs))
        chars += len(out[-1]) + 1
        check(chars)
    if header is not None and not out:  # a header alone is still what the sheet says (its named columns)
        out.append("- columns: " + "; ".join(name for i, name in enumerate(header) if name != f"column {i + 1}"))
    return out


@contextmanager
def _reading(data: bytes, what: str) -> Iterator[None]:
    """Around a library reading an Office package: not a zip package, or a failure of the library on a hostile
    or corrupt file, is a BadInput naming the file and its format."""
    if not zipfile.is_zipfile(io.BytesIO(data)):
        raise BadInput(f"{what} is not an Office Open XML file (it is not a zip package)")
    try:
        yield
    except AppError:
        raise
    except Exception as exc:
        raise BadInput(f"{what} is corrupt or unreadable: {type(exc).__name__}: {str(exc)[:200]}") from None


def load_docx(data: bytes, name: str, check: Check = _unchecked) -> tuple[str | None, str]:
    from docx import Document
    from docx.table import Table

    with _reading(data, f"{name} (DOCX)"):
        doc = Document(io.BytesIO(data))
        blocks: list[str] = []
        chars = 0
        first_heading = ""

        def add(block: str) -> None:
            nonlocal chars
            blocks.append(block)
            chars += len(block) + 2
            check(chars)

        for item in doc.iter_inner_content():
            if isinstance(item, Table):
                rows = [[_cell(c.text) for c in row.cells] for row in item.rows]
                if any(any(r) for r in rows):
                    add(_table(rows))
                continue
            text = _cell(item.text)
            if not text:
                continue
            style = (item.style.name if item.style is not None else "") or ""
            level = 1 if style == "Title" else _heading_level(style)
            if level:
                add("#" * level + " " + text)
                first_heading = first_heading or text
            elif style.startswith("List") or (item._p.pPr is not None and item._p.pPr.numPr is not None):
                add("- " + text)
            else:
                add(text)
        title = _cell(doc.core_properties.title) or first_heading
    return title or None, "\n\n".join(_join_lists(blocks))


def _heading_level(style: str) -> int:
    if style.startswith("Heading "):
        level = style.removeprefix("Heading ").strip()
        if level.isdigit() and 1 <= int(level) <= 6:
            return int(level)
    return 0


def _join_lists(blocks: list[str]) -> list[str]:
    """Consecutive list items and table rows stay one block (a list, a table), not paragraphs apart."""
    out: list[str] = []
    for block in blocks:
        if out and block.startswith("- ") and out[-1].split("\n")[-1].startswith("- "):
            out[-1] += "\n" + block
        else:
            out.append(block)
    return out


def load_pptx(data: bytes, name: str, check: Check = _unchecked) -> tuple[str | None, str]:
    from pptx import Presentation

    with _reading(data, f"{name} (PPTX)"):
        deck = Presentation(io.BytesIO(data))
        sections: list[str] = []
        first_title = ""
        for number, slide in enumerate(deck.slides, start=1):
            title_shape = slide.shapes.title
            title = _cell(title_shape.text) if title_shape is not None and title_shape.has_text_frame else ""
            first_title = first_title or title
            blocks = [f"## Slide {number}: {title}" if title else f"## Slide {number}"]
            for shape in _shapes(slide.shapes):
                if title_shape is not None and shape.shape_id == title_shape.shape_id:
                    continue
                if getattr(shape, "has_table", False) and shape.has_table:
                    rows = [[_cell(c.text) for c in row.cells] for row in shape.table.rows]
                    if any(any(r) for r in rows):
                        blocks.append(_table(rows))
                elif getattr(shape, "has_text_frame", False) and shape.has_text_frame:
                    lines = [(p.level, _cell("".join(r.text for r in p.runs) or p.text))
                             for p in shape.text_frame.paragraphs]
                    lines = [(level, text) for level, text in lines if text]
                    if len(lines) > 1:
                        blocks.append("\n".join("  " * level + "- " + text for level, text in lines))
                    elif lines:
                        blocks.append(lines[0][1])
            if slide.has_notes_slide:
                notes = _cell(slide.notes_slide.notes_text_frame.text) if slide.notes_slide.notes_text_frame else ""
                if notes:
                    blocks.append(f"Speaker notes: {notes}")
            sections.append("\n\n".join(blocks))
            check(sum(len(section) + 2 for section in sections))
        title = _cell(deck.core_properties.title) or first_title
    return title or None, "\n\n".join(sections)


def _shapes(shapes: Any) -> Iterator[Any]:
    """A slide's shapes, those inside groups included, in reading order (top to bottom, left to right)."""
    flat: list[Any] = []
    stack = list(shapes)
    while stack:
        shape = stack.pop(0)
        if hasattr(shape, "shapes"):  # a group
            stack = list(shape.shapes) + stack
        else:
            flat.append(shape)
    yield from sorted(flat, key=lambda s: ((s.top or 0) // 10_000, s.left or 0))


def load_xlsx(data: bytes, name: str, check: Check = _unchecked) -> tuple[str | None, str]:
    from openpyxl import load_workbook

    with _reading(data, f"{name} (XLSX)"):
        book = load_workbook(io.BytesIO(data), read_only=True, data_only=True)
        sections: list[str] = []
        for sheet in book.worksheets:
            rows = ([_cell(v) for v in row] for row in sheet.iter_rows(values_only=True))
            done = sum(len(section) + 2 for section in sections)

            def check_sheet(chars: int, done: int = done) -> None:
                check(done + chars)

            records = _records(_trimmed(rows), f"{name}, sheet {sheet.title!r}", check_sheet)
            if records:
                sections.append(f"## {sheet.title}\n\n" + "\n".join(records))
        title = _cell(book.properties.title) if book.properties is not None else ""
        book.close()
    return title or None, "\n\n".join(sections)


def _trimmed(rows: Iterable[list[str]]) -> Iterator[list[str]]:
    """Rows without their trailing empty cells (sheets report every column of their used range)."""
    for row in rows:
        while row and not row[-1]:
            row.pop()
        yield row


def load_csv(text: str, name: str, check: Check = _unchecked) -> tuple[str | None, str]:
    """A CSV (or TSV) file's rows as records; the dialect sniffed from its start, commas when unsure."""
    # The sniffer's patterns scan from every quote to the end of its sample (quadratic: 24,000 characters of ',"a'
    # took 2.3 s): a few whole lines are enough to tell the delimiter.
    sample = text[:4096]
    if "\n" in sample:
        sample = sample[: sample.rindex("\n")]
    try:
        dialect: Any = csv.Sniffer().sniff(sample, delimiters=",;\t|")
    except csv.Error:
        dialect = csv.excel
    try:
        rows = ([_cell(c) for c in row] for row in csv.reader(io.StringIO(text), dialect))
        records = _records(_trimmed(rows), name, check)
    except csv.Error as exc:
        raise BadInput(f"{name} is not valid CSV: {exc}") from None
    return None, "\n".join(records)

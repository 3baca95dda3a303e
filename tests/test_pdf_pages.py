"""Issue 15, point 1: PDFs as published. Running headers, footers and page numbers that repeat on most pages are
removed, words hyphenated at line ends are joined, and a page without a text layer is reported, not hidden."""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.ingest import load
from app.ingest.chunk import PAGE_BREAK
from tests.fixtures.helpers import make_pdf, upload, wait_for_job


@pytest.fixture(params=load.PDF_LIBRARIES)
def load_upload(request: pytest.FixtureRequest) -> Any:
    """The loader with each PDF library in turn: every one must give the same clean page texts."""
    return partial(load.load_upload, pdf_library=request.param)

HEADER = "ACME Corporation | Annual Report 2022"


def _page(n: int, body: list[str]) -> list[str]:
    return [HEADER, *body, f"Page {n} of 5"]


def test_running_headers_footers_and_page_numbers_are_removed(load_upload: Any) -> None:
    pages = [
        _page(1, ["Revenue grew in every segment.", "The board met four times."]),
        _page(2, ["Operating margin was 21 percent.", "Headcount rose to 1,200."]),
        _page(3, ["The company opened two plants.", "Capital spending fell."]),
        _page(4, ["Cash flow from operations rose.", "Debt was repaid early."]),
        _page(5, ["The outlook for 2023 is cautious.", HEADER + " appears once in the body too."]),
    ]
    [doc] = load_upload("report.pdf", None, make_pdf(*pages), 10**7)
    text = doc.content
    assert text.count(PAGE_BREAK) == 4  # page boundaries kept for citations
    assert "Page 3 of 5" not in text
    assert text.count(HEADER) == 1  # the running header is gone; the sentence that quotes it stays
    for line in ("Revenue grew in every segment.", "Debt was repaid early.", "The outlook for 2023 is cautious."):
        assert line in text
    assert doc.metadata["pages"] == 5
    assert "pages_without_text" not in doc.metadata


def test_bare_page_numbers_go_and_a_number_ending_one_page_stays(load_upload: Any) -> None:
    bodies = [["Revenue by region", "Europe grew fastest"], ["Balance sheet", "Total assets", "2022"],
              ["Cash flow", "Operations generated cash"], ["Risk factors", "Rates may rise"],
              ["Outlook", "Demand is steady"]]
    pages = [[*body, str(n)] for n, body in enumerate(bodies, start=1)]
    [doc] = load_upload("numbers.pdf", None, make_pdf(*pages), 10**7)
    body = [p.strip().splitlines() for p in doc.content.split(PAGE_BREAK)]
    # (The content opens with the title.) The page numbers are gone; a table's last cell on one page is no
    # running footer.
    assert [lines[-len(expected):] for lines, expected in zip(body, bodies, strict=True)] == bodies
    assert all(len(lines) == len(expected) for lines, expected in zip(body[1:], bodies[1:], strict=True))


def test_hyphenation_at_line_ends_is_joined(load_upload: Any) -> None:
    [doc] = load_upload("memo.pdf", None, make_pdf(["The environ-", "mental review found no environmental issues,",
                                                       "and the long-", "term plan of the state-owned utility holds."]),
                        10**7)
    assert "environmental review" in doc.content  # the document writes the whole word elsewhere: one word
    assert "long-term plan" in doc.content  # it does not write "longterm": the hyphen is the word's own
    assert "state-owned" in doc.content  # a hyphen inside a line is left alone


def test_a_page_without_text_is_reported(load_upload: Any) -> None:
    [doc] = load_upload("scan.pdf", None, make_pdf(["First page text."], [], ["Third page text."]), 10**7)
    assert doc.metadata["pages"] == 3
    assert doc.metadata["pages_without_text"] == [2]
    assert "First page text." in doc.content
    assert "Third page text." in doc.content
    assert doc.warnings == ["scan.pdf: page 2 has no text layer (scanned?); nothing on it can be found "
                            "until it is OCR'd"]


def test_the_uploader_is_told_which_pages_have_no_text_layer(client: TestClient, worker: Any,
                                                             collection: str) -> None:
    """Accepted and indexed (the other pages are searchable), and the 202 says what the index will not hold."""
    pdf = make_pdf(["Tidal range is largest at spring tides."], [], [], ["Neap tides come at the quarter moons."])
    r = upload(client, "survey.pdf", pdf, collection)
    assert r.status_code == 202, r.text
    assert r.json()["warnings"] == ["survey.pdf: pages 2, 3 have no text layer (scanned?); nothing on them can be "
                                    "found until they are OCR'd"]
    assert wait_for_job(client, r.json()["job_id"])["state"] == "succeeded"
    plain = upload(client, "notes.pdf", make_pdf(["Every page has text."]), collection)
    assert plain.status_code == 202
    assert plain.json()["warnings"] == []


def _with_title(pdf: bytes, title: str) -> bytes:
    import io

    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter()
    writer.append(PdfReader(io.BytesIO(pdf)))
    writer.add_metadata({"/Title": title})
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def test_a_title_that_is_an_identifier_gives_way_to_the_file_name(load_upload: Any) -> None:
    body = make_pdf(["Net sales rose 20 percent.", "Operating income doubled."])
    # Filings often carry their EDGAR accession number as the PDF title: no word a question could match.
    [filing] = load_upload("AMAZON_2017_10K.pdf", None, _with_title(body, "0000909832-21-000014"), 10**7)
    assert filing.title == "AMAZON 2017 10K"
    assert filing.content.startswith("AMAZON 2017 10K")
    [titled] = load_upload("amzn-10k.pdf", None, _with_title(body, "Amazon.com Annual Report 2017"), 10**7)
    assert titled.title == "Amazon.com Annual Report 2017"
    [plain] = load_upload("quarterly_report__q2.pdf", None, body, 10**7)
    assert plain.title == "quarterly report q2"


def _table_pdf() -> bytes:
    """A page with a sentence, a ruled table of three rows, and a sentence after it (fpdf2)."""
    from fpdf import FPDF

    pdf = FPDF()
    pdf.add_page()
    pdf.set_font("Helvetica", size=11)
    pdf.cell(0, 8, "Segment results for the year are below.", new_x="LMARGIN", new_y="NEXT")
    with pdf.table(col_widths=(60, 40, 40)) as table:
        for row in (("Segment", "2022", "2021"), ("Cloud services", "4,120", "3,310"), ("Devices", "1,877", "2,045")):
            cells = table.row()
            for cell in row:
                cells.cell(cell)
    pdf.cell(0, 8, "Cloud grew fastest.", new_x="LMARGIN", new_y="NEXT")
    return bytes(pdf.output())


def test_pdfplumber_keeps_a_table_as_rows_where_it_stands() -> None:
    [doc] = load.load_upload("segments.pdf", None, _table_pdf(), 10**7, pdf_library="pdfplumber")
    lines = [line.strip() for line in doc.content.splitlines() if line.strip()]
    rows = ["Segment | 2022 | 2021", "Cloud services | 4,120 | 3,310", "Devices | 1,877 | 2,045"]
    at = lines.index(rows[0])
    assert lines[at : at + 3] == rows  # cells kept apart, rows in order, not split
    assert lines.index("Segment results for the year are below.") < at < lines.index("Cloud grew fastest.")


def test_metadata_a_client_sends_does_not_pass_for_the_loaders_report(client: TestClient, collection: str) -> None:
    """The warning comes from what the loader found: a client's own "pages_without_text" field is kept as its
    metadata, and neither breaks the upload nor is taken for a scanned page."""
    for value in ("5", "[1, 2]", '"two"'):
        r = upload(client, "notes.txt", b"Plain text with every line searchable.", collection,
                   metadata=f'{{"pages_without_text": {value}}}')
        assert r.status_code == 202, r.text
        assert r.json()["warnings"] == []

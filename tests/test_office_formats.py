"""Office formats (issue 15, point 2): DOCX, PPTX, XLSX and CSV files built here with the real libraries load with
their structure (headings as the heading path, tables as rows, slides with their notes, sheets as records), and
bad or fuzzed input is a 4xx, never a crash."""

from __future__ import annotations

import io
import zipfile
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.errors import AppError, BadInput
from app.ingest.load import load_upload
from tests.fixtures.helpers import upload, wait_for_job

LIMIT = 10_000_000


def make_docx() -> bytes:
    from docx import Document

    doc = Document()
    doc.core_properties.title = "Field Manual"
    doc.add_heading("Field Manual", level=0)  # the Title style
    doc.add_heading("Setting up camp", level=1)
    doc.add_paragraph("Pitch the tent on level ground, away from dry riverbeds.")
    doc.add_heading("Water", level=2)
    doc.add_paragraph("Boil water for one minute before drinking it.")
    doc.add_paragraph("Carry two litres per person", style="List Bullet")
    doc.add_paragraph("Refill at every spring", style="List Bullet")
    doc.add_heading("Supplies", level=1)
    table = doc.add_table(rows=3, cols=3)
    rows = [["Item", "Quantity", "Weight | kg"], ["Stove", "1", "0.4"], ["Fuel canister", "2", "0.9"]]
    for r, row in enumerate(rows):
        for c, value in enumerate(row):
            table.cell(r, c).text = value
    out = io.BytesIO()
    doc.save(out)
    return out.getvalue()


def make_pptx() -> bytes:
    from pptx import Presentation
    from pptx.util import Inches

    deck = Presentation()
    slide = deck.slides.add_slide(deck.slide_layouts[1])  # title and content
    slide.shapes.title.text = "Quarterly results"
    body = slide.placeholders[1].text_frame
    body.text = "Revenue grew 12 percent"
    body.add_paragraph().text = "Churn fell to 3 percent"
    slide.notes_slide.notes_text_frame.text = "Mention the new Lisbon office when presenting this slide."
    second = deck.slides.add_slide(deck.slide_layouts[5])  # title only
    second.shapes.title.text = "Headcount by team"
    shape = second.shapes.add_table(3, 2, Inches(1), Inches(2), Inches(6), Inches(2))
    for r, row in enumerate([["Team", "People"], ["Platform", "14"], ["Research", "9"]]):
        for c, value in enumerate(row):
            shape.table.cell(r, c).text = value
    out = io.BytesIO()
    deck.save(out)
    return out.getvalue()


def make_xlsx() -> bytes:
    from openpyxl import Workbook

    book = Workbook()
    sales = book.active
    sales.title = "Sales"
    for row in [["Region", "Quarter", "Revenue"], ["West", "Q1", 1200], ["East", "Q1", 950.0], [None, None, None],
                ["North", "Q2", 1310.5]]:
        sales.append(row)
    staff = book.create_sheet("Staff")
    staff.append(["Name", "Role"])
    staff.append(["Ada", "Engineer"])
    out = io.BytesIO()
    book.save(out)
    return out.getvalue()


def test_docx_headings_lists_and_tables() -> None:
    [doc] = load_upload("manual.docx", None, make_docx(), LIMIT)
    assert doc.title == "Field Manual"
    assert doc.format == "markdown"
    assert "# Field Manual" in doc.text
    assert "## Water" in doc.text
    assert "- Carry two litres per person\n- Refill at every spring" in doc.text
    assert "| Item | Quantity | Weight \\| kg |" in doc.text
    assert "| Stove | 1 | 0.4 |" in doc.text


def test_docx_headings_become_the_heading_path(client: TestClient, worker: Any, collection: str) -> None:
    r = upload(client, "manual.docx", make_docx(), collection)
    assert r.status_code == 202, r.text
    assert wait_for_job(client, r.json()["job_id"])["state"] == "succeeded"
    hits = client.post("/v1/search", json={"query": "boil water before drinking", "collection": collection}).json()
    top = hits["results"][0]
    assert "Boil water for one minute" in top["text"]
    assert top["heading_path"][-2:] == ["Setting up camp", "Water"]
    hits = client.post("/v1/search", json={"query": "fuel canister weight", "collection": collection}).json()
    assert "| Fuel canister | 2 | 0.9 |" in hits["results"][0]["text"]


def test_pptx_slides_tables_and_notes() -> None:
    [doc] = load_upload("results.pptx", None, make_pptx(), LIMIT)
    assert doc.title == "Quarterly results"
    assert "## Slide 1: Quarterly results" in doc.text
    assert "- Revenue grew 12 percent\n- Churn fell to 3 percent" in doc.text
    assert "Speaker notes: Mention the new Lisbon office" in doc.text
    assert "## Slide 2: Headcount by team" in doc.text
    assert "| Platform | 14 |" in doc.text


def test_xlsx_sheets_as_records_with_column_names() -> None:
    [doc] = load_upload("sales.xlsx", None, make_xlsx(), LIMIT)
    assert "## Sales" in doc.text
    assert "- Region: West; Quarter: Q1; Revenue: 1200" in doc.text
    assert "- Region: East; Quarter: Q1; Revenue: 950" in doc.text
    assert "- Region: North; Quarter: Q2; Revenue: 1310.5" in doc.text
    assert "## Staff\n\n- Name: Ada; Role: Engineer" in doc.text


def test_csv_and_tsv_rows_as_records() -> None:
    [doc] = load_upload("people.csv", None, b"name,city,note\nAda,London,\"likes, commas\"\nGrace,,\n", LIMIT)
    assert doc.text == "- name: Ada; city: London; note: likes, commas\n- name: Grace"
    [tsv] = load_upload("people.tsv", None, b"name\tcity\nAda\tLondon\n", LIMIT)
    assert tsv.text == "- name: Ada; city: London"


@pytest.mark.parametrize(("name", "data", "reason"), [
    ("broken.docx", b"PK\x03\x04 not really a zip", "not an Office Open XML file"),
    ("plain.docx", b"just some text, not a package", "not an Office Open XML file"),
    ("empty-zip.pptx", None, "corrupt or unreadable"),
    ("deck.xlsx", b"%PDF-1.4 wrong format", "not an Office Open XML file"),
    ("header-only.csv", b"\n\n", "is empty"),
])
def test_bad_office_files_are_refused(name: str, data: bytes | None, reason: str) -> None:
    if data is None:
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as z:
            z.writestr("hello.txt", "a zip, but no presentation")
        data = out.getvalue()
    with pytest.raises(BadInput, match=reason):
        load_upload(name, None, data, LIMIT)


def test_bad_office_files_over_http_are_a_4xx(client: TestClient, collection: str) -> None:
    r = upload(client, "broken.docx", b"PK\x03\x04 not really a zip", collection)
    assert r.status_code == 422, r.text
    assert "DOCX" in r.json()["detail"]


def _mutated(data: bytes) -> st.SearchStrategy[bytes]:
    """The file with a few bytes changed, cut short, or with bytes inserted."""
    return st.one_of(
        st.tuples(st.integers(0, len(data) - 1), st.binary(min_size=1, max_size=8)).map(
            lambda t: data[: t[0]] + t[1] + data[t[0] + len(t[1]):]),
        st.integers(1, len(data) - 1).map(lambda n: data[:n]),
        st.binary(max_size=512),
    )


@pytest.mark.parametrize(("name", "make"), [("f.docx", make_docx), ("f.pptx", make_pptx), ("f.xlsx", make_xlsx)])
def test_fuzzed_office_files_load_or_are_refused_cleanly(name: str, make: Any) -> None:
    original = make()

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
    @given(_mutated(original))
    def check(data: bytes) -> None:
        try:
            docs = load_upload(name, None, data, LIMIT)
        except AppError as exc:
            status = exc.status_code
        else:
            status = 200
            assert docs[0].text.strip()
        assert status < 500

    check()


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.text(alphabet=st.sampled_from(list("ab,;\t|\"\n x1")), max_size=300))
def test_fuzzed_csv_loads_or_is_refused_cleanly(text: str) -> None:
    try:
        [doc] = load_upload("f.csv", None, text.encode(), LIMIT)
    except AppError as exc:
        status = exc.status_code
    else:
        status = 200
        assert doc.text.strip()
    assert status < 500

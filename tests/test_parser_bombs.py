"""Issue 11, defect 8: parser bombs are refused without taking the API down.

HTML was parsed by BeautifulSoup inside the API process, on up to the upload limit: millions of nested
tags are gigabytes of tree, so one write key could exhaust the API's memory for every tenant. PDFs had
no page or time limit. Uploads of those formats are now parsed in a child process under a memory and a
time budget; what exceeds it is refused with a 413 naming the limit.

The API runs as a real uvicorn process; its peak resident memory (VmHWM) is read from /proc while a 10 MiB
upload of nested tags and a PDF bomb are sent, and other requests are answered meanwhile.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fixtures.services import ApiProcess, scratch_api

GiB = 1 << 30


def _peak_rss(pid: int) -> int:
    """The process's peak resident memory, in bytes (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")


def nested_html(size: int) -> bytes:
    """About `size` bytes of tags nested inside each other, never closed."""
    return b"<html><body>" + b"<div><span>" * (size // 11) + b"deep"


def pdf_file(objects: list[bytes]) -> bytes:
    """A PDF of these objects (numbered from 1, the first the catalogue) with its cross-reference table."""
    out = b"%PDF-1.7\n"
    offsets = []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return out


def pdf_bomb(expanded: int) -> bytes:
    """A valid one-page PDF whose content stream is zeros compressed twice (FlateDecode over FlateDecode):
    a few KB that expand to `expanded` bytes."""
    stream = zlib.compress(zlib.compress(b"\0" * expanded, 9), 9)
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R >>",
        b"<< /Length %d /Filter [/FlateDecode /FlateDecode] >>\nstream\n" % len(stream) + stream + b"\nendstream",
    ]
    return pdf_file(objects)


@pytest.fixture(scope="module")
def api(service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ApiProcess, str]]:
    env = {"PGSAGE_MAX_UPLOAD_BYTES": str(16 << 20), "PGSAGE_PARSE_MEMORY_MB": "512", "PGSAGE_PARSE_SECONDS": "30"}
    with scratch_api(service_env, tmp_path_factory.mktemp("bombs") / "api.log", "write", **env) as (base, key):
        yield base, key


def test_bombs_are_refused_while_the_api_stays_small_and_answers(api: tuple[ApiProcess, str]) -> None:
    base, key = api
    auth = {"Authorization": f"Bearer {key}"}
    before = _peak_rss(base.pid)
    assert before < GiB, before

    answered: list[tuple[int, float]] = []
    stop = threading.Event()

    def others() -> None:  # another tenant's requests, all the while
        with httpx.Client(base_url=base, headers=auth, timeout=30) as client:
            while not stop.is_set():
                t0 = time.monotonic()
                r = client.get("/v1/status")
                answered.append((r.status_code, time.monotonic() - t0))
                time.sleep(0.2)

    watcher = threading.Thread(target=others)
    watcher.start()
    try:
        with httpx.Client(base_url=base, headers=auth, timeout=300) as client:
            html = nested_html(10 << 20)
            assert len(html) >= 10 << 20
            r = client.post("/v1/documents", files={"file": ("deep.html", html, "text/html")},
                            data={"collection": "bombs"})
            assert r.status_code in (413, 422), r.text
            assert "PGSAGE_PARSE_" in r.json()["detail"], r.text  # it names the limit

            bomb = pdf_bomb(1 << 30)
            assert len(bomb) < 64 << 10
            r = client.post("/v1/documents", files={"file": ("bomb.pdf", bomb, "application/pdf")},
                            data={"collection": "bombs"})
            assert r.status_code in (413, 422), r.text

            # The API still parses an honest HTML page.
            page = b"<html><head><title>Tides</title></head><body><p>The tide rises twice a day.</p></body></html>"
            r = client.post("/v1/documents", files={"file": ("tides.html", page, "text/html")},
                            data={"collection": "bombs"})
            assert r.status_code == 202, r.text
    finally:
        stop.set()
        watcher.join()
    peak = _peak_rss(base.pid)
    assert peak < GiB, f"the API's resident memory peaked at {peak / GiB:.2f} GiB"
    assert len(answered) >= 5, answered
    assert all(status == 200 for status, _ in answered), answered


# --- Issue 27: packages and streams that inflate to far more text than the upload's size --------------------
#
# A 125 KB DOCX of 100 paragraphs of "lorem " * 100000 became a 60-million-character document: the sandbox capped
# the parse's memory, but the API took whatever text came back, 480 times the upload, and a worker spent hours on
# it. The text an upload yields is now capped (PGSAGE_MAX_DOCUMENT_CHARS, PGSAGE_MAX_EXPANSION_RATIO characters a
# byte), and the loaders stop at the block that crosses the cap.

LOREM = "lorem ipsum dolor sit amet " * 20_000  # 540,000 characters, a few hundred bytes deflated


def docx_bomb() -> bytes:
    import io

    from docx import Document

    doc = Document()
    for _ in range(20):
        doc.add_paragraph(LOREM)
    out = io.BytesIO()
    doc.save(out)
    return out.getvalue()


def pptx_bomb() -> bytes:
    import io

    from pptx import Presentation
    from pptx.util import Inches

    deck = Presentation()
    for _ in range(20):
        slide = deck.slides.add_slide(deck.slide_layouts[6])  # blank
        slide.shapes.add_textbox(Inches(1), Inches(1), Inches(4), Inches(1)).text_frame.text = LOREM
    out = io.BytesIO()
    deck.save(out)
    return out.getvalue()


def xlsx_bomb() -> bytes:
    """One long string stored once (shared strings) and used in every row."""
    import io

    from openpyxl import Workbook

    book = Workbook()
    sheet = book.active
    sheet.append(["notes"])
    cell = LOREM[:4000]
    for _ in range(10_000):
        sheet.append([cell])
    out = io.BytesIO()
    book.save(out)
    return out.getvalue()


def pdf_text_bomb(pages: int = 20) -> bytes:
    """A valid PDF whose pages' content streams (FlateDecode) each show about 540,000 characters of text."""
    # A thousand lines of 540 characters at font size 1 on a large page (text off the page, or drawn over other
    # text, is not read).
    line = b"(" + b"lorem ipsum dolor sit amet " * 20 + b") ' "
    stream = zlib.compress(b"BT /F1 1 Tf 10 14000 Td 1.5 TL " + line * 1000 + b"ET", 9)
    kids = " ".join(f"{4 + 2 * i} 0 R" for i in range(pages))
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", f"<< /Type /Pages /Kids [{kids}] /Count {pages} >>".encode(),
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    for i in range(pages):
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 14400 14400] /Contents {5 + 2 * i} 0 R "
                       "/Resources << /Font << /F1 3 0 R >> >> >>".encode())
        objects.append(b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(stream) + stream + b"\nendstream")
    return pdf_file(objects)


def test_expansion_bombs_are_refused_naming_the_limit_and_never_queued(api: tuple[ApiProcess, str]) -> None:
    base, key = api
    bombs = {"bomb.docx": docx_bomb(), "bomb.pptx": pptx_bomb(), "bomb.xlsx": xlsx_bomb(), "bomb.pdf": pdf_text_bomb()}
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=300) as client:
        for name, data in bombs.items():
            assert len(data) < 512 << 10, (name, len(data))  # well inside the upload limit
            r = client.post("/v1/documents", files={"file": (name, data)}, data={"collection": "inflated"})
            assert r.status_code == 413, (name, r.status_code, r.text)
            assert "PGSAGE_MAX_EXPANSION_RATIO" in r.json()["detail"], (name, r.text)
        # Nothing was stored, so nothing was sent to a worker: the collection was never even made.
        assert "inflated" not in {c["name"] for c in client.get("/v1/collections").json()}
        assert client.get("/v1/jobs", params={"collection": "inflated"}).status_code == 404
        # The same loaders take an honest file of each kind.
        r = client.post("/v1/documents", files={"file": ("fine.docx", _honest_docx())}, data={"collection": "inflated"})
        assert r.status_code == 202, r.text


def _honest_docx() -> bytes:
    import io

    from docx import Document

    doc = Document()
    doc.add_heading("Tides", level=1)
    doc.add_paragraph("The tide rises twice a day.")
    out = io.BytesIO()
    doc.save(out)
    return out.getvalue()


def test_text_over_the_document_limit_is_refused_naming_it() -> None:
    """PGSAGE_MAX_DOCUMENT_CHARS bounds every format, a JSON body's text too, whatever its size in bytes."""
    from app.errors import TooLarge
    from app.ingest.load import load_json, load_upload

    text = "lorem ipsum\n" * 100_000  # 1.2 million characters, a CSV of one column among them
    for name in ("a.txt", "a.md", "a.html", "a.csv"):
        with pytest.raises(TooLarge, match="PGSAGE_MAX_DOCUMENT_CHARS"):
            load_upload(name, None, text.encode(), 10 << 20, max_chars=1_000_000)
    with pytest.raises(TooLarge, match="PGSAGE_MAX_DOCUMENT_CHARS"):
        load_json(text, None, None, None, max_chars=1_000_000)
    assert load_upload("a.txt", None, text.encode(), 10 << 20, max_chars=1_300_000)

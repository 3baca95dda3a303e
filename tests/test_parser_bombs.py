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

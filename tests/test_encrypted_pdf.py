"""Encrypted PDFs as filings are published (issue 15): AES with an owner password only opens in every viewer and
must ingest; one that needs a user password is a 422 saying so, not a 500 or "corrupt"."""

from __future__ import annotations

import io
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pypdf import PdfReader, PdfWriter

from app.errors import BadInput
from app.ingest.load import PDF_LIBRARIES, load_upload
from tests.fixtures.helpers import make_pdf, upload, wait_for_job

LINES = ["Quarterly revenue rose 12 percent to 4.1 billion dollars.", "Operating margin was 31 percent."]


def encrypted(user_password: str, algorithm: str = "AES-256") -> bytes:
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(make_pdf(LINES))))
    writer.encrypt(user_password=user_password, owner_password="owner-only", algorithm=algorithm)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


@pytest.mark.parametrize("library", PDF_LIBRARIES)
@pytest.mark.parametrize("algorithm", ["AES-256", "AES-128", "RC4-128"])
def test_a_pdf_encrypted_with_an_owner_password_only_loads(algorithm: str, library: str) -> None:
    data = encrypted("", algorithm)
    assert PdfReader(io.BytesIO(data)).is_encrypted
    [doc] = load_upload("filing.pdf", "application/pdf", data, 10_000_000, pdf_library=library)
    assert "Quarterly revenue rose 12 percent" in doc.text


@pytest.mark.parametrize("library", PDF_LIBRARIES)
def test_a_pdf_that_needs_a_password_is_refused_saying_so(library: str) -> None:
    with pytest.raises(BadInput, match="password-protected"):
        load_upload("locked.pdf", "application/pdf", encrypted("let-me-in"), 10_000_000, pdf_library=library)


def test_encrypted_pdfs_over_http(client: TestClient, worker: Any, collection: str) -> None:
    r = upload(client, "filing.pdf", encrypted(""), collection)
    assert r.status_code == 202, r.text
    assert wait_for_job(client, r.json()["job_id"])["state"] == "succeeded"
    hits = client.post("/v1/search", json={"query": "operating margin", "collection": collection}).json()["results"]
    assert "Operating margin was 31 percent" in hits[0]["text"]
    assert hits[0]["page_start"] == 1

    r = upload(client, "locked.pdf", encrypted("let-me-in"), collection)
    assert r.status_code == 422, r.text
    assert "password-protected" in r.json()["detail"]

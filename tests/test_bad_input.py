"""Bad input is refused in the request with a 4xx {"error", "detail"} that names the problem.

No worker is needed: loading and validation happen before anything is written, and every upload
case checks that documents, jobs, job_documents and chunks hold exactly the rows they held before.
"""

from __future__ import annotations

import json
import os
import random
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, create_engine, text

from app.config import Settings
from tests.fixtures.helpers import make_pdf, upload

LIMIT = 2 * 1024 * 1024  # PGSAGE_MAX_UPLOAD_BYTES in conftest
TABLES = ("documents", "jobs", "job_documents", "chunks")
GOOD_PDF = make_pdf(["Ocean tides.", "Tides are the rise and fall of sea level, pulled by the Moon and Sun."])
_rng = random.Random(7)
NO_NUL_GARBAGE = bytes(_rng.randrange(1, 256) for _ in range(4096))  # binary, but no NUL byte to give it away


class _Response(Protocol):
    @property
    def status_code(self) -> int: ...

    @property
    def text(self) -> str: ...

    def json(self) -> Any: ...


@pytest.fixture(scope="module")
def engine(settings: Settings) -> Iterator[Engine]:
    assert settings.database_url
    eng = create_engine(settings.database_url)
    yield eng
    eng.dispose()


@pytest.fixture(scope="module", autouse=True)
def _settled(engine: Engine) -> None:
    """Let a worker finish documents queued by earlier tests, so row counts move only because of us.

    Without a worker nothing moves at all, so after the wait the counts are just as stable.
    """
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            if not conn.execute(text("SELECT count(*) FROM documents WHERE status = 'queued'")).scalar_one():
                return
        time.sleep(0.5)


def _counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {t: int(conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one()) for t in TABLES}


def _message(detail: Any) -> str:
    """Everything the client is told, as one searchable string; a location list reads body.k."""
    if isinstance(detail, dict):
        return " ".join(f"{key}: {_message(value)}" for key, value in detail.items())
    if isinstance(detail, list):
        if all(isinstance(item, str | int) for item in detail):
            return ".".join(str(item) for item in detail)
        return " ".join(_message(item) for item in detail)
    return str(detail)


def _assert_error(r: _Response, status: int, code: str, *phrases: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "detail"}, body
    assert body["error"] == code, body
    said = _message(body["detail"]).lower()
    for phrase in phrases:
        assert phrase.lower() in said, f"{phrase!r} not in {body['detail']!r}"


# ---------------------------------------------------------------------------------------------
# File uploads (multipart): name, bytes, status, error code, phrases the message must contain.

def _jsonl(*lines: str) -> bytes:
    return "\n".join(lines).encode()


def _nested_metadata(depth: int) -> str:
    """A document whose metadata nests lists depth levels deep."""
    return '{"text": "ok", "metadata": {"a": ' + "[" * depth + "]" * depth + "}}"


FILE_CASES = [
    pytest.param("empty.txt", b"", 422, "invalid_input", ("empty.txt", "empty"), id="empty-txt"),
    pytest.param("blank.md", b"  \n\n\t \n", 422, "invalid_input", ("empty",), id="whitespace-only-md"),
    pytest.param("empty.pdf", b"", 422, "invalid_input", ("empty",), id="empty-pdf"),
    pytest.param("empty.jsonl", b"", 422, "invalid_input", ("empty",), id="empty-jsonl"),
    pytest.param("noise.txt", os.urandom(4096), 422, "invalid_input", ("noise.txt", "binary"),
                 id="urandom-txt"),
    pytest.param("noise.md", os.urandom(4096), 422, "invalid_input", ("binary",), id="urandom-md"),
    pytest.param("noise.jsonl", os.urandom(4096), 422, "invalid_input", ("binary",), id="urandom-jsonl"),
    pytest.param("noise.txt", NO_NUL_GARBAGE, 422, "invalid_input", ("UTF-8",), id="garbage-without-nul-txt"),
    pytest.param("controls.txt", bytes(range(1, 9)) * 500, 422, "invalid_input", ("binary", "control"),
                 id="control-characters-txt"),
    pytest.param("noise.bin", os.urandom(4096), 415, "unsupported_media_type", ("noise.bin", ".txt"),
                 id="urandom-bin"),
    pytest.param("noise", os.urandom(4096), 415, "unsupported_media_type", ("cannot tell the type",),
                 id="urandom-no-extension"),
    pytest.param("slides.key", b"PK\x03\x04" + os.urandom(512), 415, "unsupported_media_type", (".pdf", ".docx"),
                 id="unknown-extension"),
    pytest.param("sheet.xlsx", b"PK\x03\x04" + os.urandom(512), 422, "invalid_input",
                 ("sheet.xlsx", "not an Office Open XML file"), id="xlsx-not-a-zip-package"),
    pytest.param("big.txt", b"a" * (LIMIT + 1), 413, "payload_too_large", ("big.txt", "upload limit"),
                 id="one-byte-over-limit"),
    pytest.param("huge.txt", b"a " * (2 * LIMIT), 413, "payload_too_large", ("upload limit",),
                 id="far-over-limit"),
    pytest.param("latin1.txt", "Café au lait, crème brûlée.".encode("latin-1"), 422, "invalid_input",
                 ("latin1.txt", "UTF-8", "offset 3"), id="latin1-txt"),
    pytest.param("bad.md", b"# Title\n\nvalid start \xff\xfe then broken", 422, "invalid_input",
                 ("UTF-8",), id="invalid-utf8-md"),
    pytest.param("bad.jsonl", b'{"_id": "1", "text": "caf\xe9"}\n', 422, "invalid_input", ("UTF-8",),
                 id="invalid-utf8-jsonl"),
    pytest.param("utf16.txt", "hello world".encode("utf-16"), 422, "invalid_input", ("binary",),
                 id="utf16-txt"),
    pytest.param("trunc.pdf", GOOD_PDF[: len(GOOD_PDF) // 2], 422, "invalid_input", ("trunc.pdf", "PDF"),
                 id="truncated-pdf"),
    pytest.param("head.pdf", GOOD_PDF[:40], 422, "invalid_input", ("corrupt", "PDF"), id="pdf-header-only"),
    pytest.param("garbage.pdf", b"%PDF-1.7\n" + random.Random(1).randbytes(3000), 422, "invalid_input",
                 ("corrupt", "PDF"), id="pdf-magic-then-garbage"),
    pytest.param("garbled.pdf", GOOD_PDF[:100] + random.Random(2).randbytes(200) + GOOD_PDF[300:], 422,
                 "invalid_input", ("PDF",), id="garbled-pdf"),
    pytest.param("notes.pdf", b"just some text, not a PDF", 422, "invalid_input", ("not a PDF", "%PDF-"),
                 id="text-named-pdf"),
    pytest.param("random.pdf", os.urandom(2048), 422, "invalid_input", ("not a PDF",), id="urandom-pdf"),
    pytest.param("bad.jsonl", _jsonl('{"_id": "a", "text": "one"}', '{"_id": "b", "text": "two"',
                                     '{"_id": "c", "text": "three"}'),
                 422, "invalid_input", ("bad.jsonl line 2", "malformed JSON"), id="jsonl-malformed-line-2"),
    pytest.param("bad.jsonl", _jsonl('{"_id": "a", "text": "one"}', "", '{"_id": "c", "title": "no text"}'),
                 422, "invalid_input", ("line 3", '"text"'), id="jsonl-missing-text"),
    pytest.param("bad.jsonl", _jsonl('{"_id": "a", "text": "   "}'), 422, "invalid_input",
                 ("line 1", '"text"'), id="jsonl-blank-text"),
    pytest.param("bad.jsonl", _jsonl('{"_id": "a", "text": 42}'), 422, "invalid_input",
                 ("line 1", '"text"'), id="jsonl-text-not-a-string"),
    pytest.param("bad.jsonl", _jsonl('{"_id": "a", "text": "one"}', '["not", "an", "object"]'), 422,
                 "invalid_input", ("line 2", "JSON object"), id="jsonl-line-not-an-object"),
    pytest.param("bad.jsonl", _jsonl('{"_id": "a", "text": "one"}', '{"_id": "a", "text": "two"}'), 422,
                 "invalid_input", ("line 2", "duplicate id"), id="jsonl-duplicate-id"),
    pytest.param("bad.jsonl", _jsonl('{"_id": "a", "text": "one", "metadata": [1]}'), 422,
                 "invalid_input", ("line 1", "metadata"), id="jsonl-metadata-not-an-object"),
    pytest.param("bad.jsonl", _jsonl('{"_id": "a", "text": "one", "title": 5}'), 422,
                 "invalid_input", ("line 1", '"title"'), id="jsonl-title-not-a-string"),
    pytest.param("bad.jsonl", _jsonl('{"_id": "a", "text": "nul \\u0000 inside"}'), 422, "invalid_input",
                 ("line 1", "NUL"), id="jsonl-escaped-nul-in-text"),
    pytest.param("bad.jsonl", _jsonl('{"_id": "a", "text": "ok", "metadata": {"k": "\\u0000"}}'), 422,
                 "invalid_input", ("line 1", "NUL"), id="jsonl-escaped-nul-in-metadata"),
    pytest.param("bad.jsonl", _jsonl('{"_id": "a", "text": "ok", "title": "t\\u0000"}'), 422,
                 "invalid_input", ("line 1", "NUL"), id="jsonl-escaped-nul-in-title"),
    pytest.param("late-nul.txt", b"plain text " * 1000 + b"\x00 and more text", 422, "invalid_input",
                 ("binary", "NUL"), id="nul-byte-after-the-first-8k"),
    pytest.param("bad.jsonl", _jsonl('{"_id": "a", "text": "lone \\ud800 surrogate"}'), 422, "invalid_input",
                 ("line 1", "text", "surrogate"), id="jsonl-lone-surrogate-in-text"),
    pytest.param("bad.jsonl", _jsonl('{"_id": "a", "text": "ok", "metadata": {"k": ["\\udc00"]}}'), 422,
                 "invalid_input", ("line 1", "metadata.k[0]", "surrogate"),
                 id="jsonl-lone-surrogate-in-metadata"),
    pytest.param("bad.jsonl", _jsonl('{"_id": "\\ud83d", "text": "ok"}'), 422, "invalid_input",
                 ("line 1", "_id", "surrogate"), id="jsonl-lone-surrogate-in-id"),
    pytest.param("deep.jsonl", _jsonl(_nested_metadata(5000)), 422, "invalid_input",
                 ("line 1", "nested too deeply"), id="jsonl-nesting-beyond-the-parser"),
    pytest.param("deep.jsonl", _jsonl(_nested_metadata(150)), 422, "invalid_input",
                 ("line 1", "metadata.a", "nested more than 100 levels"), id="jsonl-nesting-150"),
    # Issue 11, defect 7: these were 500s.
    pytest.param("bad.jsonl", _jsonl('{"_id": "a", "text": "one"}', '{"text": "no id"}'), 422, "invalid_input",
                 ("line 2", '"_id"'), id="jsonl-line-without-id"),
    pytest.param("bad.jsonl", _jsonl('{"_id": null, "text": "null id"}'), 422, "invalid_input",
                 ("line 1", '"_id"'), id="jsonl-null-id"),
    pytest.param("bad.jsonl", _jsonl('{"_id": "a", "text": "ok", "metadata": {"x": NaN}}'), 422, "invalid_input",
                 ("line 1", "metadata.x", "finite"), id="jsonl-nan-in-metadata"),
    pytest.param("bad.jsonl", _jsonl('{"_id": "a", "text": "ok", "metadata": {"x": [1e999]}}'), 422,
                 "invalid_input", ("line 1", "metadata.x[0]", "finite"), id="jsonl-overflowing-number"),
    pytest.param("bad.jsonl", _jsonl('{"_id": "a", "text": "ok", "n": ' + "9" * 5000 + "}"), 422, "invalid_input",
                 ("line 1", "4300 digits"), id="jsonl-integer-over-4300-digits"),
    pytest.param("blank.jsonl", b"\n\n  \n", 422, "invalid_input", ("empty",), id="jsonl-only-blank-lines"),
    pytest.param("empty.html", b"<html><head><title>t</title><script>x()</script></head><body> </body>",
                 422, "invalid_input", ("no text",), id="html-without-text"),
]


@pytest.mark.parametrize(("name", "data", "status", "code", "phrases"), FILE_CASES)
def test_bad_file_is_refused_and_nothing_is_written(
    client: TestClient, engine: Engine, collection: str, name: str, data: bytes, status: int, code: str,
    phrases: tuple[str, ...],
) -> None:
    before = _counts(engine)
    r = upload(client, name, data, collection)
    _assert_error(r, status, code, *phrases)
    assert _counts(engine) == before


# ---------------------------------------------------------------------------------------------
# Other bad uploads: form fields, JSON documents, content types.

def _post(**kwargs: Any) -> Callable[[TestClient, str], _Response]:
    """A request to POST /v1/documents; the collection is filled in unless given."""
    def send(client: TestClient, collection: str) -> _Response:
        args = dict(kwargs)
        if isinstance(args.get("json"), dict):
            args["json"] = {"collection": collection, **args["json"]}
        return client.post("/v1/documents", **args)
    return send


def _form(data: dict[str, str], name: str = "ok.txt", content: bytes = b"perfectly good text") -> Any:
    return _post(files={"file": (name, content)}, data=data)


def _raw(body: bytes, content_type: str) -> Any:
    return _post(content=body, headers={"content-type": content_type})


def _multipart_named(filename: bytes) -> Any:
    """A multipart upload whose file name holds these bytes as they are (clients escape what these tests send)."""
    body = (b"--b0undary\r\nContent-Disposition: form-data; name=\"file\"; filename=\"" + filename +
            b"\"\r\nContent-Type: text/plain\r\n\r\nperfectly good text\r\n--b0undary--\r\n")
    return _raw(body, "multipart/form-data; boundary=b0undary")


REQUEST_CASES = [
    pytest.param(_form({"collection": "bad name!"}), 422, "invalid_input", ("collection names",),
                 id="form-collection-with-space"),
    pytest.param(_form({"collection": "../etc"}), 422, "invalid_input", ("collection names",),
                 id="form-collection-path"),
    pytest.param(_form({"collection": "c" * 65}), 422, "invalid_input", ("collection names",),
                 id="form-collection-too-long"),
    pytest.param(_form({"collection": "x'); DROP TABLE documents; --"}), 422, "invalid_input",
                 ("collection names",), id="form-collection-sql"),
    pytest.param(_form({"metadata": '{"a": 1'}), 422, "invalid_input", ("metadata", "malformed JSON"),
                 id="form-metadata-malformed"),
    pytest.param(_form({"metadata": '{"a": "\\ud800"}'}), 422, "invalid_input", ("metadata.a", "surrogate"),
                 id="form-metadata-lone-surrogate"),
    pytest.param(_form({"metadata": "{\"a\": " + "[" * 5000 + "]" * 5000 + "}"}), 422, "invalid_input",
                 ("metadata", "nested too deeply"), id="form-metadata-nesting-beyond-the-parser"),
    pytest.param(_form({"metadata": "[1, 2]"}), 422, "invalid_input", ("metadata", "JSON object"),
                 id="form-metadata-not-an-object"),
    pytest.param(_form({"metadata": '{"a": "\\u0000"}'}), 422, "invalid_input", ("metadata", "NUL"),
                 id="form-metadata-escaped-nul"),
    pytest.param(_post(data={"collection": "x"}, files={"document": ("a.txt", b"text")}), 422,
                 "invalid_input", ("'file'",), id="form-without-file-field"),
    pytest.param(_post(json={"text": "fine", "collection": "bad name!"}), 422, "invalid_input",
                 ("collection names",), id="json-invalid-collection"),
    pytest.param(_raw(b'{"text": "an unfinished', "application/json"), 422, "invalid_input",
                 ("malformed JSON",), id="json-malformed"),
    pytest.param(_raw(b"", "application/json"), 422, "invalid_input", ("malformed JSON",),
                 id="json-empty-body"),
    pytest.param(_raw(b'{"text": "a",}', "application/json"), 422, "invalid_input", ("malformed JSON",),
                 id="json-trailing-comma"),
    pytest.param(_raw(b'["text"]', "application/json"), 422, "invalid_input", ("invalid document",),
                 id="json-not-an-object"),
    pytest.param(_post(json={"title": "no text"}), 422, "invalid_input", ("invalid document", "text"),
                 id="json-missing-text"),
    pytest.param(_post(json={"text": "   \n "}), 422, "invalid_input", ("no text",), id="json-blank-text"),
    pytest.param(_post(json={"text": "fine", "colour": "red"}), 422, "invalid_input", ("colour",),
                 id="json-unknown-field"),
    pytest.param(_post(json={"text": "fine", "metadata": [1]}), 422, "invalid_input", ("metadata",),
                 id="json-metadata-not-an-object"),
    pytest.param(_post(json={"text": "fine", "external_id": "a\tb"}), 422, "invalid_input",
                 ("external_id",), id="json-external-id-control-char"),
    pytest.param(_post(json={"text": "nul \u0000 inside"}), 422, "invalid_input", ("text", "NUL"),
                 id="json-nul-in-text"),
    pytest.param(_post(json={"text": "fine", "title": "t\u0000"}), 422, "invalid_input", ("title", "NUL"),
                 id="json-nul-in-title"),
    pytest.param(_post(json={"text": "fine", "metadata": {"k\u0000": "v"}}), 422, "invalid_input",
                 ("metadata", "NUL"), id="json-nul-in-metadata-key"),
    pytest.param(_post(json={"text": "fine", "metadata": {"k": ["v\u0000"]}}), 422, "invalid_input",
                 ("metadata", "NUL"), id="json-nul-in-metadata-value"),
    pytest.param(_raw(_nested_metadata(150).encode(), "application/json"), 422, "invalid_input",
                 ("metadata.a", "nested more than 100 levels"), id="json-metadata-nesting-150"),
    pytest.param(_raw(_nested_metadata(5000).encode(), "application/json"), 422, "invalid_input",
                 ("malformed JSON", "recursion limit"), id="json-metadata-nesting-5000"),
    # Issue 11, defect 7: these were 500s (or a 400 in another shape).
    pytest.param(_raw(b'{"text": "fine", "metadata": {"x": NaN}}', "application/json"), 422, "invalid_input",
                 ("metadata.x", "finite"), id="json-nan-in-metadata"),
    pytest.param(_raw(b'{"text": "fine", "metadata": {"x": -Infinity}}', "application/json"), 422,
                 "invalid_input", ("metadata.x", "finite"), id="json-infinity-in-metadata"),
    pytest.param(_raw(b'{"text": "fine", "metadata": {"x": {"y": 1e999}}}', "application/json"), 422,
                 "invalid_input", ("metadata.x.y", "finite"), id="json-overflowing-number-in-metadata"),
    pytest.param(_form({"metadata": '{"x": NaN}'}), 422, "invalid_input", ("metadata.x", "finite"),
                 id="form-nan-in-metadata"),
    pytest.param(_form({"metadata": '{"x": ' + "9" * 5000 + "}"}), 422, "invalid_input",
                 ("metadata", "4300 digits"), id="form-metadata-integer-over-4300-digits"),
    pytest.param(_form({}, name="n" * 6000 + ".txt"), 422, "invalid_input", ("multipart",),
                 id="form-file-name-of-6kb"),
    # Issue 27: a file name is the external id when no path is sent; a NUL in it reached psycopg (DataError: 500).
    pytest.param(_multipart_named(b"a\x00b.txt"), 422, "invalid_input", ("file name", "NUL"),
                 id="form-file-name-with-nul"),
    pytest.param(_multipart_named(b"a\x1bb.txt"), 422, "invalid_input", ("file name", "control character"),
                 id="form-file-name-with-escape"),
    pytest.param(_form({}, name="n" * 600 + ".txt"), 422, "invalid_input", ("file name", "512"),
                 id="form-file-name-over-the-id-limit"),
    pytest.param(_raw(b"plain text body", "text/plain"), 415, "unsupported_media_type",
                 ("multipart/form-data",), id="content-type-text-plain"),
    pytest.param(_raw(b"<doc>x</doc>", "application/xml"), 415, "unsupported_media_type",
                 ("multipart/form-data",), id="content-type-xml"),
    pytest.param(_raw(b"text=hello", "application/x-www-form-urlencoded"), 415, "unsupported_media_type",
                 ("multipart/form-data",), id="content-type-urlencoded"),
    pytest.param(_raw(b"a" * (LIMIT + 1), "application/json"), 413, "payload_too_large", ("upload limit",),
                 id="json-over-limit"),
]


@pytest.mark.parametrize(("send", "status", "code", "phrases"), REQUEST_CASES)
def test_bad_upload_request_is_refused_and_nothing_is_written(
    client: TestClient, engine: Engine, collection: str, send: Callable[[TestClient, str], _Response],
    status: int, code: str, phrases: tuple[str, ...],
) -> None:
    before = _counts(engine)
    r = send(client, collection)
    _assert_error(r, status, code, *phrases)
    assert _counts(engine) == before
    assert client.post("/v1/search", json={"query": "anything", "collection": collection}).status_code == 404


# ---------------------------------------------------------------------------------------------
# Search and ask.

@pytest.fixture(scope="module")
def existing(client: TestClient, engine: Engine) -> Iterator[str]:
    """A collection that exists (empty), so only the one bad field is wrong in each request."""
    name = f"t-bad-{uuid.uuid4().hex[:8]}"
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO collections (name) VALUES (:n)"), {"n": name})
    yield name
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM collections WHERE name = :n"), {"n": name})


LONG = "word " * 500  # 2,500 characters; the limit is 2,000

QUERY_CASES = [
    pytest.param({"collection": "no-such-collection"}, 404, "not_found",
                 ("no-such-collection", "does not exist"), id="unknown-collection"),
    pytest.param({"collection": "bad name!"}, 422, "invalid_input", ("collection names",),
                 id="invalid-collection-name"),
    pytest.param({"collection": "c" * 65}, 422, "invalid_input", ("body.collection",),
                 id="collection-too-long"),
    pytest.param({"k": 0}, 422, "invalid_input", ("body.k", "greater than or equal to 1"), id="k-zero"),
    pytest.param({"k": -5}, 422, "invalid_input", ("body.k", "greater than or equal to 1"), id="k-negative"),
    pytest.param({"k": 101}, 422, "invalid_input", ("body.k",), id="k-above-max"),
    pytest.param({"k": 10**12}, 422, "invalid_input", ("body.k",), id="k-huge"),
    pytest.param({"k": "ten"}, 422, "invalid_input", ("body.k", "integer"), id="k-not-a-number"),
    pytest.param({"text": LONG}, 422, "invalid_input", ("longer than 2000 characters",), id="query-too-long"),
    pytest.param({"text": "   "}, 422, "invalid_input", ("blank",), id="query-blank"),
    pytest.param({"text": ""}, 422, "invalid_input", ("blank",), id="query-empty"),
    pytest.param({"filters": {"group": []}}, 422, "invalid_input", ("filters", "1-100 values"),
                 id="filter-empty-list"),
    pytest.param({"filters": {f"k{i}": i for i in range(17)}}, 422, "invalid_input", ("filter keys",),
                 id="filter-too-many-keys"),
    pytest.param({"filters": {"": 1}}, 422, "invalid_input", ("filter keys",), id="filter-empty-key"),
    pytest.param({"filters": ["group", 3]}, 422, "invalid_input", ("filters",), id="filter-not-an-object"),
    pytest.param({"filters": {"g": "\u0000"}}, 422, "invalid_input", ("filters", "NUL"),
                 id="filter-nul-value"),
    pytest.param({"filters": {"g": float("nan")}}, 422, "invalid_input", ("filters", "finite"),
                 id="filter-nan"),
    pytest.param({"filters": {"g": [1, float("inf")]}}, 422, "invalid_input", ("filters", "finite"),
                 id="filter-infinity-in-a-list"),
    pytest.param({"colour": "red"}, 422, "invalid_input", ("colour",), id="unknown-field"),
]


def _query_body(endpoint: str, collection: str, case: dict[str, Any]) -> dict[str, Any]:
    field = "query" if endpoint == "/v1/search" else "question"
    body: dict[str, Any] = {field: case.get("text", "where do tides come from?"), "collection": collection}
    body.update({k: v for k, v in case.items() if k != "text"})
    return body


@pytest.mark.parametrize("endpoint", ["/v1/search", "/v1/ask"])
@pytest.mark.parametrize(("case", "status", "code", "phrases"), QUERY_CASES)
def test_bad_query_is_refused(
    client: TestClient, existing: str, endpoint: str, case: dict[str, Any], status: int, code: str,
    phrases: tuple[str, ...],
) -> None:
    # Python's json writes NaN and Infinity as JavaScript does (httpx refuses to): some clients send them.
    r = client.post(endpoint, content=json.dumps(_query_body(endpoint, existing, case)).encode(),
                    headers={"content-type": "application/json"})
    _assert_error(r, status, code, *phrases)


def test_ask_k_above_its_own_max_is_refused(client: TestClient, existing: str) -> None:
    r = client.post("/v1/ask", json={"question": "tides?", "collection": existing, "k": 51})
    _assert_error(r, 422, "invalid_input", "body.k", "50")


@pytest.mark.parametrize("endpoint", ["/v1/search", "/v1/ask"])
@pytest.mark.parametrize("body", [
    pytest.param(b'{"query": "tides", "k": 5', id="unterminated"),
    pytest.param(b"{'query': 'tides'}", id="single-quotes"),
    pytest.param(b'{"query": "tides",}', id="trailing-comma"),
    pytest.param(b"not json at all", id="not-json"),
    pytest.param(b"", id="empty"),
    pytest.param(b'{"query": "tides", "k": ' + b"9" * 5000 + b"}", id="integer-over-4300-digits"),
])
def test_malformed_json_query_is_refused(client: TestClient, endpoint: str, body: bytes) -> None:
    r = client.post(endpoint, content=body, headers={"content-type": "application/json"})
    if body:
        _assert_error(r, 422, "invalid_input", "malformed JSON")
    else:
        # FastAPI reads an empty body as a missing one: still a 422 that names the body.
        _assert_error(r, 422, "invalid_input", "body")


@pytest.mark.parametrize("endpoint", ["/v1/search", "/v1/ask"])
def test_query_body_must_be_an_object(client: TestClient, endpoint: str) -> None:
    r = client.post(endpoint, json=["tides"])
    _assert_error(r, 422, "invalid_input", "body")


def test_search_in_an_existing_collection_works(client: TestClient, existing: str) -> None:
    """The control: the same body without the bad field is accepted (an empty collection, no hits)."""
    r = client.post("/v1/search", json=_query_body("/v1/search", existing, {}))
    assert r.status_code == 200, r.text
    assert r.json()["results"] == []


# ---------------------------------------------------------------------------------------------
# Documents and jobs by id.

@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/v1/documents/{}"), ("DELETE", "/v1/documents/{}"), ("GET", "/v1/jobs/{}"),
])
@pytest.mark.parametrize("bad_id", ["not-a-uuid", "123", "0" * 33, "'; DROP TABLE jobs; --",
                                    "zzzzzzzz-zzzz-zzzz-zzzz-zzzzzzzzzzzz"])
def test_non_uuid_id_is_refused(
    client: TestClient, engine: Engine, method: str, path: str, bad_id: str
) -> None:
    before = _counts(engine)
    r = client.request(method, path.format(bad_id))
    _assert_error(r, 422, "invalid_input", "_id", "UUID")
    assert _counts(engine) == before


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/v1/documents/{}"), ("DELETE", "/v1/documents/{}"), ("GET", "/v1/jobs/{}"),
])
def test_unknown_uuid_is_not_found(client: TestClient, engine: Engine, method: str, path: str) -> None:
    before = _counts(engine)
    missing = uuid.uuid4()
    r = client.request(method, path.format(missing))
    _assert_error(r, 404, "not_found", str(missing), "does not exist")
    assert _counts(engine) == before


# ---------------------------------------------------------------------------------------------
# Not bad input, but text Postgres cannot store: a PDF whose extracted text holds NUL characters.

def test_pdf_text_with_nul_characters_is_cleaned_not_refused() -> None:
    from app.ingest.load import load_upload

    [doc] = load_upload("nul.pdf", None, make_pdf(["Tides \x00rise and \x00fall."]), LIMIT)
    assert "\x00" not in doc.content
    assert "rise and" in doc.text

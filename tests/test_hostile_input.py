"""Hostile strings in collection names, external ids, queries and API keys: refused or treated as plain data.

(Hostile metadata filters are in test_filtered_search.py.) After each, every table is still there and the
counts are what the test expects: nothing was dropped, nothing matched that should not have.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, create_engine, text

from app.config import Settings
from tests.fixtures.helpers import upload, wait_for_job

HOSTILE = [
    "x'); DROP TABLE documents; --",
    "' OR '1'='1",
    "1; SELECT pg_sleep(5); --",
    "$$; DROP TABLE chunks; $$",
    "\\'; TRUNCATE api_keys; --",
    "Robert'); DELETE FROM collections WHERE ('a'='a",
    "%' OR name LIKE '%",
    "\" OR \"\"=\"",
    "x\x00y",
    "é' || (SELECT string_agg(key_hash, ',') FROM api_keys) || '",
]
# Full-text-search operators and odd characters in queries (the lexical leg parses the query).
QUERIES = [
    *HOSTILE,
    "tea & !leaves | (gardens",
    "tea:* <-> leaves:A",
    "!!!", "&|!()<>:*", "''''", "\\", "-- comment", "/* c */", "🍵 thé ☕", "a" * 1999,
]
TABLES = ("collections", "documents", "chunks", "chunk_vectors", "document_vectors", "lexical_postings", "jobs",
          "job_documents", "api_keys", "embedding_models")


@pytest.fixture(scope="module")
def engine(settings: Settings) -> Iterator[Engine]:
    e = create_engine(settings.database_url or "")
    yield e
    e.dispose()


def _intact(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one() for t in TABLES}


@pytest.fixture(scope="module")
def corpus(client: TestClient, worker: Any) -> str:
    name = f"hostile-{uuid.uuid4().hex[:8]}"
    r = upload(client, "tea.txt", b"Tea gardens: the picking of leaves on steep hills, by hand, in spring.", name)
    assert wait_for_job(client, r.json()["job_id"])["state"] == "succeeded"
    return name


@pytest.mark.parametrize("name", [*HOSTILE, "a/b", "../etc", " default", "x" * 65])
def test_hostile_collection_names_are_refused(client: TestClient, engine: Engine, name: str) -> None:
    before = _intact(engine)
    for r in (
        client.post("/v1/search", json={"query": "tea", "collection": name}),
        client.post("/v1/ask", json={"question": "tea?", "collection": name}),
        client.post("/v1/documents", json={"text": "planted", "collection": name}),
        upload(client, "x.txt", b"planted", name),
        client.post("/v1/admin/keys", json={"name": "x", "role": "read", "collections": [name]}),
    ):
        # 404 for a well-formed name that does not exist; 422 for a malformed one. Never a 5xx.
        assert r.status_code in (404, 422), (name, r.status_code, r.text)
    assert _intact(engine) == before


def test_hostile_external_ids_are_stored_verbatim(client: TestClient, worker: Any, engine: Engine) -> None:
    name = f"hostile-ids-{uuid.uuid4().hex[:8]}"
    ids = [h for h in HOSTILE if "\x00" not in h]
    jobs = []
    for i, external_id in enumerate(ids):
        r = client.post("/v1/documents", json={"text": f"Document number {i} about kites and wind.",
                                               "external_id": external_id, "collection": name})
        assert r.status_code == 202, r.text
        jobs.append(r.json()["job_id"])
    for job in jobs:
        assert wait_for_job(client, job)["state"] == "succeeded"
    hits = client.post("/v1/search", json={"query": "kites and wind", "collection": name, "k": 50}).json()["results"]
    assert sorted(h["external_id"] for h in hits) == sorted(ids)
    for hit in hits:
        assert client.get(f"/v1/documents/{hit['document_id']}").json()["external_id"] == hit["external_id"]
    nul = client.post("/v1/documents", json={"text": "t", "external_id": "x\x00y", "collection": name})
    assert nul.status_code == 422
    counts = _intact(engine)
    with engine.connect() as conn:
        n = conn.execute(text("SELECT count(*) FROM documents d JOIN collections c ON c.id = d.collection_id "
                              "WHERE c.name = :n"), {"n": name}).scalar_one()
    assert n == len(ids)
    assert counts["api_keys"] > 0
    assert counts["documents"] >= n


@pytest.mark.parametrize("mode", ["hybrid", "lexical", "dense"])
def test_hostile_queries_are_plain_text(client: TestClient, engine: Engine, corpus: str, mode: str) -> None:
    before = _intact(engine)
    for query in QUERIES:
        if "\x00" in query:
            r = client.post("/v1/search", json={"query": query, "collection": corpus, "mode": mode})
            assert r.status_code == 422, r.text
            assert "NUL" in r.text
            continue
        r = client.post("/v1/search", json={"query": query, "collection": corpus, "mode": mode})
        assert r.status_code == 200, (query, r.text)
        assert all(h["external_id"] == "tea.txt" for h in r.json()["results"])
        a = client.post("/v1/ask", json={"question": query, "collection": corpus, "mode": mode})
        assert a.status_code == 200, (query, a.text)
    assert _intact(engine) == before


BAD_KEYS = [f"pgs_{h}_x" for h in HOSTILE if h.isascii() and "\x00" not in h] + ["pgs_", "pgs__", "' OR 1=1 --"]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_hostile_keys_are_just_wrong(anonymous: TestClient, engine: Engine, key: str) -> None:
    before = _intact(engine)
    r = anonymous.get("/v1/status", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 401, r.text
    assert _intact(engine) == before


# --- Issue 27: text that makes a parser's time grow faster than its size ---------------------------------
#
# A 60 KB JSON body of spaces froze the whole API for 5 s (a pattern in the loader's clean-up rescanned a run of
# blanks from each of its characters), a 9 KB Markdown first line took 65 s (the title pattern), a 6 KB heading
# line held a worker for 18 s (the chunker's heading pattern). Each text-handling function now takes every
# adversarial input below, at the upload limit, in seconds, and the API answers other clients meanwhile. The
# time guards are generous hang guards: the defects take minutes to hours at this size.

def _adversarial(n: int) -> dict[str, str]:
    """Texts of about n characters that make super-linear code show itself: long runs of one character, of
    blanks, of Markdown and HTML markup, unclosed constructs, one long line."""
    k = n // 3
    return {
        "spaces": " " * n + "x",
        "tabs": "\t" * n + "x",
        "blank-line-ends": ("x" + " " * 1000 + "\n") * (n // 1002),
        "newlines": "\n" * n,
        "newline-spaces": "\n " * (n // 2),
        "title-line": "# a" + " " * k + "#" * k + " " * k + "x",
        "late-heading": "# Title\n\nAn innocent first section.\n\n## a" + " " * k + "#" * k + " " * k + "x",
        "hashes": "#" * n,
        "heading-of-spaces": "#" + " " * n + "x",
        "stars": "*" * n,
        "underscores": "_" * n,
        "nested-emphasis": "*_" * (n // 2) + "x",
        "open-brackets": "[" * n,
        "open-link": "[a](" * (n // 4),
        "bracket-word": "[" + "a" * n,
        "pipes": "|" * n,
        "rule-of-dashes": "- " * (n // 2) + "x",
        "equals": "=" * n,
        "fences": "```\n" * (n // 4),
        "unclosed-tags": "<div>" * (n // 5),
        "nested-lists": "<ul><li>" * (n // 8),
        "angles": "<" * n,
        "open-start-tags": "<p>x</p>" + "<a" * (n // 2),
        "open-end-tags": "<p>x</p>" + "</" * (n // 2),
        "long-line": "a" * n,
        "one-line-of-words": "word " * (n // 5),
        "hyphens": "a-" * (n // 2),
        "full-stops": "." * n,
        "abbreviations": "Dr. " * (n // 4),
        "initials": "A. " * (n // 3),
        "open-citations": "[1, " * (n // 4),
        "commas": "," * n,
        "quotes": '"' * n,
        "long-header-csv": "h" * 5000 + "\n" + "1\n" * (n // 2),
        "open-csv-quotes": ',"a' * (n // 3),
    }


# The upload limit of the API these are sent to (the parsing_api fixture) and their size: large enough that the
# quadratic defects take minutes (20k spaces took 0.45 s), small enough for the default run. The slow run parses
# the same at 1 MiB.
LIMIT_BYTES = 256 << 10
FORMATS = ["t.txt", "t.md", "t.html", "t.csv", "t.jsonl"]


def _as(name: str, text: str) -> bytes:
    if name.endswith(".jsonl"):  # escaped control characters take up to six bytes each
        return json.dumps({"_id": "1", "title": text[:5000], "text": text[: len(text) // 6]}).encode()
    return text.encode()


@pytest.fixture(scope="module")
def chunker() -> Any:
    from transformers import AutoTokenizer

    from app.embedding import resolve_model_path
    from app.ingest.chunk import Chunker

    s = Settings()
    return Chunker(AutoTokenizer.from_pretrained(resolve_model_path(s.embedding_model)), 254, 32)


def _parse_everything(sample: str, limit: int, chunker: Any) -> None:
    """Each format's loader (in-process: no sandbox to hide behind) and the JSON body's, the worker's chunker on
    what each yields, the answerer's citation scan and the lexical query on the raw text: each finishes, or
    refuses with a 4xx."""
    from app.errors import AppError
    from app.ingest.load import load_json, load_upload
    from app.query.answer import CitationStream, resolve_citations
    from app.query.retrieve import lexical_query

    def loaded_or_refused(load: Any, *args: Any) -> list[Any]:
        refused: AppError | None = None
        try:
            docs = load(*args)
        except AppError as exc:
            refused = exc
        if refused is not None:
            assert 400 <= refused.status_code < 500, refused
            return []
        return docs if isinstance(docs, list) else [docs]

    loaded = [doc for name in FORMATS for doc in loaded_or_refused(load_upload, name, None, _as(name, sample), limit)]
    loaded += loaded_or_refused(load_json, sample, sample[:1000], None, None)
    seen = set()
    for doc in loaded:
        assert doc.title is None or len(doc.title) <= 1000
        if (doc.content, doc.format) in seen:
            continue
        seen.add((doc.content, doc.format))
        for chunk in chunker.split(doc.content, kind=doc.format, title=doc.title):
            assert chunk.text
            assert all(len(h) <= 300 for h in chunk.heading_path)
    resolve_citations(sample, 3)
    stream = CitationStream(3)
    for i in range(0, len(sample), 4096):
        stream.feed(sample[i : i + 4096])
    stream.close()
    lexical_query(sample)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("pattern", list(_adversarial(0)))
def test_every_loader_and_the_chunker_take_adversarial_text_in_linear_time(pattern: str, chunker: Any) -> None:
    _parse_everything(_adversarial(LIMIT_BYTES - 1024)[pattern], LIMIT_BYTES, chunker)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_adversarial_text_at_one_mebibyte(chunker: Any) -> None:
    """Four times the default run's size: a quadratic step would take sixteen times as long, a linear one four."""
    for sample in _adversarial((1 << 20) - 1024).values():
        _parse_everything(sample, 1 << 20, chunker)


def test_the_heading_scan_reads_headings_as_the_pattern_did() -> None:
    """atx_heading replaced a pattern that backtracked cubically; on short lines it gives what the pattern gave."""
    import itertools
    import re

    from app.ingest.chunk import atx_heading

    pattern = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)[ \t]*#*[ \t]*$")
    for size in range(9):
        for chars in itertools.product(" #\ta", repeat=size):
            line = "".join(chars)
            m = pattern.match(line)
            assert atx_heading(line) == ((len(m.group(1)), m.group(2)) if m else None), repr(line)


@pytest.fixture(scope="module")
def parsing_api(service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    from tests.fixtures.services import scratch_api

    with scratch_api(service_env, tmp_path_factory.mktemp("hostile") / "api.log", "write",
                     PGSAGE_MAX_UPLOAD_BYTES=str(LIMIT_BYTES)) as (base, key):
        yield base, key


@pytest.mark.timeout(900)
def test_other_clients_are_answered_while_adversarial_uploads_parse(parsing_api: tuple[str, str]) -> None:
    """Every adversarial text, in every format and as a JSON body, sent to a real API process at the upload limit
    from two clients at once, while a third asks /healthz: every upload is answered (202, or a 4xx naming what
    is wrong), never a 5xx, and /healthz answers every time within seconds."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    base, key = parsing_api
    auth = {"Authorization": f"Bearer {key}"}
    adversarial = _adversarial(LIMIT_BYTES - 1024)
    health: list[tuple[int, float]] = []
    stop = threading.Event()

    def ask_health() -> None:
        with httpx.Client(base_url=base, timeout=120) as c:
            while not stop.is_set():
                t0 = time.monotonic()
                status = c.get("/healthz").status_code
                health.append((status, time.monotonic() - t0))
                time.sleep(0.1)

    def send(item: tuple[str, str]) -> tuple[str, int, str]:
        pattern, name = item
        sample = adversarial[pattern]
        with httpx.Client(base_url=base, headers=auth, timeout=300) as c:
            if name == "json":
                r = c.post("/v1/documents", json={"text": sample, "collection": "hostile"})
            else:
                r = c.post("/v1/documents", files={"file": (name, _as(name, sample))},
                           data={"collection": "hostile"})
        return f"{pattern} as {name}", r.status_code, r.text[:300]

    watcher = threading.Thread(target=ask_health)
    watcher.start()
    try:
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(send, [(p, n) for p in adversarial for n in [*FORMATS, "json"]]))
    finally:
        stop.set()
        watcher.join()
    for what, status, body in answers:
        assert status == 202 or 400 <= status < 500, (what, status, body)
    assert len(health) >= 10, health
    assert all(status == 200 for status, _ in health), health
    slowest = max(seconds for _, seconds in health)
    assert slowest < 10, f"/healthz waited {slowest:.1f} s behind the uploads"


def test_a_hostile_heading_after_an_innocent_one_does_not_hold_the_worker(client: TestClient, worker: Any) -> None:
    """The API reads only the first heading for the title; the worker's chunker reads them all. A later heading
    line built to backtrack (6 KB held a worker 18 s; this one is 300 KB) is indexed like any other."""
    k = 100_000
    text = "# Tides\n\nThe tide rises twice a day.\n\n## a" + " " * k + "#" * k + " " * k + "x\n\nLow water."
    r = upload(client, "tides.md", text.encode(), f"hostile-md-{uuid.uuid4().hex[:8]}")
    assert r.status_code == 202, r.text
    job = wait_for_job(client, r.json()["job_id"], timeout=120)
    assert job["state"] == "succeeded", job

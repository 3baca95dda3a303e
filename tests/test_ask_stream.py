"""POST /v1/ask with "stream": true and the extractive answerer (no LLM), and `pgsage ask --stream`."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from app.config import Settings
from tests.fixtures.helpers import make_key, wait_for_job
from tests.fixtures.services import free_port

DOCUMENTS = [
    ("tides", "Ocean tides",
     "Tides are the rise and fall of sea level caused by the gravitational pull of the Moon and the Sun. "
     "Spring tides, with the largest range, happen at new and full moon when the Sun and Moon line up. "
     "Neap tides, with the smallest range, happen when the Sun and Moon are at right angles."),
    ("espresso", "Brewing espresso",
     "Espresso is brewed by forcing hot water at about 9 bar of pressure through finely ground coffee. "
     "A good shot of espresso takes 25 to 30 seconds to extract."),
    ("chain", "Bicycle chain care",
     "A bicycle chain should be replaced once it has stretched by 0.5 percent, measured with a chain checker. "
     "A worn chain wears out the cassette and chainrings."),
]
QUESTION = "When do spring tides happen and what causes tides?"


def sse_events(body: str) -> list[tuple[str, dict[str, Any]]]:
    """(event, data) of each Server-Sent Event in a response body; every data line is one JSON object."""
    events = []
    for block in body.split("\n\n"):
        if not block.strip():
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        assert set(fields) == {"event", "data"}, block
        events.append((fields["event"], json.loads(fields["data"])))
    return events


@pytest.fixture(scope="module")
def corpus(client: TestClient, worker: Any) -> str:
    name = f"stream-{time.monotonic_ns()}"
    for external_id, title, body in DOCUMENTS:
        r = client.post("/v1/documents", json={"text": body, "title": title, "external_id": external_id,
                                               "collection": name})
        assert r.status_code == 202, r.text
        job = wait_for_job(client, r.json()["job_id"])
        assert job["state"] == "succeeded", job
    return name


def test_extractive_stream_is_the_answer_sentence_by_sentence(client: TestClient, corpus: str) -> None:
    plain = client.post("/v1/ask", json={"question": QUESTION, "collection": corpus})
    assert plain.status_code == 200, plain.text
    expected = plain.json()
    assert expected["mode"] == "extractive"

    r = client.post("/v1/ask", json={"question": QUESTION, "collection": corpus, "stream": True})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    names = [name for name, _ in events]
    assert names[0] == "citations"
    assert names[-1] == "done"
    assert set(names[1:-1]) == {"token"}, names

    tokens = [data["text"] for name, data in events if name == "token"]
    done = events[-1][1]
    # The final event is the non-streamed answer, and the tokens are its sentences in order.
    assert done == expected
    assert "".join(tokens) == done["answer"]
    assert len(tokens) == done["answer"].count("] ") + 1
    for token in tokens:
        assert token.strip().endswith("]"), token  # each sentence comes with its citation marker
    # The extractive answer cites every source it shows: the first event is the final citations.
    assert events[0][1]["citations"] == done["citations"]
    assert {c["external_id"] for c in done["citations"]} == {"tides"}
    for c in done["citations"]:
        assert set(c) >= {"n", "chunk_id", "document_id", "external_id", "title", "text"}
        assert f"[{c['n']}]" in done["answer"]


def test_stream_with_nothing_relevant_is_citations_then_not_found(client: TestClient, corpus: str) -> None:
    question = "Who won the 1998 football world cup final?"
    plain = client.post("/v1/ask", json={"question": question, "collection": corpus}).json()
    assert plain["mode"] == "none"
    r = client.post("/v1/ask", json={"question": question, "collection": corpus, "stream": True})
    assert r.status_code == 200, r.text
    assert sse_events(r.text) == [("citations", {"citations": []}), ("done", plain)]


@pytest.mark.parametrize("value", ["yes", "true", 1, 0, 1.0, None, [True], {"on": True}])
def test_stream_that_is_not_a_boolean_is_refused(client: TestClient, corpus: str, value: Any) -> None:
    r = client.post("/v1/ask", json={"question": QUESTION, "collection": corpus, "stream": value})
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error"] == "invalid_input"
    assert any(e["loc"][-1] == "stream" for e in body["detail"]), body


def test_stream_refused_before_it_starts_is_a_plain_error(client: TestClient) -> None:
    """Everything up to retrieval happens before the response starts, so it has a status code."""
    r = client.post("/v1/ask", json={"question": QUESTION, "collection": "no-such-collection", "stream": True})
    assert r.status_code == 404, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["error"] == "not_found"


@pytest.fixture(scope="module")
def served(settings: Settings, client: TestClient) -> Iterator[tuple[str, str]]:
    """The API over real HTTP (uvicorn in a thread), for the CLI; its URL and a read key."""
    import uvicorn

    from app.main import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert thread.is_alive(), "uvicorn stopped"
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.2)
    try:
        yield url, make_key(client, "read", ["*"])
    finally:
        server.should_exit = True
        thread.join(30)


def test_cli_ask_stream_prints_the_answer_and_its_citations(
    client: TestClient, corpus: str, served: tuple[str, str]
) -> None:
    from app.cli import app

    url, key = served
    expected = client.post("/v1/ask", json={"question": QUESTION, "collection": corpus}).json()
    env = {"PGSAGE_API_KEY": key}
    runner = CliRunner()
    result = runner.invoke(app, ["ask", QUESTION, "-c", corpus, "--stream", "--url", url], env=env)
    assert result.exit_code == 0, result.output
    assert expected["answer"] in result.stdout
    for c in expected["citations"]:
        assert f"[{c['n']}] {c['title']}  ({c['external_id']}, chunk {c['chunk_id']}" in result.stdout

    # --json: one JSON line per event, in order.
    result = runner.invoke(app, ["ask", QUESTION, "-c", corpus, "--stream", "--json", "--url", url], env=env)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["event"] for e in lines][:: len(lines) - 1] == ["citations", "done"]
    assert lines[-1]["data"] == expected

    # A refusal before the stream starts (here: no such collection) is an error and exit 1.
    result = runner.invoke(app, ["ask", QUESTION, "-c", "no-such-collection", "--stream", "--url", url], env=env)
    assert result.exit_code == 1
    assert "error: 404" in result.stderr

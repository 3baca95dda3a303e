"""The CLI against the embedded default: `pgsage up` (pgserver + file-system broker), then the client commands."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fixtures.services import free_port

CORPUS = Path(__file__).parent / "data" / "corpus"


def _env(tmp: Path) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("PGSAGE_") and k not in ("DATABASE_URL", "REDIS_URL")
    }
    return {**env, "PGSAGE_DATA_DIR": str(tmp), "HF_HUB_OFFLINE": "1"}


def _pgsage(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=Path(__file__).parents[1],
    )


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str], str]]:
    """`pgsage up` on the embedded default, with its demo, left running for the client commands."""
    tmp = tmp_path_factory.mktemp("up")
    port = free_port()
    env = _env(tmp)
    log = tmp / "up.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "up", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).parents[1],
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while "press Ctrl-C to stop" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(1)
        output = log.read_text()
        made = _pgsage("keys", "create", "--name", "cli tests", "--role", "admin", "-c", "*", "--json", env=env)
        assert made.returncode == 0, made.stderr
        key = json.loads(made.stdout)["key"]
        yield url, {**env, "PGSAGE_URL": url, "PGSAGE_API_KEY": key}, output
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert "pgsage stopped" in log.read_text()


def test_up_starts_the_embedded_default_and_answers_with_citations(running: tuple[str, dict[str, str], str]) -> None:
    url, _, output = running
    assert "database: embedded PostgreSQL + pgvector" in output
    assert "broker:   file-system queue" in output
    assert "4 documents indexed, 0 unchanged, 0 failed" in output
    assert "[1] " in output.split("$ pgsage ask", 1)[1]  # the answer cites a chunk
    # Quiet: one line per component and the console's address, nothing a user cannot act on (Celery's
    # superuser warning when run as root, model-loading progress bars, tokenizer length warnings, Kombu's
    # hostname warning).
    for component in ("database:", "broker:", "schema:", "worker:", "api:", "console:"):
        assert sum(line.startswith(component) for line in output.splitlines()) == 1, (component, output)
    assert f"console:  {url}/ui" in output
    for noise in ("superuser", "Warning", "WARNING", "Loading weights", "it/s]", "Token indices", "hostname"):
        assert noise not in output, (noise, output)
    # A fresh install says how to get the first admin key; the demo's own key is revoked after it.
    assert "pgsage keys create --name admin --role admin --collection '*'" in output
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{url}/v1/status").status_code == 401
    ready = httpx.get(f"{url}/readyz").json()
    assert ready["database"] == "ok"
    assert ready["broker"] == "ok"


def test_client_commands(running: tuple[str, dict[str, str], str]) -> None:
    _, env, _ = running
    r = _pgsage("ingest", str(CORPUS), "--collection", "cli", env=env)
    assert r.returncode == 0, r.stderr
    assert "6 files: 6 documents indexed, 0 unchanged, 0 failed" in r.stdout

    again = _pgsage("ingest", str(CORPUS), "--collection", "cli", env=env)
    assert again.returncode == 0
    assert "0 documents indexed, 6 unchanged" in again.stdout

    found = _pgsage("search", "espresso grind size", "--collection", "cli", "-k", "2", env=env)
    assert found.returncode == 0, found.stderr
    assert found.stdout.splitlines()[0].endswith("(coffee.txt)")

    answer = _pgsage("ask", "What does a starter contain?", "--collection", "cli", env=env)
    assert answer.returncode == 0
    assert "sourdough.md" in answer.stdout

    status = _pgsage("status", env=env)
    assert status.returncode == 0
    assert "active model: all-MiniLM-L6-v2" in status.stdout
    assert "cli: 6 documents (6 indexed, 0 queued, 0 failed)" in status.stdout


def test_client_errors_are_clear(running: tuple[str, dict[str, str], str], tmp_path: Path) -> None:
    _, env, _ = running
    missing = _pgsage("search", "anything", "--collection", "no-such-collection", env=env)
    assert missing.returncode == 1
    assert "404: collection 'no-such-collection' does not exist" in missing.stderr

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    rejected = _pgsage("ingest", str(empty), env=env)
    assert rejected.returncode == 1
    assert "empty.txt is empty" in rejected.stderr

    down = _pgsage("status", env={**env, "PGSAGE_URL": f"http://127.0.0.1:{free_port()}"})
    assert down.returncode == 1
    assert "pgsage is not answering" in down.stderr


def test_keys_create_list_revoke(running: tuple[str, dict[str, str], str]) -> None:
    _url, env, _ = running
    made = _pgsage("keys", "create", "--name", "reader", "--role", "read", "-c", "cli", env=env)
    assert made.returncode == 0, made.stderr
    assert "only time the key is shown" in made.stdout
    key = next(w for w in made.stdout.split() if w.startswith("pgs_") and len(w) > 30)
    reader = {**env, "PGSAGE_API_KEY": key}
    assert _pgsage("status", env=reader).returncode == 0
    refused = _pgsage("ingest", str(CORPUS), "--collection", "cli", env=reader)
    assert refused.returncode == 1
    assert "403: this endpoint needs a key with the write role" in refused.stderr

    listed = _pgsage("keys", "list", "--json", env=env)
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    assert rows["reader"]["role"] == "read"
    assert rows["reader"]["collections"] == ["cli"]
    assert key not in listed.stdout
    assert "key_hash" not in listed.stdout
    assert "pgsage up demo" not in rows  # revoked after the demo

    revoked = _pgsage("keys", "revoke", key, env=env)
    assert revoked.returncode == 0
    assert "revoked" in revoked.stdout
    after = _pgsage("status", env=reader)
    assert after.returncode == 1
    assert "401: the API key is not valid, or has been revoked" in after.stderr
    assert "PGSAGE_API_KEY" in after.stderr
    bad = _pgsage("keys", "create", "--name", "x", "--role", "root", "-c", "cli", env=env)
    assert bad.returncode == 1
    assert "role must be one of read, write, admin" in bad.stderr


def test_every_command_has_help() -> None:
    import typer.main

    from app.cli import app

    names = sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
    assert {"up", "ingest", "search", "ask", "status", "migrate", "worker", "api", "keys"} <= set(names)
    for name in names:
        r = subprocess.run(
            [sys.executable, "-m", "app.cli", name, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=Path(__file__).parents[1],
        )
        assert r.returncode == 0, (name, r.stderr)
        assert "Usage" in r.stdout


def _beir_folder(root: Path) -> tuple[Path, dict[str, dict[str, int]]]:
    """A small BEIR folder made of the shipped corpus: one document per file, three labelled queries."""
    folder = root / "mini-beir"
    (folder / "qrels").mkdir(parents=True)
    with (folder / "corpus.jsonl").open("w") as f:
        for path in sorted(CORPUS.iterdir()):
            f.write(json.dumps({"_id": path.stem, "title": "", "text": path.read_text()}) + "\n")
    queries = {"q1": "how fine to grind coffee for espresso", "q2": "what makes a volcano erupt",
               "q3": "feeding a sourdough starter"}
    qrels = {"q1": {"coffee": 1}, "q2": {"volcanoes": 2}, "q3": {"sourdough": 1, "photosynthesis": 0}}
    with (folder / "queries.jsonl").open("w") as f:
        for qid, q in queries.items():
            f.write(json.dumps({"_id": qid, "text": q}) + "\n")
    with (folder / "qrels" / "dev.tsv").open("w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for qid, rels in qrels.items():
            for doc, grade in rels.items():
                f.write(f"{qid}\t{doc}\t{grade}\n")
    return folder, qrels


def test_eval_scores_a_beir_folder_through_the_service(
    running: tuple[str, dict[str, str], str], tmp_path: Path
) -> None:
    from app.eval.metrics import evaluate

    url, env, _ = running
    folder, qrels = _beir_folder(tmp_path)
    r = _pgsage("eval", str(folder), "--split", "dev", "--json", env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert {"ndcg@10", "recall@10", "recall@100", "mrr@10", "latency_ms_p50", "latency_ms_p95"} <= set(out)
    assert "ingesting" in r.stderr
    assert out["collection"] == "beir-mini-beir"
    assert out["queries"] == 3
    # The same figures, computed here from the service's own rankings.
    rankings = {}
    for qid, query in {"q1": "how fine to grind coffee for espresso", "q2": "what makes a volcano erupt",
                       "q3": "feeding a sourdough starter"}.items():
        hits = httpx.post(f"{url}/v1/search", json={"query": query, "k": 100, "collection": out["collection"]},
                          headers={"Authorization": f"Bearer {env['PGSAGE_API_KEY']}"}).json()
        rankings[qid] = [h["external_id"] for h in hits["results"]]
    expected = evaluate(rankings, qrels)
    for key in ("ndcg@10", "recall@10", "recall@100", "mrr@10"):
        assert out[key] == pytest.approx(expected[key], abs=1e-4)
    assert out["ndcg@10"] > 0.9  # three easy queries
    assert 0 < out["latency_ms_p50"] <= out["latency_ms_p95"]

    again = _pgsage("eval", str(folder), "--split", "dev", "--mode", "lexical", "--bm25-k1", "1.2", env=env)
    assert again.returncode == 0, again.stderr
    assert "ingesting" not in again.stderr  # the corpus is already there
    assert "mode lexical" in again.stdout
    assert "ndcg@10" in again.stdout

    missing = _pgsage("eval", str(folder), "--split", "nope", env=env)
    assert missing.returncode == 1
    assert "no qrels for split 'nope'" in missing.stderr


QA_DOCUMENTS = {
    "lighthouse.md": "# The Lindesnes lighthouse\n\nThe Lindesnes lighthouse stands at the southern tip of Norway. "
    "It was first lit in 1656, which makes it the oldest lighthouse in the country.\n\nIts light can be seen "
    "17 nautical miles out to sea.\n",
    "glacier.md": "# The Jostedal Glacier\n\nThe Jostedal Glacier is the largest glacier in continental Europe. "
    "It covers 487 square kilometres of the mountains of western Norway.\n",
    "tea.md": "# Matcha\n\nMatcha is a fine powder of green tea leaves grown in the shade. The Japanese tea "
    "ceremony, called chanoyu, centres on preparing and serving matcha.\n",
}
QA_QUESTIONS = [
    {"id": "1", "question": "When was the Lindesnes lighthouse first lit?", "answers": ["1656"],
     "document": "lighthouse.md"},
    {"id": "2", "question": "How large is the Jostedal Glacier?", "answers": ["487 square kilometres", "487"],
     "document": "glacier.md"},
    {"id": "3", "question": "What is the Japanese tea ceremony called?", "answers": ["chanoyu"],
     "document": "tea.md"},
    {"id": "4", "question": "How far out to sea can the light of Lindesnes be seen?",
     "answers": ["17 nautical miles"], "document": "lighthouse.md"},
    # Its gold answer is in no document: no passage and no answer can hold it.
    {"id": "5", "question": "Who designed the Lindesnes lighthouse?", "answers": ["Gustave Eiffel"],
     "document": "lighthouse.md"},
]


def test_eval_qa_scores_passages_and_answers_through_the_service(
    running: tuple[str, dict[str, str], str], tmp_path: Path
) -> None:
    from app.eval.qa import Passage, Question, QuestionResult, score

    url, env, _ = running
    folder = tmp_path / "mini-qa"
    folder.mkdir()
    for name, text in QA_DOCUMENTS.items():
        (folder / name).write_text(text)
    qa = tmp_path / "questions.jsonl"
    qa.write_text("".join(json.dumps(q) + "\n" for q in QA_QUESTIONS))

    r = _pgsage("eval", str(folder), "--qa", str(qa), "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert "ingesting 3 files" in r.stderr
    out = json.loads(r.stdout)
    assert out["collection"] == "qa-mini-qa"
    assert out["questions"] == 5
    assert out["k"] == 5
    # Four gold answers are in the corpus and five passages are read; the fifth is nowhere.
    assert out["passage_hit@5"] == 0.8
    assert 0.6 <= out["passage_hit@1"] <= 0.8
    assert out["document@1"] >= 0.8
    assert 0.4 <= out["answer_holds"] <= 0.8
    assert out["mean_answer_words"] > 0
    for name in ("search", "ask"):
        assert 0 < out[f"{name}_latency_ms_p50"] <= out[f"{name}_latency_ms_p95"]

    # The same figures, computed here from the service's own answers.
    headers = {"Authorization": f"Bearer {env['PGSAGE_API_KEY']}"}
    results = []
    for q in QA_QUESTIONS:
        found = httpx.post(f"{url}/v1/search", headers=headers, timeout=60, json={
            "query": q["question"], "k": 5, "collection": out["collection"], "group": "passage"})
        assert found.status_code == 200, found.text
        answered = httpx.post(f"{url}/v1/ask", headers=headers, timeout=60, json={
            "question": q["question"], "k": 5, "collection": out["collection"]})
        assert answered.status_code == 200, answered.text
        passages = [Passage(h["external_id"], h["text"]) for h in found.json()["results"]]
        question = Question(q["id"], q["question"], tuple(q["answers"]), q["document"])
        results.append(QuestionResult(question, passages, answered.json()["answer"], 1.0, 1.0))
    expected = score(results, 5)
    for key in ("passage_hit@1", "passage_hit@5", "document@1", "answer_holds", "mean_answer_words"):
        assert out[key] == pytest.approx(expected[key], abs=1e-4), key

    again = _pgsage("eval", str(folder), "--qa", str(qa), "--max-questions", "2", "--mode", "lexical", env=env)
    assert again.returncode == 0, again.stderr
    assert "ingesting" not in again.stderr  # the documents are already there
    assert "2 questions on qa-mini-qa (k 5, mode lexical" in again.stdout
    assert "passage_hit@1" in again.stdout
    assert "ask latency" in again.stdout

    sampled = _pgsage("eval", str(folder), "--qa", str(qa), "--sample", "3", "--seed", "1", "--json", env=env)
    assert sampled.returncode == 0, sampled.stderr
    assert json.loads(sampled.stdout)["questions"] == 3

    stray = tmp_path / "stray.jsonl"
    stray.write_text(json.dumps({**QA_QUESTIONS[0], "document": "no-such-file.md"}) + "\n")
    missing = _pgsage("eval", str(folder), "--qa", str(stray), env=env)
    assert missing.returncode == 1
    assert "1 document(s) named in" in missing.stderr
    assert "no-such-file.md" in missing.stderr
    assert "Traceback" not in missing.stderr

"""A file's identity is its path: same-named files in different folders stay distinct documents.

Through the CLI against `pgsage up` (test_cli.py's fixture) and through the API's `path` field; a bad
`path` is refused before anything is written; without `path` the base name stays the id.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, create_engine, text

from app.config import Settings
from tests import test_cli
from tests.fixtures.helpers import upload, wait_for_job

running = test_cli.running  # test_cli.py's fixture: `pgsage up` on the embedded default, for the CLI tests
_pgsage = test_cli._pgsage

README_A = "# Alpha service\n\nThe alpha service rotates its signing keys every Tuesday at noon."
README_B = "# Beta service\n\nThe beta service backs up its database to cold storage each night."


def _tree(root: Path) -> Path:
    """A folder holding a/README.md, b/README.md and a top-level file."""
    for sub, body in (("a", README_A), ("b", README_B)):
        (root / sub).mkdir(parents=True)
        (root / sub / "README.md").write_text(body)
    (root / "notes.txt").write_text("Plain notes about the coffee machine on the third floor.")
    return root


@pytest.fixture(scope="module")
def engine(settings: Settings) -> Iterator[Engine]:
    assert settings.database_url
    eng = create_engine(settings.database_url)
    yield eng
    eng.dispose()


def _documents(engine: Engine, collection: str) -> dict[str, tuple[str | None, str]]:
    """external_id -> (source, status) of a collection's documents."""
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT d.external_id, d.source, d.status FROM documents d "
                 "JOIN collections c ON c.id = d.collection_id WHERE c.name = :c"),
            {"c": collection},
        ).all()
    return {r.external_id: (r.source, r.status) for r in rows}


def _collection_exists(engine: Engine, collection: str) -> bool:
    with engine.connect() as conn:
        found = conn.execute(text("SELECT count(*) FROM collections WHERE name = :c"), {"c": collection})
        return bool(found.scalar_one())


# ---------------------------------------------------------------- through the CLI


def test_cli_keeps_same_named_files_in_different_folders(
    running: tuple[str, dict[str, str], str], tmp_path: Path
) -> None:
    _, env, _ = running
    folder = _tree(tmp_path / "docs")
    first = _pgsage("ingest", str(folder), "--collection", "identity", env=env)
    assert first.returncode == 0, first.stderr
    assert "3 files: 3 documents indexed, 0 unchanged, 0 failed" in first.stdout

    status = _pgsage("status", env=env)
    assert "identity: 3 documents (3 indexed, 0 queued, 0 failed)" in status.stdout
    found = _pgsage("search", "service", "--collection", "identity", "-k", "10", "--mode", "lexical", "--json",
                    env=env)
    assert found.returncode == 0, found.stderr
    assert {hit["external_id"] for hit in json.loads(found.stdout)["results"]} == {"a/README.md", "b/README.md"}

    again = _pgsage("ingest", str(folder), "--collection", "identity", env=env)
    assert again.returncode == 0, again.stderr
    assert "3 files: 0 documents indexed, 3 unchanged, 0 failed" in again.stdout


def test_cli_refuses_two_files_that_would_share_an_id(
    running: tuple[str, dict[str, str], str], tmp_path: Path
) -> None:
    _, env, _ = running
    folder = _tree(tmp_path / "docs")
    clash = _pgsage("ingest", str(folder / "a"), str(folder / "b"), "--collection", "identity-clash", env=env)
    assert clash.returncode == 1
    assert "would both be stored as 'README.md'" in clash.stderr
    assert "identity-clash" not in _pgsage("status", env=env).stdout  # refused before any upload

    # The same file named twice is uploaded once.
    twice = _pgsage("ingest", str(folder), str(folder / "notes.txt"), "--collection", "identity-twice", env=env)
    assert twice.returncode == 0, twice.stderr
    assert "3 files: 3 documents indexed" in twice.stdout


# ---------------------------------------------------------------- through the API


def test_path_is_the_external_id(client: TestClient, worker: Any, engine: Engine, collection: str) -> None:
    for path, body in (("a/README.md", README_A), ("b/README.md", README_B)):
        r = upload(client, "README.md", body.encode(), collection, path=path)
        assert r.status_code == 202, r.text
        job = wait_for_job(client, r.json()["job_id"])
        assert (job["state"], job["indexed"]) == ("succeeded", 1), job
    assert _documents(engine, collection) == {
        "a/README.md": ("a/README.md", "indexed"),
        "b/README.md": ("b/README.md", "indexed"),
    }
    for path, body in (("a/README.md", README_A), ("b/README.md", README_B)):
        r = upload(client, "README.md", body.encode(), collection, path=path)
        assert r.status_code == 202, r.text
        assert (r.json()["queued"], r.json()["unchanged"]) == (0, 1)
    assert len(_documents(engine, collection)) == 2


def test_upload_without_path_keeps_the_base_name(
    client: TestClient, worker: Any, engine: Engine, collection: str
) -> None:
    r = upload(client, "notes.txt", b"Notes on the coffee machine.", collection)
    assert r.status_code == 202, r.text
    assert wait_for_job(client, r.json()["job_id"])["indexed"] == 1
    assert _documents(engine, collection) == {"notes.txt": ("notes.txt", "indexed")}
    # A file at the top of an ingested folder sends its name as its path: the same document, unchanged.
    again = upload(client, "notes.txt", b"Notes on the coffee machine.", collection, path="notes.txt")
    assert again.status_code == 202, again.text
    assert (again.json()["queued"], again.json()["unchanged"]) == (0, 1)


def test_jsonl_path_names_the_source_only(client: TestClient, engine: Engine, collection: str) -> None:
    lines = b'{"_id": "d1", "text": "one"}\n{"_id": "d2", "text": "two"}\n'
    r = upload(client, "corpus.jsonl", lines, collection, path="sets/mini/corpus.jsonl")
    assert r.status_code == 202, r.text
    assert {ext: source for ext, (source, _) in _documents(engine, collection).items()} == {
        "d1": "sets/mini/corpus.jsonl",
        "d2": "sets/mini/corpus.jsonl",
    }


@pytest.mark.parametrize(
    ("path", "phrase"),
    [
        pytest.param("../x.md", "'..'", id="parent-segment"),
        pytest.param("a/../../x.md", "'..'", id="inner-parent-segment"),
        pytest.param("/etc/passwd", "absolute", id="absolute"),
        pytest.param("a\x00b.md", "NUL", id="nul"),
        pytest.param("a\nb.md", "control", id="newline"),
        pytest.param("x" * 600, "1-512", id="600-characters"),
        pytest.param("", "1-512", id="empty"),
        pytest.param("./a.md", "normalised", id="dot-segment"),
        pytest.param("a//b.md", "normalised", id="empty-segment"),
    ],
)
def test_bad_path_is_refused_and_nothing_is_written(
    client: TestClient, engine: Engine, collection: str, path: str, phrase: str
) -> None:
    r = upload(client, "x.md", b"# Fine\n\nPerfectly good text.", collection, path=path)
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error"] == "invalid_input", body
    assert "path" in body["detail"]
    assert phrase in body["detail"]
    assert not _collection_exists(engine, collection)


def test_path_sent_as_a_file_is_refused(client: TestClient, engine: Engine, collection: str) -> None:
    r = client.post("/v1/documents", data={"collection": collection},
                    files=[("file", ("x.md", b"text")), ("path", ("p.md", b"a.md"))])
    assert r.status_code == 400, r.text  # the form's one-file limit answers first
    assert not _collection_exists(engine, collection)

"""Passage search and short cited answers through the real API, worker and model.

Heading paths and PDF pages come back with every result and citation; group=passage returns several
passages of one long document, group=document one result per document; the extractive answer quotes
whole sentences (never list fragments, code or headings).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from app.config import Settings
from app.query.answer import QUOTE_GAP
from tests.fixtures.helpers import make_pdf, upload, wait_for_job

MANUAL = """# Espresso machine manual

Read this manual before the first use of the machine.

## Brewing

The machine brews espresso by forcing water at nine bar of pressure through finely ground coffee.
A single shot takes between twenty-five and thirty seconds to extract.

- Grind the beans just before brewing.
- Tamp the grounds evenly

```
brew --pressure 9 --seconds 28
```

## Cleaning

### Descaling

Descale the boiler every two months with a citric acid solution to remove limescale.

### Milk wand

Purge and wipe the steam wand after every use so that milk does not dry inside it.
"""
REPORT = make_pdf(
    ["Quarterly report of the Harbour Ferry Company."],
    [f"Ticket revenue line {i}: the ferries carried commuters between the islands every day." for i in range(40)],
    ["The board approved a new electric ferry, to be delivered in the spring of next year."],
)


@pytest.fixture(scope="module")
def library(client: TestClient, worker: Any) -> str:
    name = "passages"
    for fname, data in (("manual.md", MANUAL.encode()), ("report.pdf", REPORT)):
        r = upload(client, fname, data, name)
        assert r.status_code == 202, r.text
        job = wait_for_job(client, r.json()["job_id"])
        assert job["state"] == "succeeded", job
    return name


def _search(client: TestClient, collection: str, query: str, **extra: Any) -> dict[str, Any]:
    r = client.post("/v1/search", json={"query": query, "k": 5, "collection": collection, **extra})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def test_results_carry_heading_paths(client: TestClient, library: str) -> None:
    body = _search(client, library, "how often should the boiler be descaled")
    assert body["group"] == "passage"
    top = body["results"][0]
    assert top["external_id"] == "manual.md"
    assert top["heading_path"] == ["Espresso machine manual", "Cleaning", "Descaling"]
    assert "citric acid" in top["text"]
    assert top["page_start"] is None


def test_pdf_results_carry_their_pages(client: TestClient, library: str) -> None:
    top = _search(client, library, "when will the electric ferry be delivered")["results"][0]
    assert top["external_id"] == "report.pdf"
    assert "electric ferry" in top["text"]
    assert top["page_end"] == 3
    assert top["page_start"] in (2, 3)


def test_passage_and_document_grouping(client: TestClient, library: str) -> None:
    passages = _search(client, library, "espresso machine brewing and cleaning", group="passage")["results"]
    assert len([r for r in passages if r["external_id"] == "manual.md"]) >= 2
    assert len({r["chunk_id"] for r in passages}) == len(passages)
    documents = _search(client, library, "espresso machine brewing and cleaning", group="document")
    assert documents["group"] == "document"
    ids = [r["external_id"] for r in documents["results"]]
    assert len(ids) == len(set(ids)) == 2


@pytest.mark.parametrize("group", ["chunk", "", 1, None, ["passage"]])
def test_unknown_group_is_refused(client: TestClient, library: str, group: Any) -> None:
    body: dict[str, Any] = {"query": "descaling", "collection": library, "group": group}
    r = client.post("/v1/search", json=body)
    if group is None:  # null is "the server's setting"
        assert r.status_code == 200, r.text
        return
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "invalid_request" or "detail" in r.json()


def test_answer_quotes_the_answering_sentence_with_its_section(client: TestClient, library: str) -> None:
    r = client.post("/v1/ask", json={"question": "How long does a single shot take to extract?", "collection": library})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["mode"] == "extractive"
    assert "twenty-five and thirty seconds" in body["answer"]
    assert len(body["answer"].split()) <= 60
    cited = body["citations"][0]
    assert cited["heading_path"] == ["Espresso machine manual", "Brewing"]
    assert cited["quote"]
    assert all(q in cited["text"] for q in cited["quote"].split(QUOTE_GAP))
    # Never a list fragment, code or a heading.
    assert "brew --pressure" not in body["answer"]
    assert "##" not in body["answer"]


def test_answer_from_a_pdf_cites_its_page(client: TestClient, library: str) -> None:
    r = client.post("/v1/ask", json={"question": "What did the board approve?", "collection": library})
    body = r.json()
    assert "electric ferry" in body["answer"], body
    [cited] = [c for c in body["citations"] if c["external_id"] == "report.pdf"]
    assert cited["page_end"] == 3


def test_sentence_vectors_are_stored_per_quotable_sentence(library: str, settings: Any) -> None:
    engine = create_engine(str(settings.database_url))
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("""
                SELECT substr(c.text, s.char_start + 1, s.char_end - s.char_start) AS sentence
                  FROM sentence_vectors s JOIN chunks c ON c.id = s.chunk_id
                  JOIN documents d ON d.id = c.document_id JOIN collections k ON k.id = d.collection_id
                 WHERE k.name = :n AND d.external_id = 'manual.md'
            """), {"n": library}).scalars().all()
    finally:
        engine.dispose()
    assert "Descale the boiler every two months with a citric acid solution to remove limescale." in rows
    assert "Grind the beans just before brewing." in rows
    assert not any(s.startswith(("#", "```", "brew --")) for s in rows)


def test_a_title_naming_the_asked_year_outweighs_a_body_that_repeats_it(
    client: TestClient, worker: Any, settings: Settings
) -> None:
    """Filings of one company, each reporting the years before it: the body of last year's report names the asked
    year as often as this year's does, or more. The title is a field of its own (PGSAGE_PASSAGE_TITLE_WEIGHT): the
    report whose title names the year leads when that signal is weighted."""
    name = f"titles-{uuid.uuid4().hex[:8]}"
    older = json.dumps({"_id": "acme-2018", "title": "ACME 2018 annual report",
                        "text": "ACME revenue in 2019 is expected to grow: ACME revenue in 2019 rises with 2019 "
                                "orders. Revenue in 2018 was 40 million dollars."})
    newer = json.dumps({"_id": "acme-2019", "title": "ACME 2019 annual report",
                        "text": "Sales were 52 million dollars, up from 40 million. The plant opened on "
                                "schedule."})
    r = upload(client, "filings.jsonl", f"{older}\n{newer}\n".encode(), name)
    assert wait_for_job(client, r.json()["job_id"])["state"] == "succeeded"

    def first(weight: float) -> str:
        body = {"query": "What was ACME's revenue in 2019?", "k": 2, "collection": name, "group": "passage",
                "retrieval": {"passage_title_weight": weight}}
        found = client.post("/v1/search", json=body)
        assert found.status_code == 200, found.text
        return str(found.json()["results"][0]["external_id"])

    assert first(0.0) == "acme-2018"  # the body that repeats the year wins without the title's own signal
    assert first(3.0) == "acme-2019"

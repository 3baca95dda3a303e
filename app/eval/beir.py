"""Read a BEIR-format folder: corpus.jsonl, queries.jsonl and qrels/<split>.tsv."""

from __future__ import annotations

import csv
import json
from pathlib import Path


def load_queries(folder: Path) -> dict[str, str]:
    queries = {}
    with (folder / "queries.jsonl").open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                obj = json.loads(line)
                queries[str(obj["_id"])] = str(obj["text"])
    return queries


def load_qrels(folder: Path, split: str) -> dict[str, dict[str, int]]:
    """query id -> {corpus id: grade}; the header row is skipped."""
    path = folder / "qrels" / f"{split}.tsv"
    if not path.exists():
        raise FileNotFoundError(f"no qrels for split {split!r}: {path} is missing")
    qrels: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8") as f:
        for row in csv.reader(f, delimiter="\t"):
            if len(row) < 3 or not row[2].strip().lstrip("-").isdigit():
                continue  # header or blank
            qrels.setdefault(row[0], {})[row[1]] = int(row[2])
    return qrels

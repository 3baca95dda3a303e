"""Retrieve: every SQL statement of the question path (dense chunk search over HNSW)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from psycopg.types.json import Jsonb
from sqlalchemy import text
from sqlalchemy.orm import Session

from app.models import EmbeddingModel


@dataclass
class Hit:
    chunk_id: int
    document_id: uuid.UUID
    external_id: str
    title: str | None
    text: str
    ordinal: int
    score: float
    metadata: dict[str, Any] = field(default_factory=dict)


def vector_literal(vec: np.ndarray) -> str:
    return "[" + ",".join(f"{x:.7g}" for x in vec) + "]"


def _filter_sql(filters: dict[str, Any] | None, params: dict[str, Any]) -> str:
    """Metadata filters as JSONB containment; a list value means any of its items."""
    clauses: list[str] = []
    for i, (key, value) in enumerate((filters or {}).items()):
        options = value if isinstance(value, list) else [value]
        alternatives = []
        for j, option in enumerate(options):
            params[f"f{i}_{j}"] = Jsonb({key: option})
            alternatives.append(f"d.metadata @> :f{i}_{j}")
            if isinstance(value, list) and not isinstance(option, (list, dict)):
                # A scalar in the filter list also matches a metadata array holding it.
                params[f"f{i}_{j}a"] = Jsonb({key: [option]})
                alternatives.append(f"d.metadata @> :f{i}_{j}a")
        clauses.append("(" + " OR ".join(alternatives) + ")" if alternatives else "false")
    return "".join(f" AND {c}" for c in clauses)


def dense_chunks(
    session: Session,
    space: EmbeddingModel,
    query: np.ndarray,
    collection_id: int,
    k: int,
    *,
    filters: dict[str, Any] | None,
    ef_search: int,
    max_scan_tuples: int,
) -> list[Hit]:
    """The k chunks nearest to the query in this space, through the space's HNSW index.

    The collection (and any metadata filter) is applied while the index is walked: iterative
    scans keep going until k rows pass, so filtered queries still return k rows when they exist.
    """
    dim, mid = int(space.dimension), int(space.id)
    session.execute(
        text(
            "SELECT set_config('hnsw.ef_search', :ef, true), "
            "set_config('hnsw.iterative_scan', 'relaxed_order', true), "
            "set_config('hnsw.max_scan_tuples', :mst, true)"
        ),
        {"ef": str(max(ef_search, k)), "mst": str(max_scan_tuples)},
    )
    params: dict[str, Any] = {"q": vector_literal(query), "cid": collection_id, "k": k}
    where = _filter_sql(filters, params)
    # model id and dimension are integers from our own registry: inlined so the planner can match
    # the partial expression index of this space.
    # relaxed_order lets the index return rows slightly out of order; the outer query sorts them. The
    # "+ 0" matters: Postgres 17+ knows the CTE's ORDER BY and would otherwise skip that sort.
    rows = session.execute(
        text(f"""
        WITH nearest AS MATERIALIZED (
            SELECT cv.chunk_id, cv.document_id,
                   (cv.embedding::vector({dim})) <=> CAST(:q AS vector({dim})) AS distance
              FROM chunk_vectors cv
              JOIN documents d ON d.id = cv.document_id
             WHERE cv.model_id = {mid} AND cv.collection_id = :cid{where}
             ORDER BY (cv.embedding::vector({dim})) <=> CAST(:q AS vector({dim}))
             LIMIT :k
        )
        SELECT n.chunk_id, n.document_id, d.external_id, d.title, d.metadata, c.text, c.ordinal,
               1 - n.distance AS score
          FROM nearest n
          JOIN chunks c ON c.id = n.chunk_id
          JOIN documents d ON d.id = n.document_id
         ORDER BY n.distance + 0
        """),
        params,
    ).all()
    return [
        Hit(r.chunk_id, r.document_id, r.external_id, r.title, r.text, r.ordinal, float(r.score), r.metadata or {})
        for r in rows
    ]

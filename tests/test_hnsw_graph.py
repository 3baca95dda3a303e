"""The HNSW graph's m by default (issue 14, point 3): pgvector's 16, or fewer where that packs more elements to an
index page. The page arithmetic (spaces.elements_per_page) is checked against indexes pgvector really builds, so a
change of its on-disk layout shows here rather than as a quietly larger index."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from sqlalchemy import text

from app.config import Settings
from app.db.session import make_engine
from app.reindex import spaces

DIM = 384
ROWS = 1400


def test_default_m_packs_pages() -> None:
    assert spaces.default_m("vector", DIM) == 16  # 4 float32 elements to a page whatever m in 12-16
    assert spaces.default_m("halfvec", DIM) == 13  # 8 to a page with m 13, 7 with 14-16
    assert spaces.elements_per_page("halfvec", DIM, 13) == 8
    assert spaces.elements_per_page("halfvec", DIM, 16) == 7
    assert spaces.default_m("halfvec", 1536) == 16  # m makes no difference there: pgvector's default stays
    unset = spaces.HnswGraph(ef_construction=64)
    assert "m = 13," in spaces.index_statement("chunk_vectors", 1, DIM, "halfvec", graph=unset)
    assert "m = 16," in spaces.index_statement("chunk_vectors", 1, DIM, "vector", graph=unset)
    chosen = spaces.HnswGraph(m=20, ef_construction=64)  # PGSAGE_HNSW_M set: as given, for either type
    assert "m = 20," in spaces.index_statement("chunk_vectors", 1, DIM, "halfvec", graph=chosen)
    assert spaces.HnswGraph.of(Settings(hnsw_m=24)).m == 24
    assert spaces.HnswGraph.of(Settings()).m is None


@pytest.mark.parametrize(("kind", "m"), [("halfvec", 16), ("halfvec", 13), ("vector", 16)])
def test_page_arithmetic_matches_pgvector(database_url: str, kind: str, m: int) -> None:
    table = f"hnsw_pages_{uuid.uuid4().hex[:8]}"
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((ROWS, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    engine = make_engine(Settings(database_url=database_url), pool_size=1)
    try:
        with engine.begin() as conn:
            conn.execute(text(f"CREATE TABLE {table} (id int PRIMARY KEY, embedding vector({DIM}))"))
            conn.execute(text(f"INSERT INTO {table} VALUES (:i, CAST(:v AS vector({DIM})))"),
                         [{"i": i, "v": "[" + ",".join(f"{x:.6f}" for x in v) + "]"} for i, v in enumerate(vectors)])
            conn.execute(text(f"CREATE INDEX {table}_ix ON {table} USING hnsw ((embedding::{kind}({DIM})) "
                              f"{kind}_cosine_ops) WITH (m = {m}, ef_construction = 32)"))
            pages = conn.execute(text(f"SELECT pg_relation_size('{table}_ix') / 8192")).scalar_one()
    finally:
        with engine.begin() as conn:
            conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
        engine.dispose()
    packed = ROWS / spaces.elements_per_page(kind, DIM, m)
    # The bottom layer packs as computed; the few elements of upper layers (1 in m) carry longer neighbour
    # tuples, which can cost a page its last element: at most one page in ten more, plus the meta page.
    assert packed <= pages - 1 <= packed * 1.1, (kind, m, pages, packed)

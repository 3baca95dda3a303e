"""Retrieve: every SQL statement of the question path: dense (HNSW over chunks), lexical (BM25), signals."""

from __future__ import annotations

import math
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from psycopg.types.json import Jsonb
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from app.db.session import HNSW_DEFAULTS
from app.errors import NotFound, Unavailable
from app.ingest.store import check_collection_name
from app.models import Collection, EmbeddingModel


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
    # Cosine similarity of the chunk to the query (the score of a dense hit); answers use it to
    # decide whether anything relevant was found, whatever the ranking mode.
    similarity: float | None = None
    rerank_score: float | None = None
    heading_path: list[str] = field(default_factory=list)
    page_start: int | None = None
    page_end: int | None = None
    # Passage search: the cosine similarity of the chunk's sentence closest to the query.
    sentence_similarity: float | None = None

    @property
    def relevance(self) -> float:
        """How close the passage, or one sentence of it, comes to the query (cosine)."""
        return max(self.similarity or 0.0, self.sentence_similarity or -1.0)

    def __post_init__(self) -> None:
        if self.similarity is None:
            self.similarity = self.score


def collection_and_space(session: Session, collection: str, *, plan_once: bool = False) -> tuple[int, EmbeddingModel]:
    """One statement: the collection's id (404 when it does not exist) and the active embedding space
    (503 while there is none), read in the request's transaction so a response comes from one space.

    With plan_once, the rest of the transaction plans each statement once per connection (a generic plan;
    psycopg prepares a statement on its fifth run): the question path's statements keep one shape and
    their LIMITs are literals, so a generic plan still knows how few rows they want, and planning the
    passage ranking anew took a fifth of its time. Not for metadata filters: how many rows a filter
    keeps decides between walking the HNSW index and an exact scan, which only a plan made for the
    filter's value can weigh."""
    check_collection_name(collection)
    row = session.execute(
        select(Collection.id, EmbeddingModel,
               func.set_config("plan_cache_mode", "force_generic_plan" if plan_once else "auto", True))
        .select_from(Collection)
        .outerjoin(EmbeddingModel, EmbeddingModel.status == "active")
        .where(Collection.name == collection)
    ).first()
    if row is None:
        raise NotFound(f"collection {collection!r} does not exist")
    if row[1] is None:
        raise Unavailable("no embedding model is active yet; the service is still starting")
    return int(row[0]), row[1]


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


# A metadata filter that leaves at most this many documents in the collection is searched exactly over them: the
# dense leg ranks their chunks' vectors by exact cosine instead of walking the HNSW graph past what it rejects
# (whose work grows as the filter narrows, and stops at hnsw.max_scan_tuples), and the lexical leg matches its
# scored passages against their chunks in one hash join instead of reading each passage's document. Measured
# at 100,000 chunks with a 5% filter (2,500 documents; BENCHMARKS.md, scale): the same results, 15 ms against
# 77 ms for the 100 nearest, equal times for a search once the pages are cached, and a third of the time before.
EXACT_FILTER_DOCUMENTS = 5000


def _filtered_documents(where: str) -> str:
    """The documents a filter keeps, at most EXACT_FILTER_DOCUMENTS + 1 (more means: too many for exact)."""
    return (f"filtered AS MATERIALIZED (SELECT d.id FROM documents d WHERE d.collection_id = :cid{where} "
            f"LIMIT {EXACT_FILTER_DOCUMENTS + 1})")


def _few() -> str:
    """True in SQL when the filter keeps few enough documents for the exact branch."""
    return f"(SELECT count(*) FROM filtered) <= {int(EXACT_FILTER_DOCUMENTS)}"


def _hnsw_settings(session: Session, ef_search: int, k: int, max_scan_tuples: int) -> None:
    """Set the HNSW search knobs for this transaction, unless the connection already has them (it opens
    with the configured ones: app.db.session)."""
    ef = max(ef_search, k)
    if session.connection().info.get(HNSW_DEFAULTS) == (ef, max_scan_tuples):
        return
    session.execute(
        text(
            "SELECT set_config('hnsw.ef_search', :ef, true), "
            "set_config('hnsw.iterative_scan', 'relaxed_order', true), "
            "set_config('hnsw.max_scan_tuples', :mst, true)"
        ),
        {"ef": str(ef), "mst": str(max_scan_tuples)},
    )


def _index_order(space: EmbeddingModel, alias: str, query: str) -> str:
    """The ORDER BY of a walk of the space's HNSW index: its expression, to the letter (the planner matches the
    partial expression index by it), in the index's vector type. Distances shown come from the float32 vectors."""
    kind, dim = space.index_type, int(space.dimension)
    return f"({alias}.embedding::{kind}({dim})) <=> CAST({query} AS {kind}({dim}))"


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
    _hnsw_settings(session, ef_search, k, max_scan_tuples)
    params: dict[str, Any] = {"q": vector_literal(query), "cid": collection_id}
    order = _index_order(space, "cv", ":q")
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
             ORDER BY {order}
             LIMIT {int(k)}
        )
        SELECT n.chunk_id, n.document_id, d.external_id, d.title, d.metadata, c.text, c.ordinal,
               c.heading_path, c.page_start, c.page_end, 1 - n.distance AS score
          FROM nearest n
          JOIN chunks c ON c.id = n.chunk_id
          JOIN documents d ON d.id = n.document_id
         ORDER BY n.distance + 0
        """),
        params,
    ).all()
    return [
        Hit(r.chunk_id, r.document_id, r.external_id, r.title, r.text, r.ordinal, float(r.score), r.metadata or {},
            heading_path=list(r.heading_path or []), page_start=r.page_start, page_end=r.page_end)
        for r in rows
    ]


# --- lexical leg: BM25 over lexical_postings -----------------------------------------------------

# Postgres's English analyser (stop-words, Snowball stems): the same one the store indexes with.
TEXT_SEARCH_CONFIG = "pg_catalog.english"
# A word that joins letters and a number ("FY2017", "COVID19", "Win11") is one lexeme to that analyser, which a
# text writing "fiscal 2017" or "2017" never matches.
_JOINED = re.compile(r"\b(?:([^\W\d_]{2,})(\d{2,})|(\d{2,})([^\W\d_]{2,}))\b")


def lexical_query(query: str) -> str:
    """The query the lexical legs analyse: the question, plus the parts of each word that joins letters and a
    number, the whole word kept (as search engines' word-delimiter filters do): "FY2017" also searches "FY" and
    "2017"."""
    parts = [" ".join(p for p in m.groups() if p) for m in _JOINED.finditer(query)]
    return f"{query} {' '.join(parts)}" if parts else query


def _size(scope: str) -> str:
    """A scope's item count n (items with terms) and average length avgdl, as maintained with the postings
    (migration 0008): its base row plus the deltas not yet compacted. Scope '' is the collection's documents,
    a chunker's name its chunk set."""
    return (f"SELECT greatest(sum(n), 0)::float8 AS n, greatest(sum(total)::float8 / nullif(sum(n), 0), 1) AS avgdl "
            f"FROM (SELECT n, total FROM lexical_size WHERE collection_id = :cid AND scope = {scope} UNION ALL "
            f"SELECT n, total FROM lexical_size_deltas WHERE collection_id = :cid AND scope = {scope}) x")


def _df(scope: str, term: str) -> str:
    """A term's document frequency in the scope, as maintained with the postings (base row plus deltas)."""
    return (f"(SELECT coalesce(sum(v), 0) FROM (SELECT df AS v FROM lexical_df WHERE collection_id = :cid "
            f"AND scope = {scope} AND term = {term} UNION ALL SELECT delta FROM lexical_df_deltas "
            f"WHERE collection_id = :cid AND scope = {scope} AND term = {term}) x)")


_DOCUMENT_STATS = _size("''")


def _idf(df: str) -> str:
    """Lucene's BM25 IDF of a term with document frequency df, for statistics s (n documents or passages)."""
    return f"ln(1 + (s.n - {df} + 0.5) / ({df} + 0.5))"


def _bm25(length: str) -> str:
    """BM25's sum over matched terms, for postings p (tf, length column), term IDFs i and statistics s."""
    return f"sum(i.idf * p.tf * (:k1 + 1) / (p.tf + :k1 * (1 - :b + :b * p.{length} / s.avgdl)))"


def lexical_documents(
    session: Session,
    query: str,
    collection_id: int,
    n: int,
    *,
    k1: float,
    b: float,
    filters: dict[str, Any] | None = None,
    within: list[uuid.UUID] | None = None,
) -> list[tuple[uuid.UUID, float]]:
    """The n best documents by BM25 (Lucene's IDF), best first; `within` scores only those documents.

    IDF and the average length are maintained with the postings, so they follow every document that
    arrives or leaves, and no query scans for them.
    """
    params: dict[str, Any] = {"q": lexical_query(query), "cid": collection_id, "k1": k1, "b": b}
    where = _filter_sql(filters, params)
    join = " JOIN documents d ON d.id = p.document_id" if where else ""
    if within is not None:
        params["ids"] = within
        where += " AND p.document_id = ANY(:ids)"
    rows = session.execute(
        text(f"""
        WITH q AS (
            SELECT DISTINCT lexeme AS term FROM unnest(to_tsvector('{TEXT_SEARCH_CONFIG}', :q))
        ), stats AS (
            {_DOCUMENT_STATS}
        ), idf AS (
            SELECT q.term, {_idf(_df("''", "q.term"))} AS idf FROM q CROSS JOIN stats s
        )
        SELECT p.document_id,
               {_bm25('doc_length')} AS score
          FROM lexical_postings p
          JOIN idf i ON i.term = p.term
         CROSS JOIN stats s{join}
         WHERE p.collection_id = :cid{where}
         GROUP BY p.document_id
         ORDER BY score DESC, p.document_id
         LIMIT {int(n)}
        """),
        params,
    ).all()
    return [(r.document_id, float(r.score)) for r in rows]


@dataclass
class LexicalLeg:
    """The lexical leg of a passage ranking: the n best passages by BM25 (with their scores), and what it takes
    to score any other passage or document the same way (each query term's IDF and the average lengths)."""

    chunks: list[int] = field(default_factory=list)
    documents: list[uuid.UUID] = field(default_factory=list)  # each chunk's document
    scores: list[float] = field(default_factory=list)  # each chunk's BM25
    idf: dict[str, float] = field(default_factory=dict)
    avg_length: float = 1.0
    document_idf: dict[str, float] = field(default_factory=dict)
    document_avg_length: float = 1.0
    cut: list[str] = field(default_factory=list)  # terms of which only the best `depth` postings were read
    postings: float = 0.0  # the query terms' postings among the passages (the sum of their frequencies)
    document_postings: float = 0.0  # ... and among the documents


# A posting's BM25 term weight at k1 0.9, b 0.4 and a reference length of 100 terms: the order of the index
# ix_chunk_postings_impact (migration 0009; the expression must stay the same), each term's best postings first.
IMPACT = "(tf::float8 / (tf + 0.54 + 0.36 * chunk_length / 100.0))"


def _scored_all() -> str:
    """Every passage holding a query term, with its BM25: every posting of every query term is read."""
    return f"""scored AS (
            SELECT p.chunk_id, {_bm25('chunk_length')} AS score
              FROM chunk_postings p JOIN idf i ON i.term = p.term CROSS JOIN stats s
             WHERE p.collection_id = :cid AND p.chunker = :ck
             GROUP BY p.chunk_id
        ), cut AS (SELECT NULL::text AS term WHERE false)"""


def _scored_best(complete: int) -> str:
    """The passages met in each query term's :depth best postings (IMPACT order), the `complete` most promising
    of them, each with its exact BM25.

    A term whose list was cut (it has more postings than were read) gives a passage not met in its list at
    most its cap, the weight of the last posting read; a passage's promise is what its postings give plus the
    caps of the cut terms it was not met in (so a passage holding a rare term is not crowded out by passages
    that are only in common terms' lists). The kept passages are completed by one index probe per cut term. A
    passage met in no term's best postings is not found; what that loses is measured
    (benchmarks/lexical_depth.py)."""
    return f"""lists AS MATERIALIZED (
            SELECT i.term, p.chunk_id,
                   i.idf * p.tf * (:k1 + 1) / (p.tf + :k1 * (1 - :b + :b * p.chunk_length / s.avgdl)) AS weight
              FROM idf i CROSS JOIN stats s CROSS JOIN LATERAL (
                   SELECT chunk_id, tf, chunk_length FROM chunk_postings
                    WHERE collection_id = :cid AND chunker = :ck AND term = i.term
                    ORDER BY {IMPACT} DESC LIMIT :depth) p
        ), cut AS MATERIALIZED (
            SELECT term, min(weight) AS cap FROM lists GROUP BY term HAVING count(*) >= :depth
        ), known AS MATERIALIZED (
            SELECT l.chunk_id, coalesce(sum(l.weight) FILTER (WHERE c.term IS NULL), 0) AS whole
              FROM lists l LEFT JOIN cut c ON c.term = l.term
             GROUP BY l.chunk_id
             ORDER BY sum(l.weight) + (SELECT coalesce(sum(cap), 0) FROM cut) - coalesce(sum(c.cap), 0) DESC,
                      l.chunk_id
             LIMIT {int(complete)}
        ), scored AS (
            SELECT k.chunk_id, k.whole + coalesce((
                   SELECT sum(i.idf * p.tf * (:k1 + 1) / (p.tf + :k1 * (1 - :b + :b * p.chunk_length / s.avgdl)))
                     FROM cut c JOIN idf i ON i.term = c.term CROSS JOIN LATERAL (
                          SELECT tf, chunk_length FROM chunk_postings p
                           WHERE p.collection_id = :cid AND p.chunker = :ck AND p.term = c.term
                             AND p.chunk_id = k.chunk_id
                          OFFSET 0) p), 0) AS score
              FROM known k CROSS JOIN stats s
        )"""


def passage_lexical(
    session: Session, query: str, collection_id: int, chunker: str, n: int, *, k1: float, b: float,
    filters: dict[str, Any] | None = None, documents: bool = True, depth: int = 0,
) -> LexicalLeg:
    """One statement: the n best passages of the chunk set by BM25 over their heading path and text, each query
    term's IDF among the passages and (with `documents`) among the documents, and the average lengths.

    It needs no query vector, so it runs while the query is embedded. Statistics are the chunk set's own
    and the collection's documents', maintained with the postings (no scan per query).

    With `depth` (and no filters), each query term's best `depth` postings are read (IMPACT order), not all
    of them, so the cost follows the question, not the collection; the passages kept get their exact BM25.
    A term with no more postings than that is read whole, so a collection where no term has more is scored
    exactly. depth 0 reads every posting.
    """
    params: dict[str, Any] = {"q": lexical_query(query), "cid": collection_id, "ck": chunker, "k1": k1, "b": b,
                              "depth": depth}
    where = _filter_sql(filters, params)
    if where:
        # Few documents pass the filter: the scored passages are matched against their chunks (one hash join).
        # Many: each scored passage's document is read for the filter, before the limit.
        top = f"""
            (SELECT sc.chunk_id, a.document_id, sc.score
               FROM scored sc JOIN allowed a ON a.chunk_id = sc.chunk_id
              WHERE {_few()}
              ORDER BY sc.score DESC, sc.chunk_id
              LIMIT {int(n)})
            UNION ALL
            (SELECT sc.chunk_id, c.document_id, sc.score
               FROM scored sc JOIN chunks c ON c.id = sc.chunk_id JOIN documents d ON d.id = c.document_id
              WHERE NOT {_few()}{where}
              ORDER BY sc.score DESC, sc.chunk_id
              LIMIT {int(n)})"""
    else:  # only the n best need their document: a join before the limit read every matching chunk's row
        top = f"""
            SELECT b.chunk_id, c.document_id, b.score
              FROM (SELECT chunk_id, score FROM scored ORDER BY score DESC, chunk_id LIMIT {int(n)}) b
              JOIN chunks c ON c.id = b.chunk_id
             ORDER BY b.score DESC, b.chunk_id"""
    # The chunks of the documents the filter keeps, each document's read through its index (LATERAL, and OFFSET 0 so
    # the planner keeps it so: joined flat, it hashed the CTE and read the whole chunks table).
    few = "" if not where else f""", {_filtered_documents(where)}, allowed AS MATERIALIZED (
            SELECT c.id AS chunk_id, c.document_id
              FROM filtered f CROSS JOIN LATERAL (
                   SELECT c.id, c.document_id FROM chunks c WHERE c.document_id = f.id AND c.chunker = :ck
                   OFFSET 0) c
             WHERE {_few()}
        )"""
    scored = _scored_best(2 * n) if depth and not where else _scored_all()
    document_ctes = f""", dstats AS ({_DOCUMENT_STATS}), didf AS (
            SELECT t.term, d.df, {_idf("d.df")} AS idf
              FROM terms t CROSS JOIN dstats s CROSS JOIN LATERAL (SELECT {_df("''", "t.term")} AS df) d
        )""" if documents else ""
    document_rows = """
        UNION ALL
        SELECT 'd', NULL, NULL, term, idf FROM didf
        UNION ALL
        SELECT 'G', NULL, NULL, NULL, sum(df) FROM didf
        UNION ALL
        SELECT 'D', NULL, NULL, NULL, avgdl FROM dstats""" if documents else ""
    rows = session.execute(
        text(f"""
        WITH terms AS (
            SELECT DISTINCT lexeme AS term FROM unnest(to_tsvector('{TEXT_SEARCH_CONFIG}', :q))
        ), stats AS (
            {_size(":ck")}
        ), idf AS MATERIALIZED (
            SELECT t.term, d.df, {_idf("d.df")} AS idf
              FROM terms t CROSS JOIN stats s CROSS JOIN LATERAL (SELECT {_df(":ck", "t.term")} AS df) d
        ), {scored}{few}, top AS ({top}
        ){document_ctes}
        SELECT 'c' AS kind, chunk_id, document_id, NULL AS term, score AS value FROM top
        UNION ALL
        SELECT 'i', NULL, NULL, term, idf FROM idf
        UNION ALL
        SELECT 'F', NULL, NULL, NULL, sum(df) FROM idf
        UNION ALL
        SELECT 'x', NULL, NULL, term, NULL FROM cut
        UNION ALL
        SELECT 'C', NULL, NULL, NULL, avgdl FROM stats{document_rows}
        """),
        params,
    ).all()
    out = LexicalLeg()
    for kind, chunk_id, document_id, term, value in rows:
        if kind == "c":
            out.chunks.append(chunk_id)
            out.documents.append(document_id)
            out.scores.append(value)
        elif kind == "i":
            out.idf[term] = value
        elif kind == "x":
            out.cut.append(term)
        elif kind == "d":
            out.document_idf[term] = value
        elif kind == "C":
            out.avg_length = value
        elif kind == "F":
            out.postings = float(value or 0)
        elif kind == "G":
            out.document_postings = float(value or 0)
        else:
            out.document_avg_length = value
    return out


@dataclass(frozen=True)
class PassageFusion:
    """How a passage ranking scores its candidates (see passage_ranking)."""

    mode: str  # hybrid, dense or lexical
    dense_weight: float
    document_weight: float
    sentence_weight: float
    title_weight: float = 0.0

    @property
    def documents(self) -> bool:
        return self.mode == "hybrid" and self.document_weight > 0

    @property
    def sentences(self) -> bool:
        return self.mode == "hybrid" and self.sentence_weight > 0

    @property
    def titles(self) -> bool:
        return self.mode == "hybrid" and self.title_weight > 0


def _idf_table(name: str, idf: dict[str, float], params: dict[str, Any]) -> str:
    """A CTE of (term, idf) rows from the given IDFs, bound as two arrays."""
    params[f"{name}_t"], params[f"{name}_v"] = list(idf), list(idf.values())
    return f"{name} AS (SELECT * FROM unnest(CAST(:{name}_t AS text[]), CAST(:{name}_v AS float8[])) AS x(term, idf))"


def _z(column: str) -> str:
    """The column standardised over the candidates (statistics z); a missing value counts as the lowest one,
    and a column with no value at all is 0 everywhere."""
    return (f"coalesce((coalesce(s.{column}, z.{column}_lo) - z.{column}_m) / z.{column}_s, 0)")


def _z_stats(column: str) -> str:
    return (f"avg({column}) AS {column}_m, coalesce(nullif(stddev_pop({column}), 0), 1) AS {column}_s, "
            f"min({column}) AS {column}_lo")


# One index probe costs about as much as this many postings read in order along a term's range.
PROBE_COST = 10


def _probing(items: int, terms: int, postings: float) -> bool:
    """Whether probing each of `items` for each query term beats reading the terms' `postings` whole."""
    return items * terms * PROBE_COST < postings


def _postings_of(table: str, key: str, length: str, scope: str, idf: str, items: str, probe: bool) -> str:
    """FROM items of the query terms' postings (p: tf and `length`) of the `items` (x.id) in `table`, with the
    terms' IDF (i): one primary-key probe per item and term, or each term's postings read whole and kept for the
    items. LATERAL with OFFSET 0 holds the plan: left to choose, the planner read every posting of each item."""
    if probe:
        return f"""(SELECT DISTINCT {key} AS id FROM ({items}) y) x CROSS JOIN {idf} i CROSS JOIN LATERAL (
                   SELECT p.tf, p.{length} FROM {table} p
                    WHERE p.collection_id = :cid AND {scope}p.term = i.term AND p.{key} = x.id
                   OFFSET 0) p"""
    return f"""{idf} i CROSS JOIN LATERAL (
                   SELECT p.{key} AS id, p.tf, p.{length} FROM {table} p
                    WHERE p.collection_id = :cid AND {scope}p.term = i.term
                   OFFSET 0) p CROSS JOIN LATERAL (SELECT p.id) x
             WHERE p.id IN ({items})"""


def passage_ranking(
    session: Session,
    space: EmbeddingModel,
    vector: np.ndarray,
    collection_id: int,
    chunker: str,
    n: int,
    lexical: LexicalLeg | None,
    fusion: PassageFusion,
    top: int,
    *,
    filters: dict[str, Any] | None,
    ef_search: int,
    max_scan_tuples: int,
    k1: float,
    b: float,
) -> list[Hit]:
    """One statement: the `top` best passages, with their texts.

    The candidates are the dense leg's n chunks nearest the query vector (through the space's HNSW index)
    and the lexical leg's passages. Every candidate gets each signal exactly: its cosine, its BM25 (from the
    lexical leg's IDF and average length: 0 without a query term), its best sentence's cosine, and its
    document's single-vector cosine and BM25 (the last three in hybrid mode, when weighted).

    hybrid: z(cosine) and z(BM25) weighted by dense_weight, plus document_weight times the same blend of the
    document's signals, plus sentence_weight times z(best sentence's cosine), each standardised over the
    candidates: a passage of the document the question is about ranks above a look-alike elsewhere, and one
    sentence that says what was asked counts more than the same words spread over a paragraph.
    dense and lexical rank by that leg's raw chunk score alone. Ties go to the lower chunk id.
    """
    dim, mid = int(space.dimension), int(space.id)
    dense = fusion.mode != "lexical"
    if dense:
        _hnsw_settings(session, ef_search, n, max_scan_tuples)
    params: dict[str, Any] = {"v": vector, "cid": collection_id, "ck": chunker,
                              "lc": lexical.chunks if lexical else [], "ld": lexical.documents if lexical else [],
                              "k1": k1, "b": b, "wd": fusion.dense_weight, "wdoc": fusion.document_weight,
                              "ws": fusion.sentence_weight, "wt": fusion.title_weight}
    where = _filter_sql(filters, params)
    distance = f"(cv.embedding::vector({dim})) <=> CAST(:v AS vector({dim}))"
    order = _index_order(space, "cv", ":v")
    ctes = [f"qv AS (SELECT CAST(:v AS vector({dim})) AS v)"]
    # The lexical leg's passages (filtered there) that the dense leg did not find get their cosine one by one.
    # A lexical hit without a vector in this space (written before it could be, or in the gap a rollback
    # leaves) is kept, with no similarity, rather than dropped.
    legs = [f"""SELECT l.chunk_id, l.document_id,
               (SELECT 1 - ((cv.embedding::vector({dim})) <=> qv.v) FROM chunk_vectors cv
                 WHERE cv.chunk_id = l.chunk_id AND cv.model_id = {mid}) AS sim
          FROM unnest(CAST(:lc AS bigint[]), CAST(:ld AS uuid[])) AS l(chunk_id, document_id) CROSS JOIN qv"""]
    if dense and where:
        # Few documents pass the filter: exact cosine over their chunks. Many: the HNSW walk, filtering as it
        # goes. Only the branch whose condition holds runs (each is a one-time filter on the count).
        ctes.append(_filtered_documents(where))
        ctes.append(f"""dense AS MATERIALIZED (
            (SELECT cv.chunk_id, cv.document_id, 1 - ({distance}) AS sim
               FROM filtered f CROSS JOIN LATERAL (
                    SELECT cv.chunk_id, cv.document_id, cv.embedding FROM chunk_vectors cv
                     WHERE cv.model_id = {mid} AND cv.document_id = f.id OFFSET 0) cv
              WHERE {_few()}
              ORDER BY sim DESC, cv.chunk_id
              LIMIT {min(int(n), 1000)})
            UNION ALL
            (SELECT cv.chunk_id, cv.document_id, 1 - ({distance}) AS sim
               FROM chunk_vectors cv JOIN documents d ON d.id = cv.document_id
              WHERE NOT {_few()} AND cv.model_id = {mid} AND cv.collection_id = :cid{where}
              ORDER BY {order}
              LIMIT {min(int(n), 1000)}))""")
    elif dense:
        # The query vector is the parameter itself here, so the planner can match the space's HNSW index.
        ctes.append(f"""dense AS MATERIALIZED (
            SELECT cv.chunk_id, cv.document_id, 1 - ({distance}) AS sim
              FROM chunk_vectors cv
             WHERE cv.model_id = {mid} AND cv.collection_id = :cid
             ORDER BY {order}
             LIMIT {min(int(n), 1000)})""")
    if dense:
        legs[0] += " WHERE l.chunk_id NOT IN (SELECT chunk_id FROM dense)"
        legs.append("SELECT chunk_id, document_id, sim FROM dense")
    best_sentence = (f"""(SELECT max(1 - ((sv.embedding::vector({dim})) <=> qv.v)) FROM sentence_vectors sv
                           WHERE sv.chunk_id = p.chunk_id AND sv.model_id = {mid})""" if fusion.sentences
                     else "NULL::float8")
    ctes.append(f"""candidates AS MATERIALIZED (
        SELECT p.chunk_id, p.document_id, p.sim, {best_sentence} AS sentence
          FROM ({" UNION ALL ".join(legs)}) p CROSS JOIN qv)""")
    # Each candidate document's single-vector cosine, once per document.
    whole = (f"""(SELECT 1 - ((dv.embedding::vector({dim})) <=> qv.v) FROM document_vectors dv
                   WHERE dv.document_id = x.document_id AND dv.model_id = {mid})""" if fusion.documents
             else "NULL::float8")
    ctes.append(f"""whole AS MATERIALIZED (SELECT x.document_id, {whole} AS sim
                                FROM (SELECT DISTINCT document_id FROM candidates) x CROSS JOIN qv)""")
    chunk_bm25 = document_bm25 = title_match = "0::float8"
    joins = ""
    if lexical is not None:
        params["avgdl"] = lexical.avg_length
        params["ls"] = lexical.scores
        ctes.append(_idf_table("idf", lexical.idf, params))
        # The lexical leg's passages come with their BM25; the dense leg's others are scored here.
        # The lexical leg's passages come with their BM25; the dense leg's others are scored here, by the
        # cheaper of two plans (the planner, left to choose, read every posting of each candidate document).
        chunk_probes = _probing(n, len(lexical.idf), lexical.postings)
        others = "SELECT chunk_id FROM candidates WHERE chunk_id <> ALL(CAST(:lc AS bigint[]))"
        ctes.append(f"""bm AS (
            SELECT l.chunk_id, l.score FROM unnest(CAST(:lc AS bigint[]), CAST(:ls AS float8[])) AS l(chunk_id, score)
            UNION ALL
            SELECT x.id, {_bm25('chunk_length')} AS score
              FROM (SELECT :avgdl AS avgdl) s
             CROSS JOIN {_postings_of("chunk_postings", "chunk_id", "chunk_length", "p.chunker = :ck AND ",
                                      "idf", others, chunk_probes)}
             GROUP BY x.id)""")
        chunk_bm25, joins = "coalesce(bm.score, 0)", " LEFT JOIN bm ON bm.chunk_id = c.chunk_id"
        if fusion.documents:
            params["davgdl"] = lexical.document_avg_length
            ctes.append(_idf_table("didf", lexical.document_idf, params))
            document_probes = _probing(2 * n, len(lexical.document_idf), lexical.document_postings)
            ctes.append(f"""docs AS (
                SELECT x.id AS document_id, {_bm25('doc_length')} AS score
                  FROM (SELECT :davgdl AS avgdl) s
                 CROSS JOIN {_postings_of("lexical_postings", "document_id", "doc_length", "", "didf",
                                          "SELECT document_id FROM candidates", document_probes)}
                 GROUP BY x.id)""")
            document_bm25 = "coalesce(dd.score, 0)"
            joins += " LEFT JOIN docs dd ON dd.document_id = c.document_id"
        if fusion.titles:
            # The title as a field of its own (as BM25F weighs one): the IDF of the question's terms it holds. In
            # a long document's text a name or a year in its title is one occurrence among thousands.
            if "didf_t" not in params:
                ctes.append(_idf_table("didf", lexical.document_idf, params))
            ctes.append("""titles AS (
                SELECT x.document_id, (SELECT sum(i.idf) FROM didf i WHERE i.term = ANY(d.title_terms)) AS score
                  FROM (SELECT DISTINCT document_id FROM candidates) x
                 CROSS JOIN LATERAL (SELECT title_terms FROM documents WHERE id = x.document_id OFFSET 0) d)""")
            title_match = "coalesce(tt.score, 0)"
            joins += " LEFT JOIN titles tt ON tt.document_id = c.document_id"
    ctes.append(f"""signals AS MATERIALIZED (
        SELECT c.chunk_id, c.document_id, c.sim, c.sentence, coalesce(c.sentence, c.sim) AS best,
               w.sim AS document, {chunk_bm25} AS lexical, {document_bm25} AS document_lexical,
               {title_match} AS title
          FROM candidates c JOIN whole w ON w.document_id = c.document_id{joins})""")
    if fusion.mode == "hybrid":
        ctes.append(f"""z AS (SELECT {_z_stats('sim')}, {_z_stats('lexical')}, {_z_stats('document')},
                                     {_z_stats('document_lexical')}, {_z_stats('best')}, {_z_stats('title')}
                              FROM signals)""")
        score = (f":wd * {_z('sim')} + (1 - :wd) * {_z('lexical')}"
                 + (f" + :wdoc * (:wd * {_z('document')} + (1 - :wd) * {_z('document_lexical')})"
                    if fusion.documents else "")
                 + (f" + :ws * {_z('best')}" if fusion.sentences else "")
                 + (f" + :wt * {_z('title')}" if fusion.titles and lexical is not None else ""))
        scored = f"SELECT s.*, {score} AS score FROM signals s CROSS JOIN z"
    else:
        scored = f"SELECT s.*, s.{'sim' if dense else 'lexical'} AS score FROM signals s"
    rows = session.execute(
        text(f"""
        WITH {", ".join(ctes)}, ranked AS ({scored} ORDER BY score DESC NULLS LAST, chunk_id LIMIT {int(top)})
        SELECT r.chunk_id, r.document_id, coalesce(r.score, '-Infinity'), r.sim, r.sentence, ch.text, ch.ordinal,
               d.external_id, d.title, d.metadata, ch.heading_path, ch.page_start, ch.page_end
          FROM ranked r JOIN chunks ch ON ch.id = r.chunk_id JOIN documents d ON d.id = ch.document_id
         ORDER BY r.score DESC NULLS LAST, r.chunk_id
        """),
        params,
    ).all()
    # Unpacked by position: named access to a row's columns costs more than the rest of this loop.
    # A chunk without a vector in the space has no similarity to show; 0 is "no evidence".
    return [Hit(chunk_id, document_id, external_id, title, body, ordinal, score, metadata or {},
                0.0 if sim is None else sim, heading_path=list(heading_path or []), page_start=page_start,
                page_end=page_end, sentence_similarity=sentence)
            for (chunk_id, document_id, score, sim, sentence, body, ordinal, external_id, title, metadata,
                 heading_path, page_start, page_end) in rows]


@dataclass(frozen=True)
class SentenceScore:
    """One quotable sentence of a passage: its span in the chunk's text, and how well it matches the question."""

    chunk_id: int
    ordinal: int
    start: int
    end: int
    similarity: float  # cosine similarity of its vector to the question's
    overlap: float  # summed IDF of the question's terms that occur in it


def sentence_scores(
    session: Session, space: EmbeddingModel, query: np.ndarray, idf: dict[str, float], chunks: list[int]
) -> list[SentenceScore]:
    """Every quotable sentence of these chunks, with its cosine to the query vector and the summed
    IDF of the question's terms it holds (the IDF the passage ranking computed)."""
    if not chunks:
        return []
    dim, mid = int(space.dimension), int(space.id)
    terms = list(idf)
    rows = session.execute(
        text(f"""
        WITH q AS (SELECT CAST(:q AS vector({dim})) AS v),
             idf AS (SELECT * FROM unnest(CAST(:terms AS text[]), CAST(:idfs AS float8[])) AS t(term, idf))
        SELECT sv.chunk_id, sv.ordinal, sv.char_start, sv.char_end,
               1 - ((sv.embedding::vector({dim})) <=> q.v) AS sim,
               coalesce((SELECT sum(i.idf)
                           FROM unnest(tsvector_to_array(to_tsvector('{TEXT_SEARCH_CONFIG}',
                                substr(c.text, sv.char_start + 1, sv.char_end - sv.char_start)))) AS w(term)
                           JOIN idf i ON i.term = w.term), 0) AS overlap
          FROM sentence_vectors sv JOIN chunks c ON c.id = sv.chunk_id CROSS JOIN q
         WHERE sv.model_id = {mid} AND sv.chunk_id = ANY(:ids)
         ORDER BY sv.chunk_id, sv.ordinal
        """),
        {"q": query, "terms": terms, "idfs": [idf[t] for t in terms], "ids": chunks},
    ).all()
    return [SentenceScore(int(r.chunk_id), int(r.ordinal), int(r.char_start), int(r.char_end), float(r.sim),
                          float(r.overlap)) for r in rows]


# --- dense signals of candidate documents ---------------------------------------------------------


@dataclass
class DenseSignals:
    """A document's exact similarities to the query: its chunks' and its single vector's."""

    chunk_ids: list[int] = field(default_factory=list)
    chunk_sims: list[float] = field(default_factory=list)
    document_sim: float | None = None

    @property
    def best(self) -> tuple[int | None, float]:
        if not self.chunk_sims:
            return None, float("-inf")
        i = max(range(len(self.chunk_sims)), key=self.chunk_sims.__getitem__)
        return self.chunk_ids[i], self.chunk_sims[i]


def dense_signals(
    session: Session, space: EmbeddingModel, query: np.ndarray, documents: list[uuid.UUID], chunker: str
) -> dict[uuid.UUID, DenseSignals]:
    """Exact cosine similarity of the query to every chunk of the space's chunk set and to the single vector
    of each document. A chunk without a vector in this space is listed with -inf (a lexical hit written
    before its vectors, or in the gap a rollback leaves, is still a candidate)."""
    if not documents:
        return {}
    dim, mid = int(space.dimension), int(space.id)
    rows = session.execute(
        text(f"""
        SELECT c.document_id, c.id AS chunk_id,
               1 - ((cv.embedding::vector({dim})) <=> CAST(:q AS vector({dim}))) AS sim
          FROM chunks c LEFT JOIN chunk_vectors cv ON cv.chunk_id = c.id AND cv.model_id = {mid}
         WHERE c.document_id = ANY(:ids) AND c.chunker = :ck
        UNION ALL
        SELECT dv.document_id, NULL, 1 - ((dv.embedding::vector({dim})) <=> CAST(:q AS vector({dim})))
          FROM document_vectors dv
         WHERE dv.model_id = {mid} AND dv.document_id = ANY(:ids)
        """),
        {"q": query, "ids": documents, "ck": chunker},
    ).all()
    out: dict[uuid.UUID, DenseSignals] = {}
    for r in rows:
        sig = out.setdefault(r.document_id, DenseSignals())
        if r.chunk_id is None:
            sig.document_sim = float(r.sim)
        else:
            sig.chunk_ids.append(int(r.chunk_id))
            sig.chunk_sims.append(float("-inf") if r.sim is None else float(r.sim))
    return out


def chunk_hits(session: Session, picks: list[tuple[int, float, float]]) -> list[Hit]:
    """Hits for (chunk id, score, similarity) picks, in the order given."""
    if not picks:
        return []
    rows = session.execute(
        text("""
        SELECT c.id, c.document_id, c.text, c.ordinal, d.external_id, d.title, d.metadata,
               c.heading_path, c.page_start, c.page_end
          FROM chunks c JOIN documents d ON d.id = c.document_id
         WHERE c.id = ANY(:ids)
        """),
        {"ids": [p[0] for p in picks]},
    ).all()
    by_id = {r.id: r for r in rows}
    hits = []
    for chunk_id, score, similarity in picks:
        r = by_id.get(chunk_id)
        if r is None:  # deleted between the scoring and this read
            continue
        # A chunk without a vector in the space has no similarity to show; 0 is "no evidence".
        shown = similarity if math.isfinite(similarity) else 0.0
        hits.append(Hit(r.id, r.document_id, r.external_id, r.title, r.text, r.ordinal, score,
                        r.metadata or {}, shown, heading_path=list(r.heading_path or []),
                        page_start=r.page_start, page_end=r.page_end))
    return hits


def document_vectors(session: Session, space: EmbeddingModel, documents: list[uuid.UUID]) -> np.ndarray:
    """The single vectors of these documents in this space (rows in no particular order)."""
    if not documents:
        return np.zeros((0, int(space.dimension)), dtype=np.float32)
    rows = session.execute(
        text(f"SELECT embedding::text AS v FROM document_vectors WHERE model_id = {int(space.id)} "
             "AND document_id = ANY(:ids)"),
        {"ids": documents},
    ).scalars().all()
    if not rows:
        return np.zeros((0, int(space.dimension)), dtype=np.float32)
    return np.array([np.array(r.strip("[]").split(","), dtype=np.float32) for r in rows])

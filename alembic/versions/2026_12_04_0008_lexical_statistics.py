"""lexical statistics: BM25's document frequencies and collection sizes, maintained with the postings

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04

BM25 needs, per collection and scope ('' for documents, the chunker's name for a chunk set), the number of
items with terms and their total length, and each term's document frequency. They were computed by a scan
per query (the collection's documents or chunks, and every posting of each query term); now triggers keep
them in the same transaction as the postings and lengths they follow, whatever writes them (ingest, a
replaced or deleted document, a collection delete, a re-index's new chunk set, a retired one).

Writers must not queue on hot rows (every document has common terms), so the triggers only append deltas
(lexical_df_deltas, lexical_size_deltas: no key, no lock). Readers add a term's base row and its deltas;
compaction (store.compact_lexical_statistics, after each ingest batch and from beat) folds the deltas into
the base tables (lexical_df, lexical_size) in one statement each, so both stay small.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (table, transition-table rows -> (collection_id, scope, term)), for the document frequency triggers.
POSTINGS = {
    "lexical_postings": "''",
    "chunk_postings": "r.chunker",
}
# (table, scope) for the size triggers: items counted when their lexical_length is above 0.
SIZED = {
    "documents": "''",
    "chunks": "r.chunker",
}


def upgrade() -> None:
    op.execute("""
        CREATE TABLE lexical_df (
            collection_id integer NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
            scope text NOT NULL,
            term text NOT NULL,
            df bigint NOT NULL,
            PRIMARY KEY (collection_id, scope, term)
        );
        CREATE TABLE lexical_df_deltas (
            collection_id integer NOT NULL,
            scope text NOT NULL,
            term text NOT NULL,
            delta bigint NOT NULL
        );
        CREATE INDEX ix_lexical_df_deltas ON lexical_df_deltas (collection_id, scope, term);
        CREATE TABLE lexical_size (
            collection_id integer NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
            scope text NOT NULL,
            n bigint NOT NULL,
            total bigint NOT NULL,
            PRIMARY KEY (collection_id, scope)
        );
        CREATE TABLE lexical_size_deltas (
            collection_id integer NOT NULL,
            scope text NOT NULL,
            n bigint NOT NULL,
            total bigint NOT NULL
        );
        CREATE INDEX ix_lexical_size_deltas ON lexical_size_deltas (collection_id, scope);
    """)
    for table, scope in POSTINGS.items():
        for event, rows, sign in (("INSERT", "NEW", ""), ("DELETE", "OLD", "-")):
            name = f"pgsage_{table}_df_{event.lower()}"
            op.execute(f"""
                CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                    INSERT INTO lexical_df_deltas (collection_id, scope, term, delta)
                    SELECT r.collection_id, {scope}, r.term, {sign}count(*) FROM changed r
                     GROUP BY 1, 2, 3;
                    RETURN NULL;
                END $$;
                CREATE TRIGGER {name} AFTER {event} ON {table}
                    REFERENCING {rows} TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION {name}();
            """)
    for table, scope in SIZED.items():
        # Each event needs its own trigger (a trigger with transition tables has one event).
        bodies = {
            "insert": ("REFERENCING NEW TABLE AS added", "SELECT r.*, 1 AS sign FROM added r"),
            "delete": ("REFERENCING OLD TABLE AS removed", "SELECT r.*, -1 AS sign FROM removed r"),
            "update": ("REFERENCING OLD TABLE AS removed NEW TABLE AS added",
                       "SELECT r.*, 1 AS sign FROM added r UNION ALL SELECT r.*, -1 FROM removed r"),
        }
        for event, (referencing, rows) in bodies.items():
            name = f"pgsage_{table}_size_{event}"
            op.execute(f"""
                CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                    INSERT INTO lexical_size_deltas (collection_id, scope, n, total)
                    SELECT r.collection_id, {scope}, sum(r.sign * (r.lexical_length > 0)::int),
                           sum(r.sign * r.lexical_length)
                      FROM ({rows}) r
                     GROUP BY 1, 2
                    HAVING sum(r.sign * (r.lexical_length > 0)::int) <> 0 OR sum(r.sign * r.lexical_length) <> 0;
                    RETURN NULL;
                END $$;
                CREATE TRIGGER {name} AFTER {event.upper()} ON {table}
                    {referencing} FOR EACH STATEMENT EXECUTE FUNCTION {name}();
            """)
    # What is stored already.
    op.execute("""
        INSERT INTO lexical_df (collection_id, scope, term, df)
        SELECT collection_id, '', term, count(*) FROM lexical_postings GROUP BY 1, 2, 3;
        INSERT INTO lexical_df (collection_id, scope, term, df)
        SELECT collection_id, chunker, term, count(*) FROM chunk_postings GROUP BY 1, 2, 3;
        INSERT INTO lexical_size (collection_id, scope, n, total)
        SELECT collection_id, '', count(*) FILTER (WHERE lexical_length > 0), coalesce(sum(lexical_length), 0)
          FROM documents GROUP BY 1, 2;
        INSERT INTO lexical_size (collection_id, scope, n, total)
        SELECT collection_id, chunker, count(*) FILTER (WHERE lexical_length > 0), coalesce(sum(lexical_length), 0)
          FROM chunks GROUP BY 1, 2;
    """)


def downgrade() -> None:
    for table in POSTINGS:
        for event in ("insert", "delete"):
            op.execute(f"DROP TRIGGER pgsage_{table}_df_{event} ON {table}; DROP FUNCTION pgsage_{table}_df_{event}();")
    for table in SIZED:
        for event in ("insert", "delete", "update"):
            op.execute(f"DROP TRIGGER pgsage_{table}_size_{event} ON {table}; "
                       f"DROP FUNCTION pgsage_{table}_size_{event}();")
    op.execute("DROP TABLE lexical_size_deltas, lexical_size, lexical_df_deltas, lexical_df")

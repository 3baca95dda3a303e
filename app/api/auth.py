"""Who may call: every /v1 endpoint takes an API key (Authorization: Bearer pgs_...) and is rate limited per key."""

from __future__ import annotations

from typing import Annotated, NoReturn

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app import keys
from app.api.deps import Resources, ResourcesDep, SessionDep
from app.api.ratelimit import retry_after
from app.db.session import session_scope
from app.errors import Forbidden, RateLimited, Unauthorized
from app.keys import Principal, Role

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="An API key from `pgsage keys create`, sent as `Authorization: Bearer pgs_...`.",
)


def authenticate(
    request: Request,
    resources: ResourcesDep,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Principal:
    """The caller's key, checked against the database on every request (revocation is immediate).

    The check reads in the request's own session (one connection, one transaction for the key and the
    work); the rare last-use write goes in a short transaction of its own, so requests never queue on
    the key's row.
    """
    if credentials is None or not credentials.credentials:
        _refuse(request, resources, "an API key is required: send `Authorization: Bearer <key>` "
                "(see `pgsage keys create`)")
    found = keys.authenticate(session, credentials.credentials)
    if found is None:
        _refuse(request, resources, "the API key is not valid, or has been revoked")
    principal, stale = found
    if stale:
        with session_scope(resources.factory) as own:
            keys.touch(own, principal.key_id)
    wait = resources.limiter.wait_seconds(str(principal.key_id))
    if wait > 0:
        per_minute = resources.settings.rate_limit_per_minute
        seconds = retry_after(wait)
        raise RateLimited(
            f"rate limit of {per_minute} requests per minute for this key exceeded; retry in {seconds}s",
            retry_after=seconds,
        )
    request.state.principal = principal
    return principal


def _refuse(request: Request, resources: Resources, reason: str) -> NoReturn:
    """401, or 429 once this client address has sent too many requests without a valid key (guessing keys,
    or a misconfigured client hammering the service)."""
    address = request.client.host if request.client else "unknown"
    wait = resources.failures.wait_seconds(address)
    if wait > 0:
        seconds = retry_after(wait)
        raise RateLimited(
            f"too many requests without a valid key from this address "
            f"({resources.settings.auth_failures_per_minute} per minute); retry in {seconds}s",
            retry_after=seconds,
        )
    raise Unauthorized(reason)


def require(role: Role) -> object:
    async def check(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
        if not principal.has_role(role):
            raise Forbidden(f"this endpoint needs a key with the {role} role; this key has {principal.role}")
        return principal

    return Depends(check)


async def require_admin(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
    """Admin endpoints act on every collection (re-indexing, keys), so they need an admin key for '*'."""
    if principal.role != "admin" or not principal.all_collections:
        raise Forbidden("this endpoint needs an admin key for all collections ('*')")
    return principal


def check_collection(principal: Principal, collection: str, role: Role) -> None:
    """403 when the key does not reach this collection with this role (whether it exists or not)."""
    if not principal.has_role(role):
        raise Forbidden(f"this needs a key with the {role} role; this key has {principal.role}")
    if not principal.reaches(collection):
        raise Forbidden(f"this key does not reach collection {collection!r}")


def check_reranker(principal: Principal, requested: str | None, configured: str) -> None:
    """A cross-encoder other than the configured one is a model loaded from a name or a local path, on the
    server, kept for the life of the process: only an admin of the whole service may ask for one (a key
    scoped to some collections could otherwise probe the server's files by the answer it gets)."""
    if (requested and requested.startswith("cross-encoder:") and requested != configured
            and not (principal.role == "admin" and principal.all_collections)):
        raise Forbidden(f"only an admin key for all collections ('*') may name a cross-encoder other than the "
                        f"configured one ({configured})")


Reader = Annotated[Principal, require("read")]
Writer = Annotated[Principal, require("write")]
Admin = Annotated[Principal, Depends(require_admin)]

"""Domain errors: each carries its HTTP status and renders as {"error", "detail"}."""

from __future__ import annotations

from typing import Any


class AppError(Exception):
    """Base of every error pgsage reports to a client."""

    status_code = 400
    code = "bad_request"

    def __init__(self, message: str, *, detail: Any = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.headers = headers or {}


class BadInput(AppError):
    status_code = 422
    code = "invalid_input"


class UnsupportedMedia(AppError):
    status_code = 415
    code = "unsupported_media_type"


class TooLarge(AppError):
    status_code = 413
    code = "payload_too_large"


class NotFound(AppError):
    status_code = 404
    code = "not_found"


class Conflict(AppError):
    status_code = 409
    code = "conflict"


class Unavailable(AppError):
    status_code = 503
    code = "unavailable"

    def __init__(self, message: str, *, retry_after: int = 5, detail: Any = None) -> None:
        super().__init__(message, detail=detail, headers={"Retry-After": str(retry_after)})


class UpstreamError(AppError):
    status_code = 502
    code = "upstream_error"


class Unauthorized(AppError):
    status_code = 401
    code = "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(AppError):
    status_code = 403
    code = "forbidden"


class RateLimited(AppError):
    status_code = 429
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})

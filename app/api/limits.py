"""Request body limits: uploads may be up to PGSAGE_MAX_UPLOAD_BYTES, every other body PGSAGE_MAX_REQUEST_BYTES.

A declared Content-Length over the limit is refused before a byte is read; a body without one (chunked)
is counted as it streams in and refused as soon as it passes the limit. Either way: 413, nothing stored.
"""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.config import Settings

UPLOAD_PATH = "/v1/documents"
MULTIPART_OVERHEAD = 1024 * 1024  # form fields and part headers around the file itself


class BodyTooLarge(HTTPException):
    def __init__(self, message: str) -> None:
        super().__init__(413, message)


class BodySizeLimit:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.upload_limit = settings.max_upload_bytes + MULTIPART_OVERHEAD
        self.request_limit = settings.max_request_bytes
        self.upload_message = f"the request is larger than the {settings.max_upload_bytes}-byte upload limit"
        self.request_message = (
            f"the request body is larger than the {settings.max_request_bytes}-byte limit "
            "(PGSAGE_MAX_REQUEST_BYTES; documents go to POST /v1/documents)"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        is_upload = scope["method"] == "POST" and scope["path"].rstrip("/") == UPLOAD_PATH
        limit = self.upload_limit if is_upload else self.request_limit
        message = self.upload_message if is_upload else self.request_message
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            body = json.dumps({"error": "payload_too_large", "detail": message}).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": 413, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            part = await receive()
            if part["type"] == "http.request":
                received += len(part.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(message)
            return part

        await self.app(scope, counted, send)

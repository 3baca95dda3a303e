"""The web console: static files at /ui (plain HTML, CSS and ES modules, no build), / redirects there.

The files are public (the console asks for a key and sends it only to /v1), served with a Content-Security-Policy
that allows only this origin, and kept out of the OpenAPI schema: they are no API operations.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

from app.errors import NotFound

STATIC = Path(__file__).parent / "static"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".txt": "text/plain; charset=utf-8",
}
# Only this origin, for everything; nothing inline, no plugins, not framed, no <base> tricks.
CSP = "default-src 'self'; base-uri 'none'; object-src 'none'; frame-ancestors 'none'; form-action 'self'"
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidate each time (ETag / Last-Modified): a new release's files are never mixed with an old page's.
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


def _files() -> dict[str, Path]:
    """The servable files by name, read once: a request can name only one of these, never a path."""
    return {p.name: p for p in STATIC.iterdir() if p.is_file() and p.suffix in MEDIA_TYPES}


FILES = _files()


def _serve(name: str) -> FileResponse:
    path = FILES.get(name)
    if path is None:
        raise NotFound(f"the console has no file {name!r}")
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=HEADERS)


@router.api_route("/", methods=["GET", "HEAD"])
def root() -> RedirectResponse:
    """The console is the service's front page."""
    return RedirectResponse("/ui", status_code=307)


@router.api_route("/ui", methods=["GET", "HEAD"])
@router.api_route("/ui/", methods=["GET", "HEAD"])
def index() -> FileResponse:
    """The console's single page."""
    return _serve("index.html")


@router.api_route("/ui/static/{name}", methods=["GET", "HEAD"])
def static(name: str) -> FileResponse:
    """One of the console's scripts, styles or images."""
    return _serve(name)

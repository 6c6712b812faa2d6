"""GET /ui: the attention explorer, a static page (HTML, JavaScript, CSS in app/static) that calls /score.

The files are served from a fixed list, so no request path reaches the filesystem, and the page is told by its
Content-Security-Policy that it may load and call nothing but this service: no CDN, no other origin."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import APIRouter, HTTPException, Response

STATIC = Path(__file__).resolve().parent.parent / "static"
PAGE = "ui.html"
ASSETS = {"ui.js": "text/javascript; charset=utf-8", "ui.css": "text/css; charset=utf-8"}
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",  # revalidate: a new release's page and script arrive together
}

# not in the OpenAPI document: a page for people, not part of the scoring API
router = APIRouter(tags=["ui"], include_in_schema=False)


@cache  # read once per process: the files are part of the release, like the code
def _read(name: str) -> bytes:
    return (STATIC / name).read_bytes()


@router.api_route("/ui", methods=["GET", "HEAD"])
async def page() -> Response:
    return Response(_read(PAGE), media_type="text/html; charset=utf-8", headers=HEADERS)


@router.api_route("/ui/{name}", methods=["GET", "HEAD"])
async def asset(name: str) -> Response:
    if name not in ASSETS:
        raise HTTPException(404, f"no such file: {name}")
    return Response(_read(name), media_type=ASSETS[name], headers=HEADERS)

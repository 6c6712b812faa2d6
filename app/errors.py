"""The app's exception handlers: registry errors as their HTTP status, and a 405 that lists every method."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match

from app.registry import RegistryError


async def registry_error(request: Request, exc: RegistryError) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=exc.status)


METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


async def method_not_allowed(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette answers 405 from the first route whose path matches, so ``Allow`` named only that route's
    methods (``PUT`` where ``DELETE`` is served on the same path too): here it names every method some route
    fully matches on this path (each route's own ``matches``, so included routers are searched too)."""
    allowed = [
        method
        for method in METHODS
        if any(route.matches({**request.scope, "method": method})[0] == Match.FULL for route in request.app.routes)
    ]
    return JSONResponse({"detail": exc.detail}, status_code=405, headers={"Allow": ", ".join(allowed)})


def install(app: FastAPI) -> None:
    app.add_exception_handler(RegistryError, registry_error)  # type: ignore[arg-type]
    app.add_exception_handler(405, method_not_allowed)  # type: ignore[arg-type]

"""ASGI middleware: request metrics (endpoint, status, latency) and the request-body size limit."""

from __future__ import annotations

import time

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.metrics import Metrics


class BodyTooLarge(Exception):
    pass


class LimitsAndMetrics:
    def __init__(self, app: ASGIApp, metrics: Metrics, max_body_bytes: int) -> None:
        self.app, self.metrics, self.max_body_bytes = app, metrics, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        scope.setdefault("state", {})["started"] = started  # request.state.started: the routes' stage timings
        status = {"code": 500}
        endpoint = self._endpoint(scope)

        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._reject(send, status)
            self._observe(endpoint, status["code"], started)
            return

        seen = 0
        too_large = started_answer = False

        async def limited_receive() -> Message:
            nonlocal seen, too_large
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    too_large = True
                    raise BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started_answer
            if too_large and not started_answer:
                return  # the app's answer to a body it could not read (FastAPI: 400); the 413 goes instead
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                started_answer = True
            await send(message)

        # a body over the limit without a Content-Length (chunked) is found while it is read: whatever the
        # app makes of the BodyTooLarge (FastAPI turns it into a 400 "error parsing the body"), 413 is sent
        try:
            try:
                await self.app(scope, limited_receive, tracking_send)
            except Exception:
                if not too_large:
                    raise
            if too_large and not started_answer:
                await self._reject(send, status)
        finally:
            self._observe(endpoint, status["code"], started)

    async def _reject(self, send: Send, status: dict[str, int]) -> None:
        status["code"] = 413
        body = orjson.dumps({"detail": f"request body larger than {self.max_body_bytes} bytes"})
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    @staticmethod
    def _endpoint(scope: Scope) -> str:
        path: str = scope.get("path", "")
        if path.startswith("/users/"):
            return "/users/{user_id}/history"  # one label for all users: bounded cardinality
        if path.startswith("/admin/"):
            return "/admin"
        if path == "/ui" or path.startswith("/ui/"):
            return "/ui"  # the page and its files
        known = ("/score", "/events", "/healthz", "/readyz", "/models", "/metrics", "/docs", "/openapi.json")
        return path if path in known else "other"

    def _observe(self, endpoint: str, status: int, started: float) -> None:
        self.metrics.requests.labels(endpoint, str(status)).inc()
        self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)

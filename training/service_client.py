"""A small JSON client of the scoring service, for the loop and the simulator (standard library only: the
training side needs no HTTP dependency). One keep-alive connection; not for benchmarks (bench/client.py is)."""

from __future__ import annotations

import http.client
import json
import time
from typing import Any
from urllib.parse import urlparse


class ServiceError(RuntimeError):
    """The service answered with an error status."""

    def __init__(self, method: str, path: str, status: int, body: str, retry_after_s: float = 0.5) -> None:
        super().__init__(f"{method} {path}: HTTP {status}: {body[:500]}")
        self.status, self.retry_after_s = status, retry_after_s


RETRY_STATUSES = (503, 504)  # overloaded or not scored in time: nothing was stored or answered, so retry


class ServiceClient:
    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 60.0, retries: int = 3) -> None:
        url = urlparse(base_url)
        if url.scheme != "http" or url.hostname is None:
            raise ValueError(f"service URL {base_url!r}: expected http://HOST:PORT")
        self.host, self.port, self.timeout_s = url.hostname, url.port or 80, timeout_s
        self.headers = {"content-type": "application/json"}
        if api_key:
            self.headers["authorization"] = f"Bearer {api_key}"
        self.retries = retries
        self._conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """The decoded JSON answer; ServiceError on a status ≥ 400, after up to ``retries`` more tries of a 503
        or 504 (the service then stored nothing and answered nothing; it says when to retry)."""
        for attempt in range(self.retries + 1):
            try:
                return self._request(method, path, body)
            except ServiceError as e:
                if e.status not in RETRY_STATUSES or attempt == self.retries:
                    raise
                time.sleep(min(e.retry_after_s, 2.0))
        raise AssertionError("unreachable")

    def _request(self, method: str, path: str, body: Any) -> Any:
        """One request; reconnects once if the kept-alive connection was closed by the server meanwhile."""
        payload = None if body is None else json.dumps(body).encode()
        for attempt in (0, 1):
            conn = self._connection()
            try:
                conn.request(method, path, body=payload, headers=self.headers)
                resp = conn.getresponse()
                data = resp.read()
                break
            except (ConnectionError, http.client.RemoteDisconnected, http.client.CannotSendRequest):
                self.close()
                if attempt:
                    raise
        if resp.status >= 400:
            retry_after = resp.getheader("retry-after") or "0.5"
            wait = float(retry_after) if retry_after.replace(".", "", 1).isdigit() else 0.5
            raise ServiceError(method, path, resp.status, data.decode(errors="replace"), wait)
        return json.loads(data) if data else None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

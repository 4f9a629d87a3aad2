"""Admission control: a bound on the requests one worker serves at once.

Past the bound a request is answered at once with 503, a ``Retry-After`` header and a JSON
reason, before its body is read: nothing queues without bound inside the process, so the
requests that are admitted keep the latency of a worker running at its bound. Probes
(/healthz, /readyz), /metrics and /admin/* are never refused: an orchestrator must be able
to tell "overloaded" from "dead", and an operator must be able to swap a model under load.
"""

from __future__ import annotations

from collections.abc import Collection

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

EXEMPT_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
EXEMPT_PREFIXES = ("/admin/",)


class InFlightLimit:
    """Plain ASGI middleware: counts requests in flight, refuses those beyond ``limit``."""

    def __init__(
        self,
        app: ASGIApp,
        limit: int,
        retry_after_s: int,
        exempt: Collection[str] = EXEMPT_PATHS,
    ) -> None:
        self._app = app
        self.limit = limit
        self.in_flight = 0
        self.refused = 0
        self._exempt = frozenset(exempt)
        self._body = orjson.dumps(
            {"detail": f"overloaded: {limit} requests in flight (max_in_flight); retry later"}
        )
        self._headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(self._body)).encode()),
            (b"retry-after", str(retry_after_s).encode()),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._exempted(scope["path"]):
            await self._app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            self.refused += 1
            await send({"type": "http.response.start", "status": 503, "headers": self._headers})
            await send({"type": "http.response.body", "body": self._body})
            return
        self.in_flight += 1
        try:
            await self._app(scope, receive, send)
        finally:
            self.in_flight -= 1

    def _exempted(self, path: str) -> bool:
        return path in self._exempt or path.startswith(EXEMPT_PREFIXES)

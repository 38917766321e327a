"""Request time by route and status class, as plain ASGI middleware.

Plain ASGI rather than ``@app.middleware("http")``: the decorator's request
and response wrapping cost more than the work of a stay post.
"""

from __future__ import annotations

import time

from prometheus_client import Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class RequestTimer:
    def __init__(self, app: ASGIApp, histogram: Histogram) -> None:
        self._app = app
        self._histogram = histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def noted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._app(scope, receive, noted)
        finally:
            # The router records the matched route in the shared scope; the
            # template path keeps the label's values few.
            path = getattr(scope.get("route"), "path", "other")
            self._histogram.labels(path, f"{status // 100}xx").observe(
                time.perf_counter() - started
            )

"""The API's hot path: a well-formed, authorised post of one record.

Every stay the workers complete is one post, so the post's cost is the API's
throughput. FastAPI's own layers around a request (exception middleware,
routing, the request object, the response class) cost about as much as the
stay itself (docs/benchmarks.md). This middleware serves the plain case of
one path without them: body read, token and content type checked, body
parsed and validated, record handled. Anything else (a wrong token, a body
that does not validate, another path or method) goes on to FastAPI with the
body replayed, so every refusal keeps FastAPI's answers, counts and logs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: The request's headers as ASGI gives them: lower-case names, raw bytes.
RawHeaders = list[tuple[bytes, bytes]]
#: Serves a post's body: (status, JSON answer), or None to let FastAPI answer.
Serve = Callable[[bytes, RawHeaders], Awaitable[tuple[int, bytes] | None]]


class PostFastLane:
    def __init__(
        self, app: ASGIApp, path: str, serve: Serve, route: Any = None
    ) -> None:
        self._app = app
        self._path = path
        self._serve = serve
        # Set in the scope as the router would, for the request timer's label.
        self._route = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or scope["path"] != self._path
        ):
            await self._app(scope, receive, send)
            return
        if self._route is not None:
            # As the router would, for the request timer's label, whoever
            # answers and however the request ends (413, 500, a client gone).
            scope["route"] = self._route
        body = await _body(receive)
        if body is None:  # the client left before its body was in
            return
        answer = await self._serve(body, scope["headers"])
        if answer is None:
            await self._app(scope, _replay(body, receive), send)
            return
        status, payload = answer
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", b"%d" % len(payload)),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})


def header(headers: RawHeaders, name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


async def _body(receive: Receive) -> bytes | None:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body once more for FastAPI, then whatever the client sends next."""
    given = False

    async def again() -> Message:
        nonlocal given
        if given:
            return await receive()
        given = True
        return {"type": "http.request", "body": body, "more_body": False}

    return again

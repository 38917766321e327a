"""The stay posts' fast lane in front of FastAPI: what it serves, what it
hands on, and that FastAPI then sees the same request."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.types import Message, Receive, Scope, Send

from parking.api.fastlane import PostFastLane, RawHeaders


class Inner:
    """The app behind the lane: notes what reached it and answers 418."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        self.bodies.append(body)
        await send({"type": "http.response.start", "status": 418, "headers": []})
        await send({"type": "http.response.body", "body": b"inner"})


def _call(
    lane: PostFastLane, method: str, path: str, chunks: list[bytes]
) -> tuple[list[Message], Scope]:
    scope: Scope = {
        "type": "http", "method": method, "path": path,
        "headers": [(b"content-type", b"application/json")],
    }  # fmt: skip
    incoming = [
        {"type": "http.request", "body": chunk, "more_body": n < len(chunks) - 1}
        for n, chunk in enumerate(chunks)
    ]
    sent: list[Message] = []

    async def receive() -> Message:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(lane(scope, receive, send))
    return sent, scope


def _lane(answer: tuple[int, bytes] | None) -> tuple[PostFastLane, Inner, list[Any]]:
    inner = Inner()
    seen: list[Any] = []

    async def serve(body: bytes, headers: RawHeaders) -> tuple[int, bytes] | None:
        seen.append((body, headers))
        return answer

    route = object()
    return PostFastLane(inner, "/summaries", serve, route=route), inner, seen


def test_a_plain_post_is_answered_without_the_app_behind() -> None:
    lane, inner, seen = _lane((201, b'{"written":true}'))

    sent, scope = _call(lane, "POST", "/summaries", [b'{"a":', b"1}"])

    assert inner.bodies == []
    assert seen[0][0] == b'{"a":1}'  # the chunks joined
    assert sent[0]["status"] == 201
    assert (b"content-length", b"16") in sent[0]["headers"]
    assert sent[1]["body"] == b'{"written":true}'
    assert scope["route"] is lane._route  # the request timer's label


def test_a_post_it_cannot_serve_reaches_the_app_with_its_body() -> None:
    lane, inner, seen = _lane(None)

    sent, scope = _call(lane, "POST", "/summaries", [b"{bad", b" json"])

    assert len(seen) == 1
    assert inner.bodies == [b"{bad json"]
    assert sent[0]["status"] == 418
    # Labelled as its route whoever answers: FastAPI's 401, 413, 422, 500.
    assert scope["route"] is lane._route


def test_other_paths_and_methods_pass_straight_through() -> None:
    for method, path in (("GET", "/summaries"), ("POST", "/unmatched")):
        lane, inner, seen = _lane((201, b"{}"))

        sent, _ = _call(lane, method, path, [b"{}"])

        assert seen == []
        assert inner.bodies == [b"{}"]
        assert sent[0]["status"] == 418


def test_a_client_gone_before_its_body_is_answered_by_nobody() -> None:
    lane, inner, seen = _lane((201, b"{}"))

    sent, _ = _call(lane, "POST", "/summaries", [])

    assert (sent, seen, inner.bodies) == ([], [], [])

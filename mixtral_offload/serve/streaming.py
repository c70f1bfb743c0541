"""Server-Sent Events, and noticing a client that goes away while its request waits or streams."""
from __future__ import annotations

import json
from typing import Awaitable, Callable, TypeVar

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

T = TypeVar("T")
DONE = b"data: [DONE]\n\n"


def sse(data: dict) -> bytes:
    """One SSE event carrying a JSON object, as OpenAI sends it."""
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


async def until_disconnected(receive: Receive) -> None:
    """Wait for the ASGI http.disconnect message (the request body must have been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(receive: Receive, work: Callable[[], Awaitable[T]]) -> T | None:
    """The result of work(), or None if the client disconnects first (work is then cancelled)."""
    result = None
    async with anyio.create_task_group() as group:
        async def watch() -> None:
            await until_disconnected(receive)
            group.cancel_scope.cancel()

        group.start_soon(watch)
        result = await work()
        group.cancel_scope.cancel()
    return result


class EventStream(StreamingResponse):
    """A text/event-stream response that calls on_end when it ends for any reason: done, client gone, error."""

    def __init__(self, events, on_end: Callable[[], None]):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_end = on_end

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_all() -> None:
            try:
                await self.stream_response(send)
            except OSError:  # ASGI 2.4 servers report a closed connection on send
                pass

        try:
            await unless_disconnected(receive, send_all)
        finally:
            self.on_end()

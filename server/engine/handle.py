"""The API side of one request: an asyncio event stream that the engine thread feeds."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

from server.engine.types import FinishEvent, TokenEvent


class RequestHandle:
    def __init__(self, request_id: str, prompt_tokens: int, loop: asyncio.AbstractEventLoop):
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self._loop = loop
        self._queue: asyncio.Queue[TokenEvent | FinishEvent] = asyncio.Queue()
        self.cancelled = threading.Event()

    def push(self, event: TokenEvent | FinishEvent) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:
            # The submitting event loop is gone, so nobody can read this request any more.
            self.cancelled.set()

    async def events(self) -> AsyncIterator[TokenEvent | FinishEvent]:
        while True:
            event = await self._queue.get()
            yield event
            if isinstance(event, FinishEvent):
                return

    async def result(self) -> FinishEvent:
        async for event in self.events():
            if isinstance(event, FinishEvent):
                return event
        raise RuntimeError("event stream ended without a finish event")

    def cancel(self) -> None:
        self.cancelled.set()

"""``Batcher``: the one writer loop of both surfaces.

Request tasks ``put`` encoded pieces (websocket frames; an HTTP connection's response bytes, its
heads and SSE chunks) into a bounded queue; one writer task per connection takes every piece
already waiting at once and hands the batch to ``write``. Idle, the batches are one piece; under
load they grow instead of falling behind, and the cost that is per write (a syscall) is paid
once per batch.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import trio

T = TypeVar("T")


class Batcher(Generic[T]):
    """A bounded queue of pieces, written in batches by ``run``.

    Args:
        size: pieces that may wait; one more makes ``put`` wait (backpressure).
        most: the largest batch handed to ``write`` (default: ``size``).
    """

    __slots__ = ("_in", "_out", "_most")

    def __init__(self, size: int, most: int | None = None):
        self._in, self._out = trio.open_memory_channel[T](size)
        self._most = most or size

    async def put(self, piece: T) -> bool:
        """Queue ``piece``; ``False`` if the writer is gone (nobody is left to tell).

        No schedule point while there is room: a request relaying deltas that are ready hands
        them all to the writer in one go. A full queue waits.
        """
        try:
            self._in.send_nowait(piece)
        except trio.WouldBlock:
            try:
                await self._in.send(piece)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                return False
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        return True

    def close(self) -> None:
        """No more pieces: ``run`` returns once those queued are written."""
        self._in.close()

    async def run(self, write: Callable[[list[T]], Awaitable[None]]) -> None:
        """Write batches until ``close`` and the queue is empty (or until cancelled)."""
        out, most = self._out, self._most
        async with out:
            while True:
                try:
                    batch = [out.receive_nowait()]
                except trio.WouldBlock:
                    try:
                        batch = [await out.receive()]
                    except trio.EndOfChannel:
                        return
                except trio.EndOfChannel:
                    return
                while len(batch) < most:
                    try:
                        batch.append(out.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                await write(batch)

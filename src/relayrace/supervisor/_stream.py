"""A streamed request (``RequestStream``) and the bounded queue (``_Deltas``) that carries its
deltas from the request's task to its reader.

The request's failover loop runs in a task of the supervisor's nursery tied to the caller's
``async with`` block; a slow reader slows the provider read (``STREAM_BUFFER`` deltas wait at
most).
"""

from __future__ import annotations

from types import TracebackType

import trio

from .._errors import RequestFailed
from .._values import Delta, Reply
from ._ledger import CallerLeft
from ._run import Run

#: How many deltas of a stream may wait for its reader before the provider read waits too.
STREAM_BUFFER = 16


class RequestStream:
    """A streamed request: an async context manager, then an async iterator of ``Delta``s.

    ``reply`` holds the ``Reply`` once the stream has ended.
    """

    __slots__ = ("_nursery", "_run", "_deltas", "_reply", "_error", "_entered")

    def __init__(self, run: Run, nursery: trio.Nursery):
        self._nursery = nursery
        self._run = run
        self._deltas = _Deltas()
        self._reply: Reply | None = None
        self._error: RequestFailed | None = None
        self._entered = False

    @property
    def request_id(self) -> int:
        return self._run.request_id

    @property
    def reply(self) -> Reply:
        """The reply, once the stream has ended.

        Raises:
            RequestFailed: the request failed.
            RuntimeError: the stream has not ended yet.
        """
        if self._error is not None:
            raise self._error
        if self._reply is None:
            raise RuntimeError("the stream has not ended yet")
        return self._reply

    async def __aenter__(self) -> RequestStream:
        if self._entered:
            raise RuntimeError("a RequestStream can be entered once")
        self._entered = True
        self._run.emit = self._deltas.put
        self._run.emit_nowait = self._deltas.put_nowait
        self._nursery.start_soon(self._serve)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._run.leave()
        self._deltas.leave()

    async def _serve(self) -> None:
        try:
            self._reply = await self._run.execute()
        except RequestFailed as exc:
            self._error = exc
        except CallerLeft:
            pass
        finally:
            self._deltas.close()

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Delta:
        deltas = self._deltas
        if deltas._items:  # the fast path of ``get``, without the call
            await trio.lowlevel.checkpoint_if_cancelled()
            return deltas.get_ready()
        try:
            return await deltas.get()
        except trio.EndOfChannel:
            if self._error is not None:
                raise self._error from None
            if self._reply is None:
                # The supervisor shut down under us.
                raise self._run.failed_by_shutdown() from None
            raise StopAsyncIteration from None


class _Deltas:
    """The deltas of one stream, from the request's task to its reader.

    Bounded: the producer waits while ``STREAM_BUFFER`` deltas are unread. One producer, one
    reader; cheaper than a memory channel for that case: the reader takes a delta that is
    ready without a schedule point, so the deltas of one provider read cost one task switch
    between them, not one each. ``get`` still raises at once if its task is cancelled.
    """

    __slots__ = ("_items", "_reader", "_writer", "_closed", "_gone")

    def __init__(self) -> None:
        # A list, not a deque: it holds at most STREAM_BUFFER items, and an empty deque
        # weighs 600 bytes, for every stream in flight.
        self._items: list[Delta] = []
        self._reader: trio.lowlevel.Task | None = None
        self._writer: trio.lowlevel.Task | None = None
        self._closed = False  # the producer is done: the reader gets EndOfChannel once empty
        self._gone = False  # the reader left: the producer gets BrokenResourceError

    def put_nowait(self, delta: Delta) -> bool:
        """Queue ``delta`` if there is room (True); False if the producer must wait.

        Raises:
            trio.BrokenResourceError: the reader is gone.
        """
        if self._gone:
            raise trio.BrokenResourceError
        if len(self._items) >= STREAM_BUFFER:
            return False
        self._items.append(delta)
        reader = self._reader
        if reader is not None:
            self._reader = None
            trio.lowlevel.reschedule(reader)
        return True

    async def put(self, delta: Delta) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self.put_nowait(delta):
            self._writer = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(self._abort_writer)

    async def get(self) -> Delta:
        await trio.lowlevel.checkpoint_if_cancelled()
        items = self._items
        while not items:
            if self._closed:
                raise trio.EndOfChannel
            self._reader = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(self._abort_reader)
        return self.get_ready()

    def get_ready(self) -> Delta:
        """Take the next delta, which must be there."""
        writer = self._writer
        if writer is not None:
            self._writer = None
            trio.lowlevel.reschedule(writer)
        return self._items.pop(0)

    def close(self) -> None:
        """The producer is done."""
        self._closed = True
        self._wake_reader()

    def leave(self) -> None:
        """The reader is done: drop what it did not read, and stop the producer."""
        self._gone = True
        self._items.clear()
        writer = self._writer
        if writer is not None:
            self._writer = None
            trio.lowlevel.reschedule(writer)

    def _wake_reader(self) -> None:
        reader = self._reader
        if reader is not None:
            self._reader = None
            trio.lowlevel.reschedule(reader)

    def _abort_reader(self, raise_cancel: object) -> trio.lowlevel.Abort:
        self._reader = None
        return trio.lowlevel.Abort.SUCCEEDED

    def _abort_writer(self, raise_cancel: object) -> trio.lowlevel.Abort:
        self._writer = None
        return trio.lowlevel.Abort.SUCCEEDED

"""``HeldStream``: the websocket server's TCP stream, able to hold writes and send them at once;
``IdleSockets``: the handshake deadlines of the sockets that have not sent a byte yet.

trio-websocket writes each frame with its own ``send_all`` (a syscall per frame). Its public
``wrap_server_stream`` takes any ``trio.abc.Stream``: handing it this one lets the connection's
writer ``hold`` the socket, send a batch of frames with the public ``send_message`` (each only
appended here), then ``release`` them in one ``send_all``.

It also lets the endpoint wait for a connection's first bytes (``receive_first``) before it
hands the stream to trio-websocket: a connection that never sends a byte (a flood of idle
sockets) then costs one sleeping task, not a ``WebSocketConnection`` with its reader task,
channels and events, and its end (a timeout, the peer's close) is one ``close``.
"""

from __future__ import annotations

import collections
import errno
import logging
from collections.abc import Awaitable, Callable

import trio

log = logging.getLogger("relayrace.server")

# Idle sockets whose handshake time is up, ended per scheduling round: a flood's timeouts come in
# bursts (as its connects did) and would otherwise crowd out the established connections.
_ENDED_PER_ROUND = 16


class HeldStream(trio.abc.Stream):
    """A ``SocketStream`` whose writes can be held and sent together.

    Args:
        stream: the accepted TCP stream; closed by ``aclose``.
    """

    __slots__ = ("_stream", "_held", "_first", "_lock", "handshake_scope")

    def __init__(self, stream: trio.SocketStream):
        self._stream = stream
        self._held: list[bytes] | None = None
        # What ``receive_first`` received, returned by the next ``receive_some``.
        self._first: bytes | bytearray = b""
        #: Cancelled when the peer closes (or trio-websocket closes the stream) before the
        #: opening handshake is done: trio-websocket would wait for the handshake regardless.
        self.handshake_scope: trio.CancelScope | None = None
        # ``release`` and a write of trio-websocket's own (a pong, a close) may race.
        self._lock = trio.StrictFIFOLock()

    def hold(self) -> None:
        """Keep every write from now on until ``release``."""
        if self._held is None:
            self._held = []

    async def release(self) -> None:
        """Write what was held, in one ``send_all``, and stop holding."""
        held, self._held = self._held, None
        if held:
            await self._write(held[0] if len(held) == 1 else b"".join(held))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._held is not None:
            self._held.append(bytes(data))
            return
        await self._write(data)

    async def _write(self, data: bytes | bytearray | memoryview) -> None:
        lock = self._lock
        try:
            lock.acquire_nowait()  # uncontended (the usual case): no extra schedule point
        except trio.WouldBlock:
            await lock.acquire()
        try:
            await self._stream.send_all(data)
        finally:
            lock.release()

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def receive_first(self) -> bool:
        """Wait for the peer's first bytes and keep them for the next ``receive_some``.

        Returns:
            True once bytes came; False if the peer closed or broke the connection first.
        """
        # Readable first, then read: a receive tried at once on an idle socket fails with
        # EAGAIN, and trio's path for that (an exception through a context manager) was a fifth
        # of the gateway's CPU under a flood of idle sockets (py-spy).
        await trio.lowlevel.wait_readable(self._stream.socket)
        try:
            self._first = await self._stream.receive_some()
        except trio.BrokenResourceError:
            return False
        return bool(self._first)

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        first = self._first
        if first:
            await trio.lowlevel.checkpoint()
            if max_bytes is None or len(first) <= max_bytes:
                self._first = b""
                return first
            self._first = first[max_bytes:]
            return first[:max_bytes]
        try:
            data = await self._stream.receive_some(max_bytes)
        except trio.BrokenResourceError:
            self._ended()
            raise
        if not data:
            self._ended()
        return data

    def _ended(self) -> None:
        if self.handshake_scope is not None:
            self.handshake_scope.cancel()

    async def aclose(self) -> None:
        self._held = None
        self._ended()
        await self._stream.aclose()


class IdleSockets:
    """One timer for the handshake deadline of every socket that has not sent a byte yet.

    A cancel scope per socket with its own deadline would let trio end a whole burst of them in
    one scheduling round (a flood's timeouts come as its connects did: thousands a second), and
    the established connections would wait behind them. Here ``run`` ends at most
    ``_ENDED_PER_ROUND`` per round, in deadline order; a socket may so outlive its deadline by a
    few rounds.

    Args:
        timeout: seconds from ``watch`` to the deadline.
    """

    def __init__(self, timeout: float):
        self.timeout = timeout
        # (deadline, scope) in ``watch`` order, so in deadline order. A scope whose wait ended
        # first stays until its deadline: cancelling an exited scope does nothing.
        self._due: collections.deque[tuple[float, trio.CancelScope]] = collections.deque()
        self._closed = False

    def watch(self) -> tuple[float, trio.CancelScope]:
        """A new socket's deadline, and the scope (to wait in) that ``run`` cancels at it."""
        deadline, scope = trio.current_time() + self.timeout, trio.CancelScope()
        if self._closed:
            scope.cancel()
        else:
            self._due.append((deadline, scope))
        return deadline, scope

    def close(self) -> None:
        """End every wait now and any later one at once (the server is shutting down)."""
        self._closed = True
        while self._due:
            self._due.popleft()[1].cancel()

    async def run(self) -> None:
        """Cancel each watched scope at its deadline, until cancelled."""
        due = self._due
        while True:
            if not due:
                # A socket watched from now on is due no sooner than this sleep's end.
                await trio.sleep(self.timeout)
                continue
            now = trio.current_time()
            if due[0][0] > now:
                await trio.sleep_until(due[0][0])
                continue
            for _ in range(_ENDED_PER_ROUND):
                if not due or due[0][0] > now:
                    break
                due.popleft()[1].cancel()
            await trio.lowlevel.checkpoint()


#: ``accept`` failures that mean "out of descriptors or buffers": the connection waits in the
#: kernel's queue until something is freed.
_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


async def accept_capped(
    listener: trio.SocketListener,
    sockets: trio.Semaphore,
    connections: trio.Nursery,
    serve: Callable[[trio.SocketStream], Awaitable[None]],
    surface: str,
) -> None:
    """Accept on ``listener`` for ever, each connection served by ``serve`` in ``connections``,
    holding one of ``sockets`` (which ``serve`` releases when it ends): at the cap, new
    connections wait in the kernel's queue and cost no descriptor. An ``accept`` that fails for
    lack of descriptors or buffers waits 100 ms; any other failure is logged and waits 1 s —
    a listener's trouble never ends the server."""
    while True:
        await sockets.acquire()
        try:
            stream = await listener.accept()
        except OSError as exc:
            sockets.release()
            name = errno.errorcode.get(exc.errno or 0, str(exc))
            if exc.errno in _CAPACITY_ERRNOS:
                log.error("%s accept failed (%s): waiting 100 ms", surface, name)
                await trio.sleep(0.1)
            else:
                log.error("%s accept failed (%s): waiting 1 s", surface, name)
                await trio.sleep(1.0)
            continue
        except BaseException:
            sockets.release()
            raise
        connections.start_soon(serve, stream)

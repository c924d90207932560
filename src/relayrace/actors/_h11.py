"""``H11Transport``: an ``httpx`` transport speaking HTTP/1.1 with ``h11`` over pooled trio streams.

httpcore re-plans its whole pool on every request and every response close, and wraps h11 in
layers of its own; this transport keeps, per origin, a LIFO stack of idle keep-alive connections
and a FIFO semaphore bounding the connections in use, and drives ``h11`` directly.

Its failures are the ``httpx`` exceptions httpcore raises in the same situations, so the
provider clients' one error boundary (``map_provider_errors``) sees no difference:

==========================================  ===========================================
situation                                   raised
==========================================  ===========================================
no connection (refused, unreachable, DNS,   ``httpx.ConnectError``
TLS handshake failed)
connect (or TLS handshake) beyond the       ``httpx.ConnectTimeout``
request's ``connect`` timeout
the request's ``pool`` timeout              ``httpx.PoolTimeout``
writing the request failed / timed out      ``httpx.WriteError`` / ``httpx.WriteTimeout``
reading the response failed / timed out     ``httpx.ReadError`` / ``httpx.ReadTimeout``
malformed response, or the connection       ``httpx.RemoteProtocolError``
closed before the response was whole
==========================================  ===========================================

Only ``http`` and ``https`` URLs, HTTP/1.1 only, no proxies.
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import AsyncIterator
from typing import Any

import h11
import httpx
import trio

#: Bytes asked of the socket per read (httpcore reads 64 KiB too).
READ_SIZE = 65536

_Origin = tuple[bytes, bytes, int]
_DEFAULT_PORTS = {b"http": 80, b"https": 443}


class H11Transport(httpx.AsyncBaseTransport):
    """HTTP/1.1 over ``h11`` and trio streams, with a keep-alive pool per origin.

    Each origin (scheme, host, port) has at most ``max_connections`` connections. A request
    takes the most recently used idle connection, or opens a new one while there are fewer than
    ``max_connections``, or waits for one (waiters are served first come, first served). A
    response returns its connection to the pool when its body has been read to its end and the
    connection can be reused; a response closed early, cancelled, broken or ``connection:
    close`` closes its connection.

    An idle connection the server has closed (or sent anything to) is noticed before reuse and
    replaced by another, before anything is sent on it.

    Args:
        max_connections: connections per origin, in use or idle.
        ssl_context: the TLS configuration of ``https`` origins; by default
            ``httpx.create_ssl_context()``, created at the first ``https`` request and shared by
            all of this transport's connections.
    """

    def __init__(self, *, max_connections: int = 10, ssl_context: ssl.SSLContext | None = None):
        if max_connections < 1:
            raise ValueError(f"max_connections: expected at least 1, got {max_connections}")
        self.max_connections = max_connections
        self._ssl_context = ssl_context
        self._pools: dict[_Origin, _Pool] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        scheme = url.raw_scheme
        port = url.port or _DEFAULT_PORTS.get(scheme)
        if port is None:
            raise httpx.UnsupportedProtocol(
                f"unsupported URL scheme {url.scheme!r}", request=request
            )
        origin = (scheme, url.raw_host, port)
        pool = self._pools.get(origin)
        if pool is None:
            pool = self._pools[origin] = _Pool(self, origin, self.max_connections)
        timeouts: dict[str, Any] = request.extensions.get("timeout") or {}
        connection = await pool.acquire(request, timeouts)
        try:
            return await connection.send(request, timeouts)
        except BaseException:
            await connection.close()
            raise

    def tls_context(self) -> ssl.SSLContext:
        """The one TLS context of this transport's ``https`` connections (made on first use)."""
        if self._ssl_context is None:
            self._ssl_context = httpx.create_ssl_context()
        return self._ssl_context

    async def aclose(self) -> None:
        # Like httpx's own transport, a closed transport can be used again (with new connections).
        pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            await pool.aclose()


class _Pool:
    """The connections of one origin: idle ones in a LIFO stack, the ones in use counted by a
    (FIFO) semaphore."""

    def __init__(self, owner: H11Transport, origin: _Origin, size: int):
        self.owner = owner
        self.origin = origin
        self.slots = trio.Semaphore(size)
        self.idle: list[_Connection] = []
        self.busy: set[_Connection] = set()
        self.closed = False

    async def acquire(self, request: httpx.Request, timeouts: dict[str, Any]) -> _Connection:
        pool_timeout = timeouts.get("pool")
        # A free slot is taken without a schedule point (sending the request is one): one
        # run-loop batch less per request. A cancelled task still stops here, before it takes
        # a connection; and still first come, first served: while anyone waits, no slot is
        # free (a released slot goes straight to the first waiter).
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            self.slots.acquire_nowait()
        except trio.WouldBlock:
            await self._wait_for_slot(request, pool_timeout)
        try:
            while self.idle:
                connection = self.idle.pop()
                if connection.reusable():
                    connection.held = True
                    self.busy.add(connection)
                    return connection
                await connection.close()  # closed or spoken to by the server while idle
            connection = await _Connection.open(self, request, timeouts.get("connect"))
            self.busy.add(connection)
            return connection
        except BaseException:
            self.slots.release()
            raise

    async def _wait_for_slot(self, request: httpx.Request, pool_timeout: float | None) -> None:
        if pool_timeout is None:
            await self.slots.acquire()
        else:
            try:
                with trio.fail_after(pool_timeout):
                    await self.slots.acquire()
            except trio.TooSlowError as exc:
                raise httpx.PoolTimeout(
                    "timed out waiting for a connection", request=request
                ) from exc

    def put_back(self, connection: _Connection) -> None:
        self.busy.discard(connection)
        self.idle.append(connection)
        self.slots.release()

    def gone(self, connection: _Connection, *, held: bool) -> None:
        self.busy.discard(connection)
        if held:
            self.slots.release()

    async def aclose(self) -> None:
        self.closed = True
        for connection in [*self.idle, *self.busy]:
            await connection.close()
        self.idle.clear()
        self.busy.clear()


class _Connection:
    """One HTTP/1.1 connection: a trio stream and its ``h11`` state."""

    __slots__ = ("pool", "stream", "socket", "h11", "closed", "held")

    def __init__(self, pool: _Pool, stream: trio.abc.Stream, socket: trio.socket.SocketType):
        self.pool = pool
        self.stream = stream
        self.socket = socket
        self.h11 = h11.Connection(h11.CLIENT)
        self.closed = False
        self.held = True  # holds one of its pool's slots

    @classmethod
    async def open(
        cls, pool: _Pool, request: httpx.Request, connect_timeout: float | None
    ) -> _Connection:
        scheme, host, port = pool.origin
        hostname = host.decode("ascii")
        stream: trio.abc.Stream
        with trio.move_on_after(
            float("inf") if connect_timeout is None else connect_timeout
        ) as scope:
            try:
                tcp = await _open_tcp(hostname, port)
            except OSError as exc:
                raise httpx.ConnectError(_text(exc, "cannot connect"), request=request) from exc
            stream = tcp
            if scheme == b"https":
                tls = trio.SSLStream(
                    tcp, pool.owner.tls_context(), server_hostname=hostname, https_compatible=True
                )
                try:
                    await tls.do_handshake()
                except trio.BrokenResourceError as exc:
                    await trio.aclose_forcefully(tcp)
                    cause = exc.__cause__ or exc
                    raise httpx.ConnectError(
                        _text(cause, "TLS handshake failed"), request=request
                    ) from exc
                except BaseException:
                    await trio.aclose_forcefully(tcp)
                    raise
                stream = tls
        if scope.cancelled_caught:
            raise httpx.ConnectTimeout("timed out while connecting", request=request)
        return cls(pool, stream, tcp.socket)

    def reusable(self) -> bool:
        """Whether this idle connection can carry a request: the server has neither closed it
        nor sent anything (which a keep-alive connection between responses never should)."""
        return self.h11.our_state is h11.IDLE and not self.socket.is_readable()

    async def send(self, request: httpx.Request, timeouts: dict[str, Any]) -> httpx.Response:
        conn = self.h11
        url = request.url
        target = url.raw_path
        try:
            head = h11.Request(method=request.method, target=target, headers=request.headers.raw)
            out = [conn.send(head)]
            async for chunk in request.stream:  # type: ignore[union-attr]
                if chunk:
                    out.append(conn.send(h11.Data(data=chunk)))
            out.append(conn.send(h11.EndOfMessage()))
        except h11.LocalProtocolError as exc:
            raise httpx.LocalProtocolError(str(exc), request=request) from exc
        data = b"".join(b for b in out if b)
        write_timeout = timeouts.get("write")
        try:
            if write_timeout is None:
                await self.stream.send_all(data)
            else:
                # A cancel scope, not ``trio.fail_after`` (a generator context manager): the
                # same deadline, a few µs less per request.
                with trio.CancelScope(deadline=trio.current_time() + write_timeout) as scope:
                    await self.stream.send_all(data)
                if scope.cancelled_caught:
                    raise trio.TooSlowError
        except trio.TooSlowError as exc:
            raise httpx.WriteTimeout(
                "timed out while sending the request", request=request
            ) from exc
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise httpx.WriteError(
                _text(exc.__cause__ or exc, "cannot send"), request=request
            ) from exc

        read_timeout = timeouts.get("read")
        while True:
            event = await self.next_event(request, read_timeout)
            if isinstance(event, h11.Response):
                break
            if isinstance(event, h11.ConnectionClosed):
                raise httpx.RemoteProtocolError(
                    "server disconnected without sending a response", request=request
                )
            # h11.InformationalResponse (1xx): wait for the real one
        return httpx.Response(
            status_code=event.status_code,
            headers=event.headers.raw_items(),
            stream=_Body(self, request, read_timeout),
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": event.reason},
        )

    async def next_event(self, request: httpx.Request, read_timeout: float | None) -> Any:
        conn = self.h11
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise httpx.RemoteProtocolError(str(exc), request=request) from exc
            if event is not h11.NEED_DATA:
                return event
            try:
                if read_timeout is None:
                    data = await self.stream.receive_some(READ_SIZE)
                else:
                    with trio.fail_after(read_timeout):
                        data = await self.stream.receive_some(READ_SIZE)
            except trio.TooSlowError as exc:
                raise httpx.ReadTimeout("timed out while reading", request=request) from exc
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise httpx.ReadError(
                    _text(exc.__cause__ or exc, "cannot read"), request=request
                ) from exc
            conn.receive_data(data)  # type: ignore[arg-type]  # h11 takes any bytes-like

    async def finished(self) -> None:
        """The response was read to its end: back to the pool if the connection can be reused
        (both sides done, no ``connection: close``), else closed."""
        conn = self.h11
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE and not self.pool.closed:
            conn.start_next_cycle()
            self.held = False
            self.pool.put_back(self)
        else:
            await self.close()

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        held, self.held = self.held, False
        self.pool.gone(self, held=held)
        await trio.aclose_forcefully(self.stream)


class _Body(httpx.AsyncByteStream):
    """A response body read from its connection; the connection goes back to the pool when the
    body has been read to its end and is closed if the body is closed before."""

    __slots__ = ("_connection", "_request", "_read_timeout")

    def __init__(self, connection: _Connection, request: httpx.Request, read_timeout: float | None):
        self._connection: _Connection | None = connection
        self._request = request
        self._read_timeout = read_timeout

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        connection = self._connection
        if connection is None:
            raise StopAsyncIteration
        try:
            event = await connection.next_event(self._request, self._read_timeout)
            if isinstance(event, h11.Data):
                return bytes(event.data)
            if not isinstance(event, h11.EndOfMessage):  # ConnectionClosed before the end
                raise httpx.RemoteProtocolError(
                    "server disconnected before the end of the body", request=self._request
                )
        except BaseException:
            self._connection = None
            await connection.close()
            raise
        self._connection = None
        await connection.finished()
        raise StopAsyncIteration

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()


async def _open_tcp(host: str, port: int) -> trio.SocketStream:
    """A TCP stream to ``host``: an IP address is connected to directly (one address, so
    ``trio.open_tcp_stream``'s happy eyeballs would try only it, at the cost of a nursery, a
    task and a resolver call per connection), a name through ``trio.open_tcp_stream``."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return await trio.open_tcp_stream(host, port)
    family = trio.socket.AF_INET6 if address.version == 6 else trio.socket.AF_INET
    sock = trio.socket.socket(family, trio.socket.SOCK_STREAM)
    try:
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


def _text(exc: BaseException, what: str) -> str:
    detail = str(exc)
    return f"{what}: {detail}" if detail else what

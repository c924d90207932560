"""The HTTP transport of the provider clients: an ``httpx.AsyncClient`` without cookies, whose
connections are spread over several small pools (``ShardedTransport``) when there are many.

Only connecting and writing have httpx timeouts: everything else is bounded by the actor's
trio cancel scopes.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import httpx

from ._h11 import H11Transport

USER_AGENT = "relayrace/0.1"

# The write timeout guards against a socket that never drains; requests are small.
_MIN_WRITE_TIMEOUT = 10.0

#: Connections per connection pool. httpcore re-plans its whole pool on every request and every
#: response close, at a cost that grows with the connections times the idle ones (1.0.9:
#: ``_assign_requests_to_connections``): at 50 requests in flight one pool costs ~4× the CPU
#: per request of pools of 8 (benchmarks/README.md). A provider client with more connections
#: spreads them over several pools.
POOL_SHARD = 8


#: The transports a provider client can use (``transport = "..."`` in its config table).
TRANSPORTS = ("h11", "httpx")


def tls_context(base_url: str) -> ssl.SSLContext:
    """The TLS context of a provider client that talks to ``base_url``, to build once.

    For ``https://``, httpx's default (loading the CA bundle: ~100 ms of synchronous work, so
    never per attempt). For ``http://``, TLS is never used towards the provider: a context that
    verifies but trusts no CA costs nothing to make, and fails closed if a proxy from the
    environment is reached over TLS.
    """
    if base_url.startswith("https://"):
        return httpx.create_ssl_context()
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


def sharded_transport(
    connections: int, shard: int = POOL_SHARD, *, tls: ssl.SSLContext | None = None
) -> ShardedTransport:
    """``connections`` spread over pools of at most ``shard`` connections, sharing one TLS
    context (``tls``, or httpx's default; building one per pool would load the CA bundle each
    time)."""
    count = -(-connections // shard)
    per = -(-connections // count)
    limits = httpx.Limits(max_connections=per, max_keepalive_connections=per)
    if tls is None:
        tls = httpx.create_ssl_context()
    return ShardedTransport(
        [httpx.AsyncHTTPTransport(limits=limits, verify=tls) for _ in range(count)], per
    )


class ShardedTransport(httpx.AsyncBaseTransport):
    """Several transports (connection pools) behind one. Each request goes to the first pool
    with fewer than ``per_shard`` requests in flight (the least busy if none has), and counts
    there until its response is closed: requests one after another reuse the first pool's
    connections, and pools fill in order under load."""

    def __init__(self, shards: Sequence[httpx.AsyncBaseTransport], per_shard: int):
        if not shards:
            raise ValueError("shards: expected at least one transport")
        self.shards = list(shards)
        self.per_shard = per_shard
        self._busy = [0] * len(self.shards)
        self._low = 0  # no pool before this one has room

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        busy = self._busy
        per = self.per_shard
        i = self._low
        while i < len(busy) and busy[i] >= per:
            i += 1
        self._low = i
        if i == len(busy):
            i = min(range(len(busy)), key=busy.__getitem__)
        busy[i] += 1
        try:
            response = await self.shards[i].handle_async_request(request)
        except BaseException:
            self._release(i)
            raise
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _Released(response.stream, self, i)
        return response

    def _release(self, i: int) -> None:
        self._busy[i] -= 1
        if i < self._low:
            self._low = i

    async def aclose(self) -> None:
        for shard in self.shards:
            await shard.aclose()


class _Released(httpx.AsyncByteStream):
    """A response body that frees its place in its pool's count when closed."""

    __slots__ = ("_stream", "_owner", "_index")

    def __init__(self, stream: httpx.AsyncByteStream, owner: ShardedTransport, index: int):
        self._stream = stream
        self._owner: ShardedTransport | None = owner
        self._index = index

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            if self._owner is not None:
                self._owner._release(self._index)
                self._owner = None


class _NoCookies(httpx.Cookies):
    """A cookie jar that keeps nothing and sends nothing (one instance serves every client)."""

    def extract_cookies(self, response: httpx.Response) -> None:
        pass

    def set_cookie_header(self, request: httpx.Request) -> None:
        pass

    def set(self, name: str, value: str, domain: str = "", path: str = "/") -> None:
        pass

    def update(self, cookies: Any = None) -> None:  # type: ignore[override]
        pass

    def __setitem__(self, name: str, value: str) -> None:
        pass


class _ProviderHTTPClient(httpx.AsyncClient):
    """An ``httpx.AsyncClient`` that keeps no cookies.

    Provider APIs authenticate with keys, not cookies, and one client serves every caller of
    the gateway, so a cookie set by a provider must not ride along on other callers' requests.
    It also saves httpx's cookie handling on every response (~25 µs: it wraps the response and
    the request in ``urllib`` objects for ``http.cookiejar``, even when there is no cookie).
    """

    _no_cookies = _NoCookies()

    @property
    def cookies(self) -> httpx.Cookies:
        return self._no_cookies

    @cookies.setter
    def cookies(self, cookies: Any) -> None:
        pass  # httpx sets the (empty) jar it was given at construction: keep none


def make_http_client(
    *,
    headers: Mapping[str, str],
    max_connections: int,
    connect_timeout: float,
    tls: ssl.SSLContext,
    transport: httpx.AsyncBaseTransport | str = "h11",
) -> httpx.AsyncClient:
    """The ``httpx.AsyncClient`` of one provider client.

    Only connecting and writing have httpx timeouts; reading and waiting for a pooled connection
    are bounded by the actor's cancel scopes (time to first token, idle, attempt). The pool
    holds as many connections as the actor runs attempts, and keeps them all alive between
    attempts. ``transport`` is ``"h11"`` (the default: ``H11Transport``, h11 over pooled trio
    streams, a third to two thirds less CPU per request than httpx's own, benchmarks/README.md),
    ``"httpx"`` (httpx's transport; above ``POOL_SHARD`` connections spread over several pools)
    or a transport object (tests). Every pool uses ``tls`` (``tls_context``), made once by the
    provider client.
    """
    chosen: httpx.AsyncBaseTransport | None
    if transport == "h11":
        chosen = H11Transport(max_connections=max_connections, ssl_context=tls)
    elif transport == "httpx":
        chosen = sharded_transport(max_connections, tls=tls) if max_connections > POOL_SHARD else None
    elif isinstance(transport, str):
        raise ValueError(f"transport: expected one of {', '.join(TRANSPORTS)}")
    else:
        chosen = transport
    timeout = httpx.Timeout(
        connect=connect_timeout,
        read=None,
        write=max(_MIN_WRITE_TIMEOUT, connect_timeout),
        pool=None,
    )
    limits = httpx.Limits(
        max_connections=max_connections, max_keepalive_connections=max_connections
    )
    return _ProviderHTTPClient(
        # identity: a compressed body could inflate past any limit inside httpx, before we
        # could count it (``_body`` inflates a body compressed anyway, within the limit).
        headers={"user-agent": USER_AGENT, "accept-encoding": "identity", **headers},
        timeout=timeout,
        limits=limits,
        transport=chosen,
        follow_redirects=False,
        verify=tls,
    )

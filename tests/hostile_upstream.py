"""A hostile provider: a small trio HTTP/1.1 server on loopback that speaks the OpenAI wire
format (``POST /v1/chat/completions``) and misbehaves as an adversary would (issue #11).

It writes raw bytes rather than going through h11, because h11 refuses to send some of what it
must send (a body longer than its ``content-length`` is never reached, but an SSE line that
never ends, a gzip bomb and a response that never completes are all easier as bytes). Each
response is produced from a generator, chunk by chunk, so the test process never holds a
hostile body in memory; it stops at once when the client goes away.

The behaviour is picked by the request's ``model`` (the upstream model the provider config asks
for), like the mock provider's scenarios:

=====================  =========================================================================
model                  the response
=====================  =========================================================================
``ok``                 a small valid answer (SSE when streamed, JSON otherwise)
``many-deltas``        a valid SSE stream of 200 small deltas
``huge-body``          200 JSON, ``content-length`` 2 GiB: one endless ``content`` string
``gzip-bomb``          200 JSON, ``content-encoding: gzip``: 3 MiB on the wire, 3 GiB inflated
``endless-line``       200 SSE: ``data: {"choices…`` and then ``a`` forever, no newline
``big-deltas``         a valid SSE stream of 64 deltas of 1 MiB each (``BIG_DELTAS``)
``retry-after-huge``   429 ``rate_limit_exceeded`` with ``Retry-After: 99999999``
``retry-after-9999``   503 with ``Retry-After: Fri, 31 Dec 9999 23:59:59 GMT``
``echo-key``           200 JSON: the bearer key as the ``model``, base64-encoded in the message,
                       and in an ``x-echo`` response header
``surrogate-delta``    200 SSE: a first delta whose content is the JSON escape ``"\\ud800"``
``surrogate-error``    500 whose error message holds ``"\\ud800"``
``surrogate-model``    200 JSON whose ``model`` is ``"\\ud800"``
=====================  =========================================================================

Safety valve: a response that has produced more than ``alarm`` bytes (counted inflated for the
gzip bomb) stops sending, sets ``overrun`` and holds the connection until the client closes it.
A test that fails today (a client that reads without a cap) therefore stops at ``alarm`` bytes
instead of at gigabytes, and can fail fast by watching ``overrun``.
"""

from __future__ import annotations

import base64
import json
import struct
import zlib
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

MiB = 1 << 20
GiB = 1 << 30
BIG_DELTAS = 64
FAR_DATE = "Fri, 31 Dec 9999 23:59:59 GMT"
_CHUNK = 64 * 1024
_MAX_HEAD = 64 * 1024


@attrs.define
class Served:
    """One request as the hostile server saw it."""

    path: str
    model: str
    stream: bool
    sent: int = 0  #: body bytes produced (inflated, for the gzip bomb)
    client_gone: bool = False  #: the client closed the connection before the end
    overran: bool = False  #: the safety valve stopped this response
    #: set when the handler has finished with the connection
    done: trio.Event = attrs.field(factory=trio.Event)


@attrs.define
class _Response:
    status: int
    headers: list[tuple[str, str]]
    body: Iterator[tuple[bytes, int]]  # (bytes to send, bytes they stand for)
    length: int | None = None  # content-length; None: the body ends when the connection does


class HostileUpstream:
    """The server; start it with ``open_hostile_upstream()``."""

    def __init__(self, *, alarm: int = 64 * MiB):
        self.alarm = alarm
        self.port = 0
        self.log: list[Served] = []
        self.overrun = trio.Event()
        self.open_connections = 0

    @property
    def base_url(self) -> str:
        """The OpenAI-style base URL (``…/v1``) for ``OpenAIClient(base_url=…)``."""
        return f"http://127.0.0.1:{self.port}/v1"

    def sent(self) -> int:
        """Body bytes produced over every request."""
        return sum(s.sent for s in self.log)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        await trio.serve_listeners(self._connection, listeners, task_status=task_status)

    async def _connection(self, stream: trio.SocketStream) -> None:
        self.open_connections += 1
        try:
            async with stream:
                request = await _read_request(stream)
                if request is None:
                    return
                path, headers, body = request
                await self._answer(stream, path, headers, body)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.open_connections -= 1

    async def _answer(
        self, stream: trio.SocketStream, path: str, headers: dict[str, str], body: bytes
    ) -> None:
        try:
            payload = json.loads(body)
        except ValueError:
            payload = {}
        model = str(payload.get("model", ""))
        wants_stream = bool(payload.get("stream"))
        served = Served(path=path, model=model, stream=wants_stream)
        self.log.append(served)
        key = headers.get("authorization", "").partition(" ")[2]
        response = _behaviour(model, wants_stream, key)
        head = [f"HTTP/1.1 {response.status} X", "connection: close"]
        head += [f"{name}: {value}" for name, value in response.headers]
        if response.length is not None:
            head.append(f"content-length: {response.length}")
        try:
            await stream.send_all(("\r\n".join(head) + "\r\n\r\n").encode())
            for data, stands_for in response.body:
                if served.sent + stands_for > self.alarm:
                    served.overran = True
                    self.overrun.set()
                    await _until_closed(stream)
                    served.client_gone = True
                    return
                await stream.send_all(data)
                served.sent += stands_for
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            served.client_gone = True
            raise
        finally:
            served.done.set()


@asynccontextmanager
async def open_hostile_upstream(*, alarm: int = 64 * MiB) -> AsyncIterator[HostileUpstream]:
    """Run a hostile upstream for the body of the block; stop it (and every connection) after."""
    server = HostileUpstream(alarm=alarm)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()


async def _until_closed(stream: trio.SocketStream) -> None:
    while await stream.receive_some(_CHUNK):
        pass


async def _read_request(stream: trio.SocketStream) -> tuple[str, dict[str, str], bytes] | None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(_CHUNK)
        if not chunk or len(data) > _MAX_HEAD:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    path = lines[0].split(" ")[1]
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = await stream.receive_some(_CHUNK)
        if not chunk:
            return None
        body += chunk
    return path, headers, body


# --- behaviours ---------------------------------------------------------------------------------


def _json(status: int, body: Any, headers: list[tuple[str, str]] | None = None) -> _Response:
    data = json.dumps(body).encode()
    return _Response(
        status,
        [("content-type", "application/json"), *(headers or [])],
        iter([(data, len(data))]),
        len(data),
    )


def _raw_json(status: int, text: str, headers: list[tuple[str, str]] | None = None) -> _Response:
    data = text.encode()
    return _Response(
        status, [("content-type", "application/json"), *(headers or [])], iter([(data, len(data))]), len(data)
    )


def _sse(events: Iterator[bytes]) -> _Response:
    return _Response(
        200,
        [("content-type", "text/event-stream"), ("cache-control", "no-cache")],
        ((e, len(e)) for e in events),
    )


def _chunk_event(content: str | None = None, finish: str | None = None, raw: str | None = None) -> bytes:
    if raw is not None:
        return f"data: {raw}\n\n".encode()
    delta = {} if content is None else {"content": content}
    chunk = {
        "id": "h",
        "object": "chat.completion.chunk",
        "model": "hostile",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def _answer(text: str, model: str = "hostile") -> dict[str, Any]:
    return {
        "id": "h",
        "object": "chat.completion",
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def _ok(stream: bool, words: tuple[str, ...] = ("Hello", " from", " upstream")) -> _Response:
    if not stream:
        return _json(200, _answer("".join(words)))

    def events() -> Iterator[bytes]:
        for word in words:
            yield _chunk_event(word)
        yield _chunk_event(finish="stop")
        yield b"data: [DONE]\n\n"

    return _sse(events())


_PREFIX = b'{"id":"h","object":"chat.completion","model":"hostile","choices":[{"index":0,"message":{"role":"assistant","content":"'
_SUFFIX = b'"},"finish_reason":"stop"}]}'


def _huge_body() -> _Response:
    def body() -> Iterator[tuple[bytes, int]]:
        yield _PREFIX, len(_PREFIX)
        block = b"a" * _CHUNK
        for _ in range((2 * GiB - len(_PREFIX) - len(_SUFFIX)) // _CHUNK):
            yield block, len(block)
        yield _SUFFIX, len(_SUFFIX)

    return _Response(200, [("content-type", "application/json")], body(), 2 * GiB)


def _gzip_bomb() -> _Response:
    # Raw deflate blocks, each fully flushed so that every 1 MiB of "a" compresses to the same
    # ~1 KiB: 3 GiB inflated for ~3 MiB sent, produced without ever holding more than 1 MiB.
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = compressor.compress(_PREFIX) + compressor.flush(zlib.Z_FULL_FLUSH)
    raw = b"a" * MiB
    block = compressor.compress(raw) + compressor.flush(zlib.Z_FULL_FLUSH)
    blocks = 3 * GiB // MiB
    last = compressor.compress(_SUFFIX) + compressor.flush(zlib.Z_FINISH)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    length = len(header) + len(first) + blocks * len(block) + len(last) + 8

    def body() -> Iterator[tuple[bytes, int]]:
        crc = zlib.crc32(_PREFIX)
        yield header + first, len(_PREFIX)
        for _ in range(blocks):
            crc = zlib.crc32(raw, crc)
            yield block, len(raw)
        crc = zlib.crc32(_SUFFIX, crc)
        size = (len(_PREFIX) + blocks * len(raw) + len(_SUFFIX)) & 0xFFFFFFFF
        yield last + struct.pack("<II", crc, size), len(_SUFFIX)

    return _Response(
        200, [("content-type", "application/json"), ("content-encoding", "gzip")], body(), length
    )


def _endless_line() -> _Response:
    def body() -> Iterator[tuple[bytes, int]]:
        start = b'data: {"choices":[{"index":0,"delta":{"content":"'
        yield start, len(start)
        block = b"a" * _CHUNK
        while True:
            yield block, len(block)

    return _Response(200, [("content-type", "text/event-stream")], body())


def _big_deltas() -> _Response:
    def events() -> Iterator[bytes]:
        for i in range(BIG_DELTAS):
            yield _chunk_event(chr(ord("a") + i % 26) * MiB)
        yield _chunk_event(finish="stop")
        yield b"data: [DONE]\n\n"

    return _sse(events())


def _behaviour(model: str, stream: bool, key: str) -> _Response:
    if model == "ok":
        return _ok(stream)
    if model == "many-deltas":
        return _ok(stream, tuple(f"w{i} " for i in range(200)))
    if model == "huge-body":
        return _huge_body()
    if model == "gzip-bomb":
        return _gzip_bomb()
    if model == "endless-line":
        return _endless_line()
    if model == "big-deltas":
        return _big_deltas()
    if model == "retry-after-huge":
        error = {"error": {"message": "slow down", "type": "requests", "code": "rate_limit_exceeded"}}
        return _json(429, error, [("retry-after", "99999999")])
    if model == "retry-after-9999":
        error = {"error": {"message": "unavailable", "type": "server_error", "code": None}}
        return _json(503, error, [("retry-after", FAR_DATE)])
    if model == "echo-key":
        encoded = base64.b64encode(key.encode()).decode()
        return _json(
            200, _answer(f"your key, base64: {encoded}", model=key), [("x-echo", key)]
        )
    if model == "surrogate-delta":
        return _sse(
            iter(
                [
                    _chunk_event(raw='{"choices":[{"index":0,"delta":{"content":"\\ud800"},"finish_reason":null}]}'),
                    _chunk_event(" fine"),
                    _chunk_event(finish="stop"),
                    b"data: [DONE]\n\n",
                ]
            )
        )
    if model == "surrogate-error":
        return _raw_json(
            500, '{"error":{"message":"broken \\ud800 here","type":"server_error","code":null}}'
        )
    if model == "surrogate-model":
        return _raw_json(
            200,
            '{"id":"h","object":"chat.completion","model":"\\ud800","choices":[{"index":0,'
            '"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}]}',
        )
    return _json(404, {"error": {"message": f"no such behaviour: {model}", "type": "invalid_request_error", "code": "model_not_found"}})

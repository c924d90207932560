"""HTTP/2 refused: a prior-knowledge HTTP/2 connection to the HTTP/1.1 server (``_h11``) gets
the application's answer to an ``http_version`` of ``"2"`` (its 505), written as one HTTP/2
response, and is closed."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import trio

Message = MutableMapping[str, Any]
App = Callable[
    [MutableMapping[str, Any], Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_READ = 65536


async def refuse_http2(app: App, stream: trio.SocketStream, data: bytes) -> None:
    """Answer a prior-knowledge HTTP/2 connection's first request with the application's answer
    to HTTP/2 (a 505), in the smallest valid HTTP/2 exchange, then close."""
    messages: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        messages.append(message)

    scope = {"type": "http", "http_version": "2", "method": "PRI", "path": "*", "headers": []}
    await app(scope, receive, send)
    status, headers, body = 505, [], b""
    for message in messages:
        if message["type"] == "http.response.start":
            status, headers = message["status"], list(message.get("headers", ()))
        elif message["type"] == "http.response.body":
            body += message.get("body", b"")
    buffer = data[len(H2_PREFACE) :]
    await stream.send_all(_frame(4, 0, 0, b""))  # our SETTINGS: the defaults
    with trio.move_on_after(5):
        while True:
            while len(buffer) >= 9:
                length = int.from_bytes(buffer[:3], "big")
                if len(buffer) < 9 + length:
                    break
                kind, flags = buffer[3], buffer[4]
                stream_id = int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF
                buffer = buffer[9 + length :]
                if kind == 4 and not flags & 1:
                    await stream.send_all(_frame(4, 1, 0, b""))  # SETTINGS ACK
                elif kind == 1:  # HEADERS: the request; answer it, then say goodbye
                    block = _hpack([(b":status", str(status).encode()), *headers])
                    await stream.send_all(
                        _frame(1, 4, stream_id, block)
                        + _frame(0, 1, stream_id, body)
                        + _frame(7, 0, 0, stream_id.to_bytes(4, "big") + bytes(4))
                    )
                    # Read what the client still sends until it closes, so that closing does
                    # not reset the connection under the answer.
                    while await stream.receive_some(_READ):
                        pass
                    return
            more = await stream.receive_some(_READ)
            if not more:
                return
            buffer += more


def _frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    return (
        len(payload).to_bytes(3, "big")
        + bytes((kind, flags))
        + stream_id.to_bytes(4, "big")
        + payload
    )


def _hpack(headers: list[tuple[bytes, bytes]]) -> bytes:
    """Headers as HPACK literals without indexing (no table, no Huffman: always valid)."""

    def integer(value: int) -> bytes:  # a 7-bit-prefix integer
        if value < 127:
            return bytes((value,))
        out, value = bytearray((127,)), value - 127
        while value >= 128:
            out.append(value % 128 + 128)
            value //= 128
        out.append(value)
        return bytes(out)

    return b"".join(
        b"\x00" + integer(len(name)) + name.lower() + integer(len(value)) + value
        for name, value in headers
    )

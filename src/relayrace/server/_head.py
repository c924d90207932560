"""``ResponseHeads``: the HTTP server's response heads, h11 for what it must decide and lines
validated once for the rest.

h11 decides a response's framing (``content-length``, or ``transfer-encoding: chunked`` it adds,
or the close of an HTTP/1.0 client) and whether the connection goes on (``connection``), so
those headers go through its ``Response`` event. The others (``content-type``,
``cache-control``, ``x-relayrace-provider``, the server's ``x-relayrace-worker``, …) are the same
few values request after request: each is validated by h11 the first time it is seen
(``h11.Response`` refuses an illegal name or value, as it would in the head), its line kept, and
joined into the head after h11's headers. Measured: an ``h11.Response`` of four headers costs
~8 µs where one without them costs ~2 µs, per request (``benchmarks/README.md``).
"""

from __future__ import annotations

from collections.abc import Sequence

import h11

#: The headers h11 reads to frame the body and to keep or close the connection.
_H11_READS = frozenset({b"content-length", b"transfer-encoding", b"connection"})
#: Distinct validated lines kept (a provider's name is one value; a reload may add some).
_MOST_LINES = 512


class ResponseHeads:
    """Builds response heads; ``extra`` headers go on every one.

    Raises (from ``head``): ``h11.LocalProtocolError`` for an illegal header, as h11 would.
    """

    __slots__ = ("_lines", "_extra")

    def __init__(self, extra: Sequence[tuple[bytes, bytes]] = ()):
        self._lines: dict[tuple[bytes, bytes], bytes] = {}
        self._extra = b"".join(self._line(name, value) for name, value in extra)

    def head(
        self,
        conn: h11.Connection,
        status: int,
        headers: Sequence[tuple[bytes, bytes]],
        *,
        close: bool = False,
    ) -> bytes:
        """The bytes of the head of a response to ``conn``'s request (h11 moves on to its body);
        ``close``: the connection closes after it."""
        framing: list[tuple[bytes, bytes]] = []
        lines = []
        cached = self._lines
        for header in headers:
            line = cached.get(header)
            if line is None:
                if header[0].lower() in _H11_READS:
                    framing.append(header)
                    continue
                line = self._line(*header)
            lines.append(line)
        if close:
            framing.append((b"connection", b"close"))
        # h11's head ends with the blank line: ours go before it.
        head = conn.send(h11.Response(status_code=status, headers=framing))
        assert head is not None and head.endswith(b"\r\n\r\n")
        return b"%b%b%b\r\n" % (head[:-2], b"".join(lines), self._extra)

    def _line(self, name: bytes, value: bytes) -> bytes:
        h11.Response(status_code=200, headers=[(name, value)])  # validates, or raises
        if len(self._lines) >= _MOST_LINES:
            self._lines.clear()
        line = self._lines[name, value] = b"%b: %b\r\n" % (name, value)
        return line

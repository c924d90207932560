"""Server-sent events: the incremental decoder the clients read streams with, and the encoder
the mock provider and the gateway write them with."""

from __future__ import annotations

from typing import NamedTuple


class ServerSentEvent(NamedTuple):
    """One dispatched server-sent event: its ``event`` name (``message`` when unnamed) and its
    ``data`` (the ``data:`` lines joined by newlines)."""

    event: str
    data: str


class SSEDecoder:
    """An incremental parser of ``text/event-stream`` bytes.

    Feed it the body's bytes as they arrive, in chunks of any size; it returns the events
    completed by each chunk. It follows the WHATWG rules that matter to LLM APIs: ``\\n``,
    ``\\r\\n`` and ``\\r`` line ends (also split across chunks), multi-line ``data``, ``event``
    names, comments (``:`` lines, used as keep-alives) and a blank line dispatching an event.
    ``id`` and ``retry`` are ignored. When the body ends, ``close`` returns an event whose lines
    were complete but which no blank line dispatched (a lenient reading of servers that end
    their last event early); a half-received line is discarded.

    Raises:
        UnicodeDecodeError: a line is not valid UTF-8.
    """

    __slots__ = ("_buffer", "_event", "_data", "_skip_lf")

    def __init__(self) -> None:
        self._buffer = b""
        self._event = ""
        self._data: list[str] = []
        self._skip_lf = False

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        """Parse one chunk; return the events it completed (often none, often one)."""
        if not chunk:
            return []  # and a "\r" that ended the previous chunk still waits for its "\n"
        if self._skip_lf:
            # The previous chunk ended in "\r": a "\n" starting this one belongs to that line end.
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        buffer = self._buffer + chunk if self._buffer else chunk
        end = max(buffer.rfind(b"\n"), buffer.rfind(b"\r"))
        if end < 0:
            self._buffer = buffer
            return []
        if end == len(buffer) - 1:
            self._buffer = b""
            self._skip_lf = buffer[end] == 0x0D
        else:
            self._buffer = buffer[end + 1 :]
        events: list[ServerSentEvent] = []
        for line in buffer[: end + 1].splitlines():
            self._line(line, events)
        return events

    def close(self) -> list[ServerSentEvent]:
        """The body ended: return the last event if its lines were whole but undispatched."""
        self._buffer = b""
        events: list[ServerSentEvent] = []
        self._line(b"", events)
        return events

    def _line(self, line: bytes, events: list[ServerSentEvent]) -> None:
        if not line:
            if self._data:
                events.append(ServerSentEvent(self._event or "message", "\n".join(self._data)))
                self._data = []
            self._event = ""
        elif line.startswith(b"data: "):
            self._data.append(line[6:].decode())
        elif line[0] == 0x3A:  # ":" starts a comment
            return
        else:
            field, colon, value = line.partition(b":")
            if colon and value[:1] == b" ":
                value = value[1:]
            if field == b"data":
                self._data.append(value.decode())
            elif field == b"event":
                self._event = value.decode()


def encode_event(data: str, event: str | None = None, *, newline: str = "\n") -> bytes:
    """One server-sent event: an optional ``event:`` line, one ``data:`` line, a blank line.

    ``data`` must be a single line (JSON written without indentation is). ``newline`` is the
    line end (Gemini writes ``\r\n``).
    """
    head = f"event: {event}{newline}" if event is not None else ""
    return f"{head}data: {data}{newline}{newline}".encode()

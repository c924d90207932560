"""Server-sent events: the incremental decoder the clients read streams with, and the encoder
the mock provider and the gateway write them with."""

from __future__ import annotations

from typing import NamedTuple

from ._errors import MalformedStream


class ServerSentEvent(NamedTuple):
    """One dispatched server-sent event: its ``event`` name (``message`` when unnamed) and its
    ``data`` (the ``data:`` lines joined by newlines)."""

    event: str
    data: str


#: The longest SSE line a decoder accepts unless told otherwise (``max_line_bytes``).
MAX_SSE_LINE_BYTES = 4 << 20

#: The largest event (its ``data`` lines together) a decoder accepts unless told otherwise.
MAX_EVENT_BYTES = 4 << 20


class SSEDecoder:
    """An incremental parser of ``text/event-stream`` bytes.

    Feed it the body's bytes as they arrive, in chunks of any size; it returns the events
    completed by each chunk. It follows the WHATWG rules that matter to LLM APIs: ``\\n``,
    ``\\r\\n`` and ``\\r`` line ends (also split across chunks), multi-line ``data``, ``event``
    names, comments (``:`` lines, used as keep-alives) and a blank line dispatching an event.
    ``id`` and ``retry`` are ignored. When the body ends, ``close`` returns an event whose lines
    were complete but which no blank line dispatched (a lenient reading of servers that end
    their last event early); a half-received line is discarded.

    A line in progress is kept as a list of its chunks and joined once, when its end arrives:
    a line of N bytes costs O(N) however it is cut, and it is refused as soon as it is longer
    than ``max_line_bytes`` (so a line that never ends costs at most that much memory).

    Args:
        max_line_bytes: the longest line accepted (default ``MAX_SSE_LINE_BYTES``).
        max_event_bytes: the largest event accepted, its ``data`` lines together (default
            ``MAX_EVENT_BYTES``).

    Raises:
        MalformedStream: ``sse_line_too_long`` or ``event_too_large`` (from ``feed``).
        UnicodeDecodeError: a line is not valid UTF-8.
    """

    __slots__ = (
        "_parts",
        "_pending",
        "_event",
        "_data",
        "_data_size",
        "_skip_lf",
        "max_line_bytes",
        "max_event_bytes",
    )

    def __init__(
        self, *, max_line_bytes: int = MAX_SSE_LINE_BYTES, max_event_bytes: int = MAX_EVENT_BYTES
    ) -> None:
        if max_line_bytes < 1 or max_event_bytes < 1:
            raise ValueError("max_line_bytes, max_event_bytes: expected positive sizes")
        self.max_line_bytes = max_line_bytes
        self.max_event_bytes = max_event_bytes
        self._parts: list[bytes] = []  # the line in progress, in the chunks it came in
        self._pending = 0  # their total size
        self._event = ""
        self._data: list[str] = []
        self._data_size = 0
        self._skip_lf = False

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        """Parse one chunk; return the events it completed (often none, often one).

        Raises:
            MalformedStream: ``sse_line_too_long`` / ``event_too_large``; the decoder is then
                spent (the stream must be abandoned).
        """
        if not chunk:
            return []  # and a "\r" that ended the previous chunk still waits for its "\n"
        if self._skip_lf:
            # The previous chunk ended in "\r": a "\n" starting this one belongs to that line end.
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
                if not chunk:
                    return []
        # Only the new chunk is searched: the line in progress has no line end.
        end = max(chunk.rfind(b"\n"), chunk.rfind(b"\r"))
        if end < 0:
            self._parts.append(chunk)
            self._pending += len(chunk)
            if self._pending > self.max_line_bytes:
                self._too_long()
            return []
        if self._parts:
            self._parts.append(chunk)
            buffer = b"".join(self._parts)
            end += self._pending
            self._parts = []
            self._pending = 0
        else:
            buffer = chunk
        rest = len(buffer) - end - 1
        if rest:
            tail = buffer[end + 1 :]
            self._parts.append(tail)
            self._pending = rest
            if rest > self.max_line_bytes:
                self._too_long()
        else:
            self._skip_lf = buffer[end] == 0x0D
        events: list[ServerSentEvent] = []
        lines = buffer[: end + 1].splitlines()
        if end >= self.max_line_bytes and max(map(len, lines)) > self.max_line_bytes:
            self._too_long()
        for line in lines:
            # ``_line``, its two common cases inlined: a ``data:`` line and an event's end.
            if line.startswith(b"data: "):
                self._data_size += len(line) - 6
                if self._data_size > self.max_event_bytes:
                    self._data_line(b"")  # raises event_too_large
                self._data.append(line[6:].decode())
            elif not line and self._data and not self._event:
                events.append(ServerSentEvent("message", "\n".join(self._data)))
                self._data = []
                self._data_size = 0
            else:
                self._line(line, events)
        return events

    def close(self) -> list[ServerSentEvent]:
        """The body ended: return the last event if its lines were whole but undispatched."""
        self._parts = []
        self._pending = 0
        events: list[ServerSentEvent] = []
        self._line(b"", events)
        return events

    def _too_long(self) -> None:
        self._parts = []
        self._pending = 0
        raise MalformedStream(
            "sse_line_too_long", f"an SSE line longer than {self.max_line_bytes} bytes"
        )

    def _data_line(self, value: bytes) -> None:
        self._data_size += len(value)
        if self._data_size > self.max_event_bytes:
            raise MalformedStream(
                "event_too_large", f"an SSE event larger than {self.max_event_bytes} bytes"
            )
        self._data.append(value.decode())

    def _line(self, line: bytes, events: list[ServerSentEvent]) -> None:
        if not line:
            if self._data:
                events.append(ServerSentEvent(self._event or "message", "\n".join(self._data)))
                self._data = []
                self._data_size = 0
            self._event = ""
        elif line.startswith(b"data: "):
            self._data_line(line[6:])
        elif line[0] == 0x3A:  # ":" starts a comment
            return
        else:
            field, colon, value = line.partition(b":")
            if colon and value[:1] == b" ":
                value = value[1:]
            if field == b"data":
                self._data_line(value)
            elif field == b"event":
                self._event = value.decode()


def encode_event(data: str, event: str | None = None, *, newline: str = "\n") -> bytes:
    """One server-sent event: an optional ``event:`` line, one ``data:`` line, a blank line.

    ``data`` must be a single line (JSON written without indentation is). ``newline`` is the
    line end (Gemini writes ``\r\n``).
    """
    head = f"event: {event}{newline}" if event is not None else ""
    return f"{head}data: {data}{newline}{newline}".encode()

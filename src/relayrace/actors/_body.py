"""Reading a provider's response body within limits.

A provider may send anything: a body of gigabytes, a small gzip that inflates to gigabytes, a
line that never ends. Bodies are read as they arrive (as sent, ``Response.aiter_raw``, when
encoded), counted, and refused past their limit; nothing is ever read whole without a cap.

The clients ask for ``accept-encoding: identity`` (``_transport``), so a provider that follows
HTTP sends its body as it is. One that compresses anyway (``gzip``, ``deflate``) is inflated
here, at most ``PIECE`` bytes at a time, and the *inflated* bytes count against the limit;
past its first ``RATIO_FLOOR`` bytes it may inflate to at most ``MAX_RATIO`` times what it took
(a bomb is refused after ~1 MiB, not after the whole limit: inflating 16 MiB of a bomb costs
~50-65 ms of CPU, which back-to-back bombs took from every other request). Any other encoding
is refused (``unsupported_encoding``).
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator, Iterator

import httpx
import trio

from ..providers import MalformedStream

#: The default limit of a whole (non-streamed) body, inflated.
MAX_BODY_BYTES = 16 << 20

#: At most this many inflated bytes are produced from compressed input at a time.
PIECE = 256 << 10

#: Past ``RATIO_FLOOR`` inflated bytes, a compressed body may inflate to at most this many times
#: the compressed bytes it took (JSON and SSE compress 3-50×; deflate's most is ~1030×).
MAX_RATIO = 200
RATIO_FLOOR = 1 << 20

_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


class Inflater:
    """Inflates a ``gzip`` / ``deflate`` body in pieces of at most ``PIECE`` bytes, so that a
    small compressed chunk never becomes a large buffer."""

    __slots__ = ("_inflate", "_taken", "_given")

    def __init__(self, encoding: str):
        self._inflate = zlib.decompressobj(_WBITS[encoding])
        self._taken = 0  # compressed bytes inflated so far
        self._given = 0  # inflated bytes produced so far

    def pieces(self, data: bytes) -> Iterator[bytes]:
        """The inflated bytes of ``data``, piece by piece.

        Raises:
            MalformedStream: ``decoding_error``, the data is not what its encoding says;
                ``response_too_large``, it inflates past ``MAX_RATIO`` (after ``RATIO_FLOOR``).
        """
        inflate = self._inflate
        while data and not inflate.eof:
            try:
                out = inflate.decompress(data, PIECE)
            except zlib.error as exc:
                raise MalformedStream(
                    "decoding_error", f"cannot inflate the body ({exc})"
                ) from None
            self._taken += len(data) - len(inflate.unconsumed_tail)
            data = inflate.unconsumed_tail
            self._given += len(out)
            if self._given > RATIO_FLOOR and self._given > MAX_RATIO * self._taken:
                raise MalformedStream(
                    "response_too_large",
                    f"a compressed body inflating to more than {MAX_RATIO}× its size",
                )
            if out:
                yield out


def inflater_for(response: httpx.Response) -> Inflater | None:
    """The inflater a response's ``content-encoding`` needs (``None`` for none).

    Raises:
        MalformedStream: ``unsupported_encoding``, an encoding other than gzip or deflate.
    """
    encoding = response.headers.get("content-encoding", "").strip().lower()
    if not encoding or encoding == "identity":
        return None
    if encoding in _WBITS:
        return Inflater(encoding)
    raise MalformedStream(
        "unsupported_encoding", f"a body in content-encoding {encoding[:40]!r} (identity asked)"
    )


def pieces_of(chunk: bytes, inflater: Inflater | None) -> Iterator[bytes] | tuple[bytes]:
    """The body bytes a raw chunk stands for."""
    return (chunk,) if inflater is None else inflater.pieces(chunk)


def chunks_of(response: httpx.Response, inflater: Inflater | None) -> AsyncIterator[bytes]:
    """The body's chunks as they arrive, as sent (an identity body, or for ``inflater``); a
    body read already (``httpx.MockTransport``'s) as httpx gives it. (``aiter_bytes`` of an
    identity body gives the same bytes, through one more generator, decoder and chunker that a
    stream in flight would hold.)"""
    if inflater is None and response.is_stream_consumed:
        return response.aiter_bytes()
    return response.aiter_raw()


def too_large(limit: int) -> MalformedStream:
    """The failure of a body past ``limit`` bytes."""
    return MalformedStream("response_too_large", f"a response body larger than {limit} bytes")


async def read_whole(response: httpx.Response, limit: int) -> bytes:
    """The whole body, inflated, refused as soon as it is past ``limit`` bytes.

    Raises:
        MalformedStream: ``response_too_large`` (also at once, from a ``content-length`` past
            the limit of a body that is not encoded), ``unsupported_encoding``,
            ``decoding_error``. The connection is then closed, not pooled.
    """
    inflater = inflater_for(response)
    length = response.headers.get("content-length", "")
    if inflater is None and length.isdigit() and int(length) > limit:
        raise too_large(limit)
    parts: list[bytes] = []
    size = 0
    chunks = chunks_of(response, inflater)
    try:
        async for chunk in chunks:
            for piece in pieces_of(chunk, inflater):
                size += len(piece)
                if size > limit:
                    raise too_large(limit)
                parts.append(piece)
                if inflater is not None:
                    # Inflating is CPU work without an await: a small chunk of a bomb is up
                    # to ``limit`` bytes of it. Other tasks run between its pieces.
                    await trio.lowlevel.checkpoint()
    finally:
        await abandon(chunks)
    return b"".join(parts)


async def read_at_most(response: httpx.Response, limit: int) -> bytes:
    """The first ``limit`` bytes of the body, inflated (an error body: a longer one is cut).
    An encoding that cannot be read gives what was read (nothing)."""
    try:
        inflater = inflater_for(response)
    except MalformedStream:
        return b""
    parts: list[bytes] = []
    size = 0
    chunks = chunks_of(response, inflater)
    try:
        async for chunk in chunks:
            for piece in pieces_of(chunk, inflater):
                parts.append(piece)
                size += len(piece)
                if size >= limit:
                    break
            if size >= limit:
                break
    except MalformedStream:
        pass  # a corrupt error body: keep what was inflated
    finally:
        await abandon(chunks)
    return b"".join(parts)[:limit]


async def abandon(chunks: AsyncIterator[bytes]) -> None:
    """Unwind an httpx body iterator that will not be read to its end.

    httpx's body iterators are async generators nested several deep: closing the outer one
    leaves the inner ones to the garbage collector, and trio warns about each. A read that is
    cancelled at once unwinds the whole chain instead (an exhausted one is left as it is). The
    connection is then closed rather than pooled.
    """
    with trio.CancelScope() as scope:
        scope.cancel()
        async for _ in chunks:
            pass

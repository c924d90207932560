"""Limits on what a provider may send (issue #11): the SSE decoder's line and event limits and
its linear cost, the whole-body cap (also inflated), resource exhaustion at connect, and the
configuration keys of the limits."""

from __future__ import annotations

import errno
import gzip
import json
import time
from typing import Any

import httpx
import pytest
import trio

from relayrace import Category, ProviderError, Request, load_config
from relayrace.actors import ClientCall, OpenAIClient
from relayrace.providers import MAX_EVENT_BYTES, MAX_SSE_LINE_BYTES, MalformedStream, SSEDecoder

MiB = 1 << 20
KEY = "test-key-0123456789-abcdef"


# --- the SSE decoder ----------------------------------------------------------------------------


def test_a_line_past_the_limit_is_refused_whole_or_in_pieces() -> None:
    decoder = SSEDecoder(max_line_bytes=100)
    assert decoder.feed(b"data: " + b"a" * 94) == []  # exactly 100: still a line in progress
    with pytest.raises(MalformedStream) as caught:
        decoder.feed(b"a")
    assert caught.value.code == "sse_line_too_long"
    with pytest.raises(MalformedStream) as caught:
        SSEDecoder(max_line_bytes=100).feed(b"data: " + b"a" * 200 + b"\n\n")
    assert caught.value.code == "sse_line_too_long"
    # A line at the limit passes.
    line = b"data: " + b"a" * 94
    assert SSEDecoder(max_line_bytes=100).feed(line + b"\n\n")[0].data == "a" * 94


def test_an_event_past_the_limit_is_refused() -> None:
    decoder = SSEDecoder(max_line_bytes=100, max_event_bytes=150)
    assert decoder.feed(b"data: " + b"a" * 80 + b"\n") == []
    with pytest.raises(MalformedStream) as caught:
        decoder.feed(b"data: " + b"b" * 80 + b"\n")
    assert caught.value.code == "event_too_large"
    # Each event counts on its own.
    decoder = SSEDecoder(max_line_bytes=100, max_event_bytes=150)
    for _ in range(10):
        assert len(decoder.feed(b"data: " + b"a" * 80 + b"\n\n")) == 1


def test_the_default_limits() -> None:
    decoder = SSEDecoder()
    assert decoder.max_line_bytes == MAX_SSE_LINE_BYTES <= 4 * MiB
    assert decoder.max_event_bytes == MAX_EVENT_BYTES <= 4 * MiB


def test_a_long_line_in_small_chunks_costs_linear_time() -> None:
    # Copying the line in progress on every chunk (the old decoder) costs ~N²/chunk: 8 MiB in
    # 1 KiB chunks was ~32 GiB of copying, seconds of CPU; reading it once is milliseconds.
    size = 8 * MiB
    decoder = SSEDecoder(max_line_bytes=2 * size, max_event_bytes=2 * size)
    chunk = b"a" * 1024
    cpu = time.process_time()
    assert decoder.feed(b"data: ") == []
    for _ in range(size // len(chunk)):
        decoder.feed(chunk)
    events = decoder.feed(b"\n\n")
    cpu = time.process_time() - cpu
    assert len(events) == 1 and len(events[0].data) == size
    assert cpu < 1.0, f"{cpu:.2f} s of CPU for one {size // MiB} MiB line"


def test_a_line_that_never_ends_is_refused_at_the_limit() -> None:
    decoder = SSEDecoder(max_line_bytes=64 * 1024)
    fed = 0
    with pytest.raises(MalformedStream):
        for _ in range(1000):
            decoder.feed(b"a" * 1000)
            fed += 1000
    assert fed <= 64 * 1024


# --- a client's limits --------------------------------------------------------------------------


class Chunks(httpx.AsyncByteStream):
    """A body of ``count`` chunks, counting what was read."""

    def __init__(self, first: bytes, chunk: bytes, count: int):
        self.first, self.chunk, self.count = first, chunk, count
        self.read = 0

    async def __aiter__(self):  # type: ignore[override]
        yield self.first
        for _ in range(self.count):
            await trio.lowlevel.checkpoint()
            self.read += len(self.chunk)
            yield self.chunk


def call(stream: bool = False) -> ClientCall:
    return ClientCall(
        request=Request("m", [{"role": "user", "content": "hi"}]),
        model="gpt",
        stream=stream,
        actor="a",
    )


class Sink:
    def __init__(self) -> None:
        self.deltas: list[str] = []

    async def delta(self, text: str) -> None:
        self.deltas.append(text)

    def progress(self) -> None:
        pass


async def fail(client: OpenAIClient, *, stream: bool = False) -> ProviderError:
    with pytest.raises(ProviderError) as caught:
        await client.call(call(stream), Sink())
    await client.aclose()
    return caught.value


async def test_a_whole_body_past_max_body_bytes_fails_without_reading_on() -> None:
    body = Chunks(b'{"choices":[{"message":{"content":"', b"a" * 4096, 10_000)
    headers = {"content-type": "application/json"}
    transport = httpx.MockTransport(lambda r: httpx.Response(200, headers=headers, stream=body))
    client = OpenAIClient(api_key=KEY, transport=transport, max_body_bytes=64 * 1024)
    error = await fail(client)
    assert error.failure.category is Category.STREAM_ERROR
    assert error.failure.code == "response_too_large"
    assert body.read <= 64 * 1024 + 4096


async def test_a_content_length_past_the_limit_is_refused_before_reading() -> None:
    body = Chunks(b"{", b"a" * 4096, 100)
    headers = {"content-type": "application/json", "content-length": str(1 << 31)}
    transport = httpx.MockTransport(lambda r: httpx.Response(200, headers=headers, stream=body))
    error = await fail(OpenAIClient(api_key=KEY, transport=transport))
    assert error.failure.code == "response_too_large"
    assert body.read == 0


async def test_the_clients_ask_for_identity_and_count_a_gzip_body_inflated() -> None:
    seen: list[httpx.Request] = []
    answer = {
        "model": "gpt",
        "choices": [{"message": {"content": "a" * 100_000}, "finish_reason": "stop"}],
    }
    packed = gzip.compress(json.dumps(answer).encode())

    def respond(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        headers = {"content-type": "application/json", "content-encoding": "gzip"}
        return httpx.Response(200, headers=headers, stream=Chunks(packed, b"", 0))

    transport = httpx.MockTransport(respond)
    # Small on the wire (~400 bytes), past the limit inflated.
    error = await fail(OpenAIClient(api_key=KEY, transport=transport, max_body_bytes=50_000))
    assert len(packed) < 50_000 and error.failure.code == "response_too_large"
    assert seen[0].headers["accept-encoding"] == "identity"
    # Within the limit, a body compressed anyway is read as it should be.
    client = OpenAIClient(api_key=KEY, transport=transport)
    sink = Sink()
    await client.call(call(), sink)
    await client.aclose()
    assert "".join(sink.deltas) == "a" * 100_000


async def test_an_unknown_content_encoding_is_refused() -> None:
    headers = {"content-type": "application/json", "content-encoding": "br"}
    transport = httpx.MockTransport(
        lambda r: httpx.Response(200, headers=headers, stream=Chunks(b"xx", b"", 0))
    )
    error = await fail(OpenAIClient(api_key=KEY, transport=transport))
    assert error.failure.category is Category.STREAM_ERROR
    assert error.failure.code == "unsupported_encoding"


async def test_a_stream_line_past_max_sse_line_bytes_fails() -> None:
    body = Chunks(b'data: {"choices":[{"delta":{"content":"', b"a" * 4096, 10_000)
    headers = {"content-type": "text/event-stream"}
    transport = httpx.MockTransport(lambda r: httpx.Response(200, headers=headers, stream=body))
    client = OpenAIClient(api_key=KEY, transport=transport, max_sse_line_bytes=100_000)
    error = await fail(client, stream=True)
    assert error.failure.category is Category.STREAM_ERROR
    assert error.failure.code == "sse_line_too_long"
    assert body.read <= 100_000 + 4096


@pytest.mark.parametrize(
    ("number", "category", "code"),
    [
        (errno.EMFILE, Category.LOCAL_CAPACITY, "local_resources"),
        (errno.ENFILE, Category.LOCAL_CAPACITY, "local_resources"),
        (errno.ENOMEM, Category.LOCAL_CAPACITY, "local_resources"),
        (errno.ENOBUFS, Category.LOCAL_CAPACITY, "local_resources"),
        (errno.EACCES, Category.NETWORK, "os_error"),
    ],
)
async def test_an_os_error_at_connect_is_classified_never_a_crash(
    number: int, category: Category, code: str
) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise OSError(number, "refused")

    error = await fail(OpenAIClient(api_key=KEY, transport=httpx.MockTransport(refuse)))
    assert (error.failure.category, error.failure.code) == (category, code)


async def test_emfile_wrapped_by_httpx_as_a_connect_error_is_local_capacity() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        try:
            raise OSError(errno.EMFILE, "Too many open files")
        except OSError as exc:
            raise httpx.ConnectError("[Errno 24] Too many open files") from exc

    error = await fail(OpenAIClient(api_key=KEY, transport=httpx.MockTransport(refuse)))
    assert error.failure.category is Category.LOCAL_CAPACITY


def test_the_limits_are_config_keys() -> None:
    data: dict[str, Any] = {
        "providers": [
            {
                "name": "a",
                "kind": "openai",
                "base_url": "http://127.0.0.1:1/v1",
                "max_body_bytes": 1000,
                "max_sse_line_bytes": 2000,
                "max_event_bytes": 3000,
            }
        ]
    }
    client = load_config(data, env=False).providers[0].client
    assert isinstance(client, OpenAIClient)
    assert (client.max_body_bytes, client.max_sse_line_bytes, client.max_event_bytes) == (
        1000,
        2000,
        3000,
    )
    data["providers"][0]["max_body_bytes"] = 0
    with pytest.raises(Exception, match="max_body_bytes"):
        load_config(data, env=False)

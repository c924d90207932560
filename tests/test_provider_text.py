"""Text from a provider is checked and masked where it enters (issue #11 rows 1 and 7): the
streaming secret filter, the forms of a secret, a lone surrogate as ``malformed_text``, and the
httpx / httpcore loggers."""

from __future__ import annotations

import base64
import json
import logging
import urllib.parse

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayrace import Category, ProviderError, Request
from relayrace._redact import REDACTED, SecretFilter, redact, secret_forms
from relayrace.actors import ClientCall, OpenAIClient

KEY = "test-key-0123456789-abcdef"
FORMS = secret_forms([KEY])
LONGEST = max(map(len, FORMS))


def through(pieces: list[str], forms: tuple[str, ...] = FORMS) -> tuple[str, int]:
    """The text a filter passes on for ``pieces``, and the most it ever held back."""
    mask = SecretFilter(forms)
    out, held, given_in = [], 0, 0
    for piece in pieces:
        given_in += len(piece)
        passed = mask.feed(piece)
        out.append(passed)
        held = max(held, given_in - sum(map(len, out)))
    out.append(mask.flush())
    return "".join(out), held


def split(text: str, cuts: list[int]) -> list[str]:
    bounds = [0, *sorted(c % (len(text) + 1) for c in cuts), len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


KEYISH = st.text(alphabet="test-key0123456789abcdefXYZ +/=", max_size=60)


@given(KEYISH, KEYISH, st.sampled_from(FORMS), st.lists(st.integers(0, 200), max_size=12))
def test_a_secret_split_anywhere_never_leaks(
    before: str, after: str, form: str, cuts: list[int]
) -> None:
    text = before + form + after
    out, held = through(split(text, cuts))
    assert KEY not in out and form not in out
    assert REDACTED in out


@given(st.text(max_size=80), st.lists(st.integers(0, 200), max_size=12))
def test_text_without_a_secret_passes_unchanged_holding_back_little(
    text: str, cuts: list[int]
) -> None:
    if any(form in text for form in FORMS):
        return
    out, held = through(split(text, cuts))
    assert out == text
    assert held <= LONGEST - 1


def test_text_that_looks_like_a_key_start_is_held_then_passed_on() -> None:
    mask = SecretFilter(FORMS)
    assert mask.feed("say test-ke") == "say "
    assert mask.feed("ttle") == "test-kettle"
    assert mask.feed("done") == "done"
    assert mask.flush() == ""


@pytest.mark.parametrize("shift", [0, 1, 2])
def test_the_key_base64_encoded_at_any_alignment_is_masked(shift: int) -> None:
    text = base64.b64encode(b"x" * shift + KEY.encode() + b"tail").decode()
    assert REDACTED in redact(text, FORMS)
    assert REDACTED in through([text])[0]


def test_the_key_url_encoded_is_masked() -> None:
    key = "k3y/with+symbols=="
    assert redact(f"?k={urllib.parse.quote(key, safe='')}", secret_forms([key])) == f"?k={REDACTED}"


# --- through a client -----------------------------------------------------------------------------


class Sink:
    def __init__(self) -> None:
        self.deltas: list[str] = []

    async def delta(self, text: str) -> None:
        self.deltas.append(text)

    def progress(self) -> None:
        pass


def call(stream: bool) -> ClientCall:
    return ClientCall(
        request=Request("m", [{"role": "user", "content": "hi"}]),
        model="gpt",
        stream=stream,
        actor="a",
    )


def chunk(content: str, model: str = "gpt") -> bytes:
    body = {"model": model, "choices": [{"index": 0, "delta": {"content": content}}]}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def stream_of(*events: bytes) -> httpx.MockTransport:
    finish = (
        b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
    )
    body = b"".join(events) + finish
    headers = {"content-type": "text/event-stream"}
    return httpx.MockTransport(lambda r: httpx.Response(200, headers=headers, content=body))


async def test_a_key_split_across_deltas_and_echoed_as_model_never_reaches_the_sink() -> None:
    b64 = base64.b64encode(KEY.encode()).decode()
    transport = stream_of(
        chunk("your key is " + KEY[:7], model=KEY),
        chunk(KEY[7:] + " and ", model=KEY),
        chunk(b64[:5], model=KEY),
        chunk(b64[5:] + "!", model=KEY),
    )
    client = OpenAIClient(api_key=KEY, transport=transport)
    sink = Sink()
    completion = await client.call(call(True), sink)
    await client.aclose()
    text = "".join(sink.deltas)
    assert text == f"your key is {REDACTED} and {REDACTED}!"
    assert completion.model == REDACTED


@pytest.mark.parametrize(
    "raw",
    [
        b'data: {"choices":[{"index":0,"delta":{"content":"\\ud800"}}]}\n\n',
        b'data: {"model":"\\udfff","choices":[{"index":0,"delta":{"content":"x"}}]}\n\n',
    ],
)
async def test_a_lone_surrogate_from_the_provider_is_malformed_text_before_anything_passes(
    raw: bytes,
) -> None:
    client = OpenAIClient(api_key=KEY, transport=stream_of(raw))
    sink = Sink()
    with pytest.raises(ProviderError) as caught:
        await client.call(call(True), sink)
    await client.aclose()
    assert (caught.value.failure.category, caught.value.failure.code) == (
        Category.STREAM_ERROR,
        "malformed_text",
    )
    assert sink.deltas == []
    (caught.value.failure.message or "").encode()


async def test_a_surrogate_pair_is_fine() -> None:
    raw = b'data: {"choices":[{"index":0,"delta":{"content":"\\ud83d\\ude00"}}]}\n\n'
    client = OpenAIClient(api_key=KEY, transport=stream_of(raw))
    sink = Sink()
    await client.call(call(True), sink)
    await client.aclose()
    assert sink.deltas == ["\U0001f600"]


async def test_an_error_message_with_a_lone_surrogate_is_malformed_text() -> None:
    body = b'{"error":{"message":"bad \\ud800","type":"server_error","code":null}}'
    transport = httpx.MockTransport(
        lambda r: httpx.Response(500, headers={"content-type": "application/json"}, content=body)
    )
    client = OpenAIClient(api_key=KEY, transport=transport)
    with pytest.raises(ProviderError) as caught:
        await client.call(call(False), Sink())
    await client.aclose()
    failure = caught.value.failure
    assert (failure.category, failure.code, failure.status) == (
        Category.STREAM_ERROR,
        "malformed_text",
        500,
    )
    (failure.message or "").encode()


def test_a_client_quiets_httpx_loggers_unless_a_level_was_chosen() -> None:
    httpx_logger, httpcore_logger = logging.getLogger("httpx"), logging.getLogger("httpcore")
    saved = httpx_logger.level, httpcore_logger.level
    try:
        httpx_logger.setLevel(logging.NOTSET)
        httpcore_logger.setLevel(logging.DEBUG)  # the user asked for it
        OpenAIClient(api_key=KEY)
        assert httpx_logger.level == logging.WARNING
        assert httpcore_logger.level == logging.DEBUG
    finally:
        httpx_logger.setLevel(saved[0])
        httpcore_logger.setLevel(saved[1])

"""The wire formats round-trip: what each format's encoder writes, its reader reads back, and
every error body it writes classifies to the category it was written for."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import relayrace.providers
from relayrace import Category, Request, Usage, classify
from relayrace.providers import (
    ERROR_KINDS,
    FORMATS,
    AnthropicReader,
    GeminiReader,
    OpenAIReader,
    Reader,
    SSEDecoder,
    UpstreamErrorBody,
    anthropic,
    gemini,
    openai,
)

MODELS = st.from_regex(r"[a-z][a-z0-9.-]{0,20}", fullmatch=True)
TEXTS = st.lists(st.text(max_size=20), max_size=8)
USAGES = st.builds(
    Usage, prompt_tokens=st.integers(1, 10**6), completion_tokens=st.integers(1, 10**6)
)
FINISH = st.sampled_from(["stop", "length", "tool_calls"])
# Ways to cut a body into the chunks it arrives in.
CUTS = st.lists(st.integers(1, 64), max_size=20)


def read_stream(reader: Reader, body: bytes, cuts: list[int]) -> str:
    """Feed ``body`` to an SSE decoder in chunks of the ``cuts`` sizes; the text read."""
    decoder = SSEDecoder()
    text: list[str] = []
    chunks: list[bytes] = []
    rest = body
    for size in cuts:
        chunks.append(rest[:size])
        rest = rest[size:]
    chunks.append(rest)
    for chunk in chunks:
        for event in decoder.feed(chunk):
            text.append(reader.event(event) or "")
    for event in decoder.close():
        text.append(reader.event(event) or "")
    return "".join(text)


def errors_of(body: bytes) -> Any:
    """The body a reader raised as an error, read from a one-event stream."""
    reader = OpenAIReader("m")
    with pytest.raises(UpstreamErrorBody) as info:
        read_stream(reader, body, [])
    return info.value.body


# --- OpenAI -----------------------------------------------------------------------------------


@given(MODELS, st.text(), FINISH, USAGES)
def test_openai_whole_answer_round_trips(model, text, finish, usage) -> None:
    body = openai.completion(
        id="chatcmpl-1", created=1, model=model, text=text, finish_reason=finish, usage=usage
    )
    reader = OpenAIReader("asked")
    assert reader.whole(json.loads(json.dumps(body))) == text
    assert (reader.model, reader.usage, reader.finish_reason) == (model, usage, finish)
    assert reader.finished


@given(MODELS, TEXTS, FINISH, USAGES, st.booleans(), CUTS)
def test_openai_stream_round_trips(model, deltas, finish, usage, include_usage, cuts) -> None:
    encoder = openai.StreamEncoder("chatcmpl-1", 1, include_usage)
    body = encoder.opening(model)
    for i, text in enumerate(deltas):
        body += encoder.content(model, text, first=i == 0)
    body += encoder.closing(model, finish, usage)
    reader = OpenAIReader("asked")
    assert read_stream(reader, body, cuts) == "".join(deltas)
    assert reader.finished and reader.terminated
    assert reader.model == model and reader.finish_reason == finish
    assert reader.usage == (usage if include_usage else None)


@given(MODELS, st.text(), st.booleans())
def test_openai_content_event_is_the_chunk_it_stands_for(model, text, first) -> None:
    encoder = openai.StreamEncoder("chatcmpl-0a1b", 1700000000, first)
    delta = {"role": "assistant", "content": text} if first else {"content": text}
    assert encoder.content(model, text, first=first) == openai.event(
        encoder.chunk(model, delta, None)
    )


def test_openai_stream_encoder_writes_the_gateways_bytes() -> None:
    """Byte for byte what the gateway's chunk encoder wrote before it used this one."""
    encoder = openai.StreamEncoder("chatcmpl-0a1b", 1700000000, True)
    assert encoder.content("gpt-x", 'hé "q"\n', first=True) == (
        b'data: {"id":"chatcmpl-0a1b","object":"chat.completion.chunk","created":1700000000,'
        b'"model":"gpt-x","system_fingerprint":null,"choices":[{"index":0,"delta":{"role":'
        b'"assistant","content":"h\xc3\xa9 \\"q\\"\\n"},"logprobs":null,"finish_reason":null}],'
        b'"usage":null}\n\n'
    )
    assert encoder.content("gpt-y", "x") == (
        b'data: {"id":"chatcmpl-0a1b","object":"chat.completion.chunk","created":1700000000,'
        b'"model":"gpt-y","system_fingerprint":null,"choices":[{"index":0,"delta":{"content":'
        b'"x"},"logprobs":null,"finish_reason":null}],"usage":null}\n\n'
    )
    plain = openai.StreamEncoder("chatcmpl-0a1b", 1700000000, False)
    assert plain.content("gpt-x", "</s>\u2028") == (
        b'data: {"id":"chatcmpl-0a1b","object":"chat.completion.chunk","created":1700000000,'
        b'"model":"gpt-x","system_fingerprint":null,"choices":[{"index":0,"delta":{"content":'
        b'"</s>\xe2\x80\xa8"},"logprobs":null,"finish_reason":null}]}\n\n'
    )
    usage = Usage(prompt_tokens=3, completion_tokens=4)
    assert encoder.usage_chunk("gpt-x", usage)["usage"] == usage.to_dict()
    assert encoder.usage_chunk("gpt-x", usage)["choices"] == []


# --- Anthropic --------------------------------------------------------------------------------


@given(MODELS, st.text(), FINISH, USAGES)
def test_anthropic_whole_answer_round_trips(model, text, finish, usage) -> None:
    body = anthropic.message(id="msg_1", model=model, text=text, finish_reason=finish, usage=usage)
    reader = AnthropicReader("asked")
    assert reader.whole(json.loads(json.dumps(body))) == text
    assert (reader.model, reader.usage, reader.finish_reason) == (model, usage, finish)


@given(MODELS, TEXTS, FINISH, USAGES, CUTS)
def test_anthropic_stream_round_trips(model, deltas, finish, usage, cuts) -> None:
    body = anthropic.opening(id="msg_1", model=model, prompt_tokens=usage.prompt_tokens)
    for text in deltas:
        body += anthropic.text_delta(text)
    body += anthropic.closing(finish, usage.completion_tokens)
    reader = AnthropicReader("asked")
    assert read_stream(reader, body, cuts) == "".join(deltas)
    assert reader.finished and reader.terminated
    assert (reader.model, reader.usage, reader.finish_reason) == (model, usage, finish)


# --- Gemini -----------------------------------------------------------------------------------


GEMINI_FINISH = st.sampled_from(["stop", "length"])


@given(MODELS, st.text(), GEMINI_FINISH, USAGES)
def test_gemini_whole_answer_round_trips(model, text, finish, usage) -> None:
    body = gemini.response(id="r", model=model, text=text, finish_reason=finish, usage=usage)
    reader = GeminiReader("asked")
    assert reader.whole(json.loads(json.dumps(body))) == text
    assert (reader.model, reader.usage, reader.finish_reason) == (model, usage, finish)


@given(MODELS, TEXTS, GEMINI_FINISH, USAGES, st.booleans(), CUTS)
def test_gemini_stream_round_trips(model, deltas, finish, usage, sse, cuts) -> None:
    framer = gemini.Framer(sse)
    body = b"".join(framer.write(gemini.response(id="r", model=model, text=t)) for t in deltas)
    last = gemini.response(id="r", model=model, text="", finish_reason=finish, usage=usage)
    body += framer.write(last) + framer.end()
    reader = GeminiReader("asked")
    if sse:
        assert read_stream(reader, body, cuts) == "".join(deltas)
    else:  # a JSON array, read whole
        assert reader.whole(json.loads(body)) == "".join(deltas)
    assert reader.finished
    assert (reader.model, reader.usage, reader.finish_reason) == (model, usage, finish)


def test_a_gemini_blocked_prompt_is_a_content_policy_failure() -> None:
    reader = GeminiReader("m")
    with pytest.raises(UpstreamErrorBody) as info:
        reader.whole(gemini.blocked(id="r", model="m", prompt_tokens=3))
    assert classify(status=200, body=info.value.body).category is Category.CONTENT_POLICY


# --- errors, every format ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(ERROR_KINDS))
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_every_error_body_classifies_to_its_kind(name: str, kind: str) -> None:
    fmt = FORMATS[name]
    status = fmt.error_status(kind)
    body = fmt.error_body(kind, "some-model", status=status, retry_after=None)
    assert classify(status=status, body=json.dumps(body)).category is ERROR_KINDS[kind]
    # The same body inside a 200 stream (an error event): the codes decide alone.
    assert classify(status=None, body=body).category is ERROR_KINDS[kind]


@given(MODELS, st.sampled_from(sorted(ERROR_KINDS)))
def test_stream_error_events_are_read_as_errors_of_their_kind(model, kind) -> None:
    events = {
        "openai": (openai.StreamEncoder("c", 1, False).error(kind, model), OpenAIReader),
        "anthropic": (anthropic.error_event(kind, model), AnthropicReader),
        "gemini": (gemini.Framer(True).write(gemini.error_body(kind, model)), GeminiReader),
    }
    assert set(events) == set(FORMATS)
    for body, reader_type in events.values():
        reader = reader_type("asked")
        with pytest.raises(UpstreamErrorBody) as info:
            read_stream(reader, body, [])
        assert classify(status=None, body=info.value.body).category is ERROR_KINDS[kind]


def test_a_gemini_retry_delay_is_read_back_as_the_wait() -> None:
    body = gemini.error_body("rate_limit", "m", retry_after=7)
    failure = classify(status=429, body=body)
    assert failure.category is Category.RATE_LIMIT and failure.retry_after == 7


def test_every_format_is_registered_and_exported() -> None:
    assert set(FORMATS) == {"openai", "anthropic", "gemini"}
    for name in relayrace.providers.__all__:
        assert hasattr(relayrace.providers, name)


# --- requests ---------------------------------------------------------------------------------

TURNS = st.lists(
    st.tuples(st.sampled_from(["user", "assistant"]), st.text(min_size=1, max_size=10)),
    min_size=1,
    max_size=6,
)


@given(st.text(max_size=10), TURNS)
def test_anthropic_and_gemini_keep_every_text_in_order(system, turns) -> None:
    messages = [{"role": "system", "content": system}] + [
        {"role": role, "content": text} for role, text in turns
    ]
    request = Request("m", messages)
    for body, key, assistant in (
        (gemini.payload(request), "contents", "model"),
        (anthropic.payload(request, model="m", stream=True), "messages", "assistant"),
    ):
        texts: list[tuple[str, str]] = []
        for turn in body[key]:
            parts = turn.get("parts", turn.get("content"))
            parts = [{"text": parts}] if isinstance(parts, str) else parts
            role = "assistant" if turn["role"] == assistant else "user"
            texts += [(role, part["text"]) for part in parts]
        expected = list(turns)
        if key == "messages" and expected[-1][0] == "assistant":
            # Anthropic refuses trailing whitespace on a final assistant turn: it is cut.
            role, text = expected[-1]
            expected[-1] = (role, text.rstrip())
            if not expected[-1][1]:
                expected.pop()
                texts = texts[: len(expected)]
        assert texts == expected
        system_text = (
            body.get("system")
            if key == "messages"
            else (body.get("systemInstruction") or {"parts": [{"text": ""}]})["parts"][0]["text"]
        )
        assert (system_text or "") == system

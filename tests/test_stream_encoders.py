"""The streamed hot paths format events around the encoded text instead of building and encoding
a dict per delta: the bytes must be exactly what the dict's encoding writes, for any text, so
that every client (and the ``openai`` / ``anthropic`` SDKs) decodes the same objects."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from relayrace.providers import anthropic, openai

# Any text a delta can carry: control characters, quotes, backslashes, line and paragraph
# separators, non-ASCII, astral characters (lone surrogates cannot be written either way).
texts = st.text(st.characters(exclude_categories=["Cs"]), max_size=60)


@given(texts)
def test_anthropic_text_delta_is_the_events_encoding(text):
    delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}
    data = anthropic.text_delta(text)
    assert data == anthropic.event("content_block_delta", delta)
    head, line, blank = data.decode().split("\n", 2)
    assert head == "event: content_block_delta"
    assert json.loads(line.removeprefix("data: ")) == delta
    assert blank == "\n"


@given(texts, texts, st.booleans(), st.booleans())
def test_openai_content_chunk_is_the_chunks_encoding(text, model, include_usage, first):
    encoder = openai.StreamEncoder("chatcmpl-x", 1700000000, include_usage)
    delta = {"role": "assistant", "content": text} if first else {"content": text}
    expected = encoder.chunk(model, delta, None)
    data = encoder.content(model, text, first=first)
    assert data == openai.event(expected)
    assert json.loads(data.decode().removeprefix("data: ")) == expected

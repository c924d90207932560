"""Text is validated where a request enters (#11 row 2).

Every string a caller gives ``Request`` (model, message fields and content parts, params and
metadata keys and values, nested) must be encodable as UTF-8: a lone surrogate is a
``BadRequest`` naming the field, at construction, so that it can never reach a provider client
and be filed against the provider. Nothing else may be raised, whatever the caller sends.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relayrace import BadRequest, Request, open_supervisor
from relayrace.testing import Answer

from .support import client, config, scripted_provider

USER = {"role": "user", "content": "hi"}

# Strings as a hostile caller writes them: lone surrogates (high, low, reversed pairs) among
# ordinary, non-ASCII, astral, control and very long text.
surrogates = st.integers(0xD800, 0xDFFF).map(chr)
ordinary = st.text(max_size=12) | st.sampled_from(["é", "€", "😀", "\x00", "\u202e", "x" * 5000])
hostile = st.lists(surrogates | ordinary, min_size=1, max_size=4).map("".join)


def encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def place(where: str, text: str) -> tuple[dict[str, Any], str]:
    """Request arguments with ``text`` at ``where``, and the field a BadRequest must name."""
    args: dict[str, Any] = {"model": "m", "messages": [USER]}
    if where == "model":
        args["model"] = "m" + text  # never blank, so only the text can be wrong
        return args, "model"
    if where == "content":
        args["messages"] = [USER, {"role": "user", "content": text}]
        return args, "messages[1].content"
    if where == "part":
        part = {"type": "text", "text": text}
        args["messages"] = [{"role": "user", "content": [{"type": "text", "text": "a"}, part]}]
        return args, "messages[0].content[1].text"
    if where == "name":
        args["messages"] = [{"role": "user", "content": "a", "name": text}]
        return args, "messages[0].name"
    if where == "tool_call":
        call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": text}}
        args["messages"] = [USER, {"role": "assistant", "content": None, "tool_calls": [call]}]
        return args, "messages[1].tool_calls[0].function.arguments"
    if where == "stop":
        args["params"] = {"stop": ["a", text]}
        return args, "params.stop[1]"
    if where == "param":
        args["params"] = {"user": text}
        return args, "params.user"
    if where == "nested_param":
        args["params"] = {"response_format": {"json_schema": {"description": [text]}}}
        return args, "params.response_format.json_schema.description[0]"
    if where == "metadata":
        args["metadata"] = {"user": text}
        return args, "metadata.user"
    if where == "metadata_key":
        args["metadata"] = {text: 1}
        return args, "metadata"
    if where == "message_key":
        args["messages"] = [{"role": "user", "content": "a", text: "x"}]
        return args, "messages[0]"
    raise AssertionError(where)


PLACES = [
    "model",
    "content",
    "part",
    "name",
    "tool_call",
    "stop",
    "param",
    "nested_param",
    "metadata",
    "metadata_key",
    "message_key",
]


def build(args: dict[str, Any]) -> Request:
    return Request(
        args["model"], args["messages"], params=args.get("params"), metadata=args.get("metadata")
    )


@settings(max_examples=300, deadline=None)
@given(where=st.sampled_from(PLACES), text=hostile)
def test_hostile_text_in_any_field_is_refused_naming_the_field_or_accepted(
    where: str, text: str
) -> None:
    args, field = place(where, text)
    try:
        request = build(args)
    except BadRequest as exc:
        # Refused only for what is wrong with the text itself, and the field is named.
        if encodable(text):
            # Valid text is refused only for another rule (an over-long model, a blank key
            # shadowing a field): never as invalid text.
            assert "valid text" not in exc.problem
        else:
            # (an over-long model is refused for its length first, naming the same field)
            assert exc.field == field, (exc.field, field)
        str(exc).encode("utf-8")  # the error itself is always printable and sendable
        return
    assert encodable(text), f"a lone surrogate at {field} was accepted"
    assert request.model


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (dict(model="m\ud800", messages=[USER]), "model"),
        (dict(model="m", messages=[USER, {"role": "user", "content": "\udfff"}]), "messages[1].content"),
        (dict(model="m", messages=[USER], params={"stop": ["a", "b\ud800"]}), "params.stop[1]"),
        (dict(model="m", messages=[USER], metadata={"user": "é\ud800"}), "metadata.user"),
        (dict(model="m", messages=[USER], metadata={"a b": ["\ud800"]}), "metadata['a b'][0]"),
    ],
)
def test_a_lone_surrogate_is_a_bad_request_naming_its_field(args: dict[str, Any], field: str) -> None:
    with pytest.raises(BadRequest) as caught:
        build(args)
    assert caught.value.field == field


def test_valid_non_ascii_text_is_accepted() -> None:
    request = Request(
        "modèle-😀",
        [{"role": "user", "content": [{"type": "text", "text": "€ 😀 \u202e é" * 1000}]}],
        params={"stop": ["∎"]},
        metadata={"utilisateur": "Zoë", "ключ": {"nested": ["😀"]}},
    )
    assert request.metadata["ключ"] == {"nested": ["😀"]}


def test_a_structure_that_contains_itself_is_a_bad_request_not_a_recursion_error() -> None:
    looped: dict[str, Any] = {}
    looped["again"] = looped
    with pytest.raises(BadRequest) as caught:
        Request("m", [USER], metadata=looped)
    assert caught.value.field.startswith("metadata.again.again")
    assert "nesting" in caught.value.problem


async def test_a_caller_s_bad_text_never_reaches_a_provider() -> None:
    """The caller's mistake costs the provider nothing: the client is never called."""
    cfg = config(scripted_provider("a", Answer()))
    bad = dict(model="m", messages=[{"role": "user", "content": "\ud800"}])
    async with open_supervisor(cfg) as sup:
        for _ in range(5):
            with pytest.raises(BadRequest):
                await sup.complete(build(bad))
        health = sup.health()["a"]
        assert health.state.value == "ok" and health.consecutive_failures == 0
        assert client(cfg, "a").calls == []
        reply = await sup.complete(Request("m", [USER]))
        assert reply.provider == "a"

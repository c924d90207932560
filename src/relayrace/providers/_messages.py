"""Translating OpenAI-style messages for the formats that keep the system prompt apart and
want strictly alternating turns (Anthropic, Gemini): written once, each format supplies how it
spells a content part."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ._json import get, text_of
from ._tools import arguments_object


def translate_turns(
    messages: Any,
    *,
    parts: Callable[[Any], list[dict[str, Any]]],
    tool_call: Callable[[Mapping[str, Any]], dict[str, Any]],
    tool_result: Callable[[Mapping[str, Any], str], dict[str, Any]],
    assistant: str,
    key: str,
) -> tuple[str, list[dict[str, Any]]]:
    """OpenAI-style messages as a system prompt and a list of turns.

    System and developer messages (wherever they are) join the system prompt (paragraphs);
    an assistant message's tool calls follow its content as the format's parts
    (``tool_call``); a tool message becomes a tool-result part of a user turn
    (``tool_result``, given the name of the function its ``tool_call_id`` called); messages
    whose content gives no parts are dropped; consecutive messages of one role merge into
    one turn.

    Args:
        messages: the request's messages.
        parts: a message content as the format's parts (blocks).
        tool_call: an assistant message's tool call as the format's part.
        tool_result: a tool message (and its function's name) as the format's part.
        assistant: the format's name for the assistant role (``assistant``, ``model``).
        key: the field of a turn that holds its parts (``content``, ``parts``).

    Returns:
        ``(system, turns)``; each turn is ``{"role": …, key: [part, …]}``.
    """
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    names: dict[str, str] = {}
    for message in messages:
        role = message.get("role")
        content = message.get("content")
        if role in ("system", "developer"):
            text = text_of(content)
            if text:
                system.append(text)
            continue
        if role == "tool":
            call_id = message.get("tool_call_id")
            blocks = [
                tool_result(message, names.get(call_id, "") if isinstance(call_id, str) else "")
            ]
        else:
            blocks = parts(content)
        calls = message.get("tool_calls") if role == "assistant" else None
        if isinstance(calls, list):
            for call in calls:
                if isinstance(call, Mapping):
                    name = get(dict(call), "function", "name")
                    if isinstance(call.get("id"), str) and isinstance(name, str):
                        names[call["id"]] = name
                    blocks.append(tool_call(call))
        if not blocks:
            continue
        role = assistant if role == "assistant" else "user"
        if turns and turns[-1]["role"] == role:
            turns[-1][key].extend(blocks)
        else:
            turns.append({"role": role, key: blocks})
    return "\n\n".join(system), turns


def call_parts(call: Mapping[str, Any]) -> tuple[str, str, Any]:
    """An assistant message's tool call as ``(id, name, arguments as a value)``."""
    function = call.get("function")
    function = function if isinstance(function, Mapping) else {}
    name = function.get("name")
    arguments = function.get("arguments")
    call_id = call.get("id")
    return (
        call_id if isinstance(call_id, str) else "",
        name if isinstance(name, str) else "",
        arguments_object(arguments) if isinstance(arguments, str) else {},
    )


def content_parts(
    content: Any,
    *,
    text: Callable[[str], dict[str, Any]],
    image: Callable[[str], dict[str, Any]],
    native: tuple[str, ...] = (),
) -> list[dict[str, Any]]:
    """An OpenAI-style content (a string or a list of parts) as a format's parts.

    Args:
        content: the message content.
        text: a non-empty text as the format's part.
        image: an image URL (``data:`` or not) as the format's part.
        native: part types already in the format's shape, passed through as they are.
    """
    if isinstance(content, str):
        return [text(content)] if content else []
    if not isinstance(content, list):
        return []
    out: list[dict[str, Any]] = []
    for part in content:
        if not isinstance(part, Mapping):
            continue
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str) and part["text"]:
            out.append(text(part["text"]))
        elif kind == "image_url":
            url = get(dict(part), "image_url", "url")
            if not isinstance(url, str):
                url = part.get("image_url")
            if isinstance(url, str):
                out.append(image(url))
        elif kind in native:
            out.append(dict(part))
    return out

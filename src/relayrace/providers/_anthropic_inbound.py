"""An Anthropic Messages request, as a caller sends it to ``POST /v1/messages``, translated into
a ``Request`` (OpenAI-style messages and params): the inverse of ``_anthropic.payload``. Pure.

Translated: ``system`` (a string or text blocks) becomes a system message; ``text`` and
``image`` blocks become content parts; an assistant's ``tool_use`` blocks become its
``tool_calls``; a user's ``tool_result`` blocks become ``tool`` messages (before the rest of
that turn); ``tools`` become function tools, ``tool_choice`` (``auto``/``any``/``tool``/
``none``, ``disable_parallel_tool_use``) becomes ``tool_choice`` / ``parallel_tool_calls``;
``max_tokens``, ``temperature``, ``top_p``, ``stop_sequences`` (as ``stop``) and
``metadata.user_id`` (as ``user``) become params. Dropped: ``cache_control`` marks (on
blocks and at the top), ``thinking`` / ``redacted_thinking`` blocks of earlier assistant turns,
the hints ``service_tier``, ``speed`` and ``inference_geo``.
Refused (a ``BadRequest`` naming the field): server tools, ``document`` and other block types,
images inside a ``tool_result``, ``top_k``, an enabled ``thinking``, ``output_config``, any other
field.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .._errors import BadRequest
from .._values import Request
from ._json import dumps

#: The top-level fields of a Messages request that are read here.
_FIELDS = frozenset(
    {
        "model",
        "messages",
        "system",
        "max_tokens",
        "temperature",
        "top_p",
        "stop_sequences",
        "stream",
        "metadata",
        "tools",
        "tool_choice",
        "thinking",
        "top_k",
    }
    | {"cache_control", "service_tier", "speed", "inference_geo"}  # hints, dropped
)

_DROPPED_BLOCKS = frozenset({"thinking", "redacted_thinking"})

# A Request's field names (what ``BadRequest.field`` says) in the Messages request's terms.
_PARAM_FIELDS = (
    (re.compile(r"^params\.tools\[(\d+)\]\.function\.parameters"), r"tools[\1].input_schema"),
    (re.compile(r"^params\.tools\[(\d+)\]\.function\.(\w+)"), r"tools[\1].\2"),
    (re.compile(r"^params\.tools"), "tools"),
    (re.compile(r"^params\.tool_choice"), "tool_choice"),
    (re.compile(r"^params\.parallel_tool_calls"), "tool_choice.disable_parallel_tool_use"),
    (re.compile(r"^params\.stop"), "stop_sequences"),
    (re.compile(r"^params\.user"), "metadata.user_id"),
    (re.compile(r"^params\."), ""),
)
_MESSAGE_FIELD = re.compile(r"^messages\[(\d+)\]")


def request_of(body: Mapping[str, Any]) -> tuple[Request, bool]:
    """The ``Request`` a Messages request body asks for, and whether it asks for a stream.

    Raises:
        BadRequest: the body is malformed or asks for what cannot be translated; ``field``
            names the part of the body at fault, in the Messages API's terms.
    """
    for key in body:
        if key not in _FIELDS:
            raise BadRequest(str(key), "not a field of a Messages request this endpoint serves")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream", "expected true or false")
    if "top_k" in body:
        raise BadRequest("top_k", "not translated: not every provider kind has it")
    thinking = body.get("thinking")
    if thinking is not None and not (isinstance(thinking, dict) and thinking.get("type") == "disabled"):
        raise BadRequest("thinking", "extended thinking is not served by this endpoint")
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise BadRequest("max_tokens", "required: a positive integer")
    params: dict[str, Any] = {"max_tokens": max_tokens}
    temperature = body.get("temperature")
    if temperature is not None:
        if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not 0 <= temperature <= 1:
            raise BadRequest("temperature", "expected a number from 0 to 1")
        params["temperature"] = temperature
    if body.get("top_p") is not None:
        params["top_p"] = body["top_p"]
    stops = body.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise BadRequest("stop_sequences", "expected a list of non-empty strings")
        if stops:
            params["stop"] = stops
    metadata = body.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise BadRequest("metadata", "expected an object")
        user = metadata.get("user_id")
        if user is not None:
            if not isinstance(user, str):
                raise BadRequest("metadata.user_id", "expected a string")
            params["user"] = user
    params.update(_tools_of(body.get("tools"), body.get("tool_choice")))
    messages, origins = _messages_of(body.get("system"), body.get("messages"))
    model = body.get("model")
    try:
        request = Request(model, messages, params=params)  # type: ignore[arg-type]  # Request checks it
    except BadRequest as exc:
        raise BadRequest(_field_of(exc.field, origins), exc.problem) from None
    return request, stream


def body_field(field: str) -> str:
    """A ``BadRequest.field`` about a translated request (``params.tools``) in the Messages
    request's terms (``tools``)."""
    return _field_of(field, [])


def _field_of(field: str, origins: list[str]) -> str:
    found = _MESSAGE_FIELD.match(field)
    if found is not None:
        index = int(found.group(1))
        origin = origins[index] if index < len(origins) else "messages"
        return origin + field[found.end() :].replace(".tool_call_id", ".tool_use_id")
    for pattern, replacement in _PARAM_FIELDS:
        if pattern.match(field):
            return pattern.sub(replacement, field, count=1)
    return field


def _tools_of(tools: Any, choice: Any) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if tools is not None:
        if not isinstance(tools, list):
            raise BadRequest("tools", "expected a list of tools")
        functions = []
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict):
                raise BadRequest(f"tools[{i}]", "expected an object")
            if tool.get("type", "custom") != "custom":
                raise BadRequest(f"tools[{i}].type", f"server tool {tool.get('type')!r} is not served")
            if "input_schema" not in tool:
                raise BadRequest(f"tools[{i}].input_schema", "required: a JSON schema object")
            function: dict[str, Any] = {"name": tool.get("name"), "parameters": tool["input_schema"]}
            if "description" in tool:
                function["description"] = tool["description"]
            functions.append({"type": "function", "function": function})
        if functions:
            params["tools"] = functions
    if choice is None:
        return params
    if not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "tool", "none"):
        raise BadRequest("tool_choice.type", "expected auto, any, tool or none")
    kind = choice["type"]
    if kind == "tool":
        name = choice.get("name")
        if not isinstance(name, str) or not name:
            raise BadRequest("tool_choice.name", "expected the name of a declared tool")
        params["tool_choice"] = {"type": "function", "function": {"name": name}}
    else:
        params["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[kind]
    disable = choice.get("disable_parallel_tool_use")
    if disable is not None:
        if not isinstance(disable, bool):
            raise BadRequest("tool_choice.disable_parallel_tool_use", "expected true or false")
        if disable and kind != "none":
            params["parallel_tool_calls"] = False
    return params


def _messages_of(system: Any, turns: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """OpenAI-style messages, and for each the Messages-request field it came from."""
    messages: list[dict[str, Any]] = []
    origins: list[str] = []
    if system is not None:
        text = system if isinstance(system, str) else _texts(system, "system")
        if text:
            messages.append({"role": "system", "content": text})
            origins.append("system")
    if not isinstance(turns, list) or not turns:
        raise BadRequest("messages", "expected a non-empty list of messages")
    for i, turn in enumerate(turns):
        at = f"messages[{i}]"
        if not isinstance(turn, dict):
            raise BadRequest(at, "expected an object with 'role' and 'content'")
        role = turn.get("role")
        if role not in ("user", "assistant"):
            raise BadRequest(f"{at}.role", "expected user or assistant")
        content = turn.get("content")
        if isinstance(content, str):
            messages.append({"role": role, "content": content})
            origins.append(at)
            continue
        if not isinstance(content, list):
            raise BadRequest(f"{at}.content", "expected a string or a list of content blocks")
        translate = _assistant_turn if role == "assistant" else _user_turn
        for message, origin in translate(content, at):
            messages.append(message)
            origins.append(origin)
    return messages, origins


def _block_type(block: Any, at: str) -> str:
    if not isinstance(block, dict) or not isinstance(block.get("type"), str):
        raise BadRequest(at, "expected a content block with a 'type'")
    return block["type"]


def _user_turn(blocks: list[Any], at: str) -> list[tuple[dict[str, Any], str]]:
    out: list[tuple[dict[str, Any], str]] = []
    parts: list[dict[str, Any]] = []
    for k, block in enumerate(blocks):
        here = f"{at}.content[{k}]"
        kind = _block_type(block, here)
        if kind == "tool_result":
            out.append((_tool_message(block, here), here))
        elif kind == "text":
            parts.append(_text_part(block, here))
        elif kind == "image":
            parts.append(_image_part(block, here))
        else:
            raise BadRequest(f"{here}.type", f"{kind!r} blocks are not served in a user turn")
    parts = [p for p in parts if p.get("type") != "text" or p["text"]]
    if parts:
        out.append(({"role": "user", "content": parts}, at))
    return out


def _assistant_turn(blocks: list[Any], at: str) -> list[tuple[dict[str, Any], str]]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for k, block in enumerate(blocks):
        here = f"{at}.content[{k}]"
        kind = _block_type(block, here)
        if kind == "text":
            texts.append(_text_part(block, here)["text"])
        elif kind == "tool_use":
            calls.append(_tool_call(block, here))
        elif kind not in _DROPPED_BLOCKS:
            raise BadRequest(f"{here}.type", f"{kind!r} blocks are not served in an assistant turn")
    text = "".join(texts)
    if not text and not calls:
        return []
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls:
        message["tool_calls"] = calls
    return [(message, at)]


def _text_part(block: dict[str, Any], at: str) -> dict[str, Any]:
    text = block.get("text")
    if not isinstance(text, str):
        raise BadRequest(f"{at}.text", "expected a string")
    return {"type": "text", "text": text}


def _texts(blocks: Any, at: str) -> str:
    if not isinstance(blocks, list):
        raise BadRequest(at, "expected a string or a list of text blocks")
    texts = []
    for k, block in enumerate(blocks):
        here = f"{at}[{k}]"
        if _block_type(block, here) != "text":
            raise BadRequest(f"{here}.type", "expected a text block")
        texts.append(_text_part(block, here)["text"])
    return "\n\n".join(t for t in texts if t)


def _image_part(block: dict[str, Any], at: str) -> dict[str, Any]:
    source = block.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64" and isinstance(source, dict):
        media, data = source.get("media_type"), source.get("data")
        if not isinstance(media, str) or not isinstance(data, str):
            raise BadRequest(f"{at}.source", "expected a media_type and base64 data")
        url = f"data:{media};base64,{data}"
    elif kind == "url" and isinstance(source, dict) and isinstance(source.get("url"), str):
        url = source["url"]
    else:
        raise BadRequest(f"{at}.source", "expected a base64 or url image source")
    return {"type": "image_url", "image_url": {"url": url}}


def _tool_call(block: dict[str, Any], at: str) -> dict[str, Any]:
    call_id, name, arguments = block.get("id"), block.get("name"), block.get("input", {})
    if not isinstance(call_id, str) or not call_id:
        raise BadRequest(f"{at}.id", "expected a non-empty string")
    if not isinstance(name, str) or not name:
        raise BadRequest(f"{at}.name", "expected a non-empty string")
    if not isinstance(arguments, dict):
        raise BadRequest(f"{at}.input", "expected an object")
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": dumps(arguments)},
    }


def _tool_message(block: dict[str, Any], at: str) -> dict[str, Any]:
    call_id = block.get("tool_use_id")
    if not isinstance(call_id, str) or not call_id:
        raise BadRequest(f"{at}.tool_use_id", "expected a non-empty string")
    content = block.get("content", "")
    text = content if isinstance(content, str) else _texts(content, f"{at}.content")
    if block.get("is_error") is True:
        # OpenAI's tool messages have no error flag: the model is told in the text.
        text = f"[tool error] {text}"
    return {"role": "tool", "tool_call_id": call_id, "content": text}

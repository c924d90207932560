"""The Anthropic Messages wire format: request payload, reader, error codes, encoder.

``POST …/v1/messages``. The OpenAI-style request is translated: system and developer messages
become ``system``, consecutive messages of one role are merged, content parts become content
blocks, ``tools`` / ``tool_choice`` / ``parallel_tool_calls`` become ``tools`` (with an
``input_schema``) / ``tool_choice``, an assistant's tool calls become ``tool_use`` blocks and
tool messages ``tool_result`` blocks of a user turn, ``max_tokens`` is always sent (Anthropic requires
it). A streamed answer is a sequence of named events (``message_start``,
``content_block_delta``, ``message_delta``, ``message_stop``, ``ping``, ``error``);
``message_stop`` is the terminator.

A prefill is a trailing assistant message. Anthropic refuses one that ends in whitespace, so the
whitespace is cut from what is sent, and the answer's leading whitespace (which the caller
already has) is cut from what comes back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from .._failure import Category
from .._values import Request, ToolCall, Usage
from ._errors import MalformedStream, UpstreamErrorBody
from ._format import PREFILL_REFUSED, WireFormat
from ._json import (
    as_int,
    dumps,
    dumps_str,
    expect_object,
    get,
    load_event,
    max_tokens_of,
    parse_data_url,
    stop_sequences,
    text_of,
)
from ._messages import call_parts, content_parts, translate_turns
from ._reader import Reader
from ._sse import ServerSentEvent, encode_event
from ._tools import chosen_function, function_tools

NAME = "anthropic"
PATH = "/v1/messages"
VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096

#: ``error.type`` / ``error.details.error_code`` values and their category.
ERROR_CODES: dict[str, Category] = {
    "rate_limit_error": Category.RATE_LIMIT,
    "enforced_spend_limit_reached": Category.QUOTA_EXHAUSTED,
    "billing_error": Category.QUOTA_EXHAUSTED,
    "overloaded_error": Category.OVERLOADED,
    "api_error": Category.PROVIDER_5XX,
    "timeout_error": Category.TIMEOUT,
    "authentication_error": Category.AUTH,
    "permission_error": Category.AUTH,
    "not_found_error": Category.MODEL_NOT_FOUND,
    "request_too_large": Category.BAD_REQUEST,
}

#: error kind (``relayrace.providers.ERROR_KINDS``) → (status, type, message).
ERRORS: dict[str, tuple[int, str, str]] = {
    "rate_limit": (429, "rate_limit_error", "Number of requests has exceeded your rate limit for {model}."),
    "quota": (429, "rate_limit_error", "You have reached your specified API usage limits."),
    "server": (500, "api_error", "Internal server error"),
    "unavailable": (503, "api_error", "Service unavailable"),
    "overloaded": (529, "overloaded_error", "Overloaded"),
    "unauthorized": (401, "authentication_error", "invalid x-api-key"),
    "forbidden": (403, "permission_error", "Your API key does not have permission to use {model}."),
    "not_found": (404, "not_found_error", "model: {model}"),
    "context_length": (400, "invalid_request_error", "prompt is too long: 210000 tokens > 200000 maximum"),
    "content_policy": (400, "invalid_request_error", "Output blocked by content filtering policy"),
    "prefill": (400, "invalid_request_error", PREFILL_REFUSED),
    "bad_request": (400, "invalid_request_error", "{model}"),
}

# Anthropic-native parameters a request may carry; OpenAI-only ones (n, seed, penalties,
# response_format…) are dropped, because the Messages API rejects fields it does not know.
_NATIVE_PARAMS = ("top_k", "thinking", "metadata", "service_tier", "stop_sequences")

# Anthropic's stop reasons in the OpenAI vocabulary the rest of relayrace speaks, and back.
_FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
}
_STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "content_filter": "refusal",
}


# --- the request ----------------------------------------------------------------------------


def payload(
    request: Request,
    *,
    model: str,
    stream: bool,
    prefill: str | None = None,
    extra_body: Mapping[str, Any] | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> dict[str, Any]:
    """The JSON body of a Messages request (see the module docstring for the translation).

    Args:
        request: the caller's request.
        model: the upstream model.
        stream: ask for a stream.
        prefill: text the answer must continue.
        extra_body: fields under what the request sets.
        max_tokens: the output limit when the request sets none.
    """
    system, messages = translate_messages(request.messages, prefill)
    params = request.params
    body: dict[str, Any] = dict(extra_body or {})
    body.update({key: params[key] for key in _NATIVE_PARAMS if key in params})
    body["model"] = model
    body["max_tokens"] = max_tokens_of(params, max_tokens)
    if system:
        body["system"] = system
    body["messages"] = messages
    temperature = params.get("temperature")
    if isinstance(temperature, int | float):
        # OpenAI's range is 0-2, Anthropic's 0-1: a request that fails over here must not
        # become a bad request.
        body["temperature"] = min(float(temperature), 1.0)
    if "top_p" in params:
        body["top_p"] = params["top_p"]
    stops = stop_sequences(params.get("stop"))
    if stops:
        body["stop_sequences"] = stops
    user = params.get("user")
    if isinstance(user, str) and user and "metadata" not in body:
        body["metadata"] = {"user_id": user}
    _add_tools(body, params)
    body["stream"] = stream
    return body


def _add_tools(body: dict[str, Any], params: Mapping[str, Any]) -> None:
    functions = function_tools(params)
    if functions:
        body["tools"] = [
            {
                "name": function["name"],
                **({"description": function["description"]} if "description" in function else {}),
                "input_schema": function.get("parameters") or {"type": "object", "properties": {}},
            }
            for function in functions
        ]
    choice = params.get("tool_choice")
    named = chosen_function(params)
    tool_choice: dict[str, Any] | None = None
    if named is not None:
        tool_choice = {"type": "tool", "name": named}
    elif choice in ("auto", "required", "none"):
        tool_choice = {"type": {"auto": "auto", "required": "any", "none": "none"}[choice]}
    if params.get("parallel_tool_calls") is False and functions:
        tool_choice = tool_choice or {"type": "auto"}
        if tool_choice["type"] != "none":
            tool_choice["disable_parallel_tool_use"] = True
    if tool_choice is not None and functions:
        body["tool_choice"] = tool_choice


def translate_messages(
    messages: Any, prefill: str | None = None
) -> tuple[str, list[dict[str, Any]]]:
    """OpenAI-style messages as Anthropic's ``system`` and ``messages``.

    System and developer messages (wherever they are) join ``system``; tool calls become
    ``tool_use`` blocks and tool results ``tool_result`` blocks of a user turn; messages without text are dropped; consecutive messages of one role merge into
    one with several content blocks; the prefill extends the last assistant message or becomes
    one, and the final assistant text loses its trailing whitespace.
    """
    system, turns = translate_turns(
        messages,
        parts=_blocks,
        tool_call=_tool_use,
        tool_result=_tool_result,
        assistant="assistant",
        key="content",
    )
    if prefill:
        if not turns or turns[-1]["role"] != "assistant":
            turns.append({"role": "assistant", "content": []})
        last = turns[-1]["content"]
        if last and last[-1]["type"] == "text":
            last[-1]["text"] += prefill
        else:
            last.append({"type": "text", "text": prefill})
    if turns and turns[-1]["role"] == "assistant":
        last = turns[-1]["content"]
        if last[-1]["type"] == "text":
            last[-1]["text"] = last[-1]["text"].rstrip()
            if not last[-1]["text"]:
                del last[-1]
        if not last:
            turns.pop()
    for turn in turns:
        blocks = turn["content"]
        if len(blocks) == 1 and blocks[0]["type"] == "text":
            turn["content"] = blocks[0]["text"]
    return system, turns


def cuts_whitespace(messages: Any, prefill: str | None) -> bool:
    """Whether ``translate_messages`` cut whitespace that ends the text being continued (the
    answer's leading whitespace is then cut too: ``AnthropicReader(strip_leading=True)``)."""
    tail = prefill or ""
    if messages and messages[-1].get("role") == "assistant":
        tail = text_of(messages[-1].get("content")) + tail
    return bool(tail) and tail != tail.rstrip()


def _tool_use(call: Mapping[str, Any]) -> dict[str, Any]:
    call_id, name, arguments = call_parts(call)
    return {"type": "tool_use", "id": call_id, "name": name, "input": arguments}


def _tool_result(message: Mapping[str, Any], name: str) -> dict[str, Any]:
    return {
        "type": "tool_result",
        "tool_use_id": message.get("tool_call_id"),
        "content": text_of(message.get("content")),
    }


def _text_block(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def _image_block(url: str) -> dict[str, Any]:
    data = parse_data_url(url)
    source = (
        {"type": "base64", "media_type": data[0], "data": data[1]}
        if data
        else {"type": "url", "url": url}
    )
    return {"type": "image", "source": source}


def _blocks(content: Any) -> list[dict[str, Any]]:
    # "image" and "document" parts are already Anthropic-shaped.
    return content_parts(
        content, text=_text_block, image=_image_block, native=("image", "document")
    )


# --- the response ---------------------------------------------------------------------------


class AnthropicReader(Reader):
    """Reads Messages API events (streamed) or a message (whole).

    Args:
        model: the model asked for.
        strip_leading: cut the answer's leading whitespace (see ``cuts_whitespace``).
    """

    def __init__(self, model: str, *, strip_leading: bool = False):
        super().__init__(model)
        self._strip_leading = strip_leading
        self._input_tokens = 0
        self._output_tokens = 0
        self._usage: dict[str, int] = {}
        # the tool calls (our indexes) that got input_json_delta events
        self._with_input: set[int] = set()

    def event(self, event: ServerSentEvent) -> str | None:
        data = load_event(event)
        kind = data.get("type") or event.event
        if kind == "error" or event.event == "error":
            raise UpstreamErrorBody(data)
        if kind == "message_start":
            message = data.get("message")
            self.answered_by(get(message, "model"))
            self._add_usage(get(message, "usage"))
        elif kind == "content_block_start":
            block = data.get("content_block")
            if get(block, "type") == "tool_use":
                self.tools.start(data.get("index"), get(block, "id"), get(block, "name"))
        elif kind == "content_block_delta":
            delta = data.get("delta")
            kind = get(delta, "type")
            if kind == "text_delta":
                return self._text(get(delta, "text"))
            if kind == "input_json_delta":
                index = self.tools.index_of(data.get("index"))
                if index is None:
                    raise MalformedStream("malformed_tool_call", "input for a block that is no tool_use")
                self._with_input.add(index)
                self.tools.add(index, get(delta, "partial_json"))
        elif kind == "content_block_stop":
            index = self.tools.index_of(data.get("index"))
            if index is not None and index not in self._with_input:
                self.tools.add(index, "{}")  # a call without arguments
        elif kind == "message_delta":
            self._add_usage(data.get("usage"))
            self._stop(get(data, "delta", "stop_reason"), data)
        elif kind == "message_stop":
            self.terminated = True
        # ping and events yet unknown carry no answer.
        return None

    def whole(self, body: Any) -> str:
        body = expect_object(body, "response")
        if body.get("type") == "error" or body.get("error"):
            raise UpstreamErrorBody(body)
        content = body.get("content")
        if not isinstance(content, list):
            raise MalformedStream("malformed_response", "the response has no content")
        self.answered_by(body.get("model"))
        self._add_usage(body.get("usage"))
        for number, block in enumerate(content):
            if isinstance(block, dict) and block.get("type") == "tool_use":
                index = self.tools.start(number, block.get("id"), block.get("name"))
                arguments = block.get("input", {})
                if not isinstance(arguments, dict):
                    raise MalformedStream("malformed_tool_call", "tool_use input that is no object")
                self.tools.add(index, dumps(arguments))
        self._stop(body.get("stop_reason"), body)
        self.finished = True
        return self._text(
            "".join(
                block["text"]
                for block in content
                if isinstance(block, dict)
                and block.get("type") == "text"
                and isinstance(block.get("text"), str)
            )
        )

    def _text(self, text: Any) -> str:
        if not isinstance(text, str):
            return ""
        if self._strip_leading:
            text = text.lstrip()
            self._strip_leading = not text
        return text

    def _stop(self, reason: Any, data: dict[str, Any]) -> None:
        if not isinstance(reason, str) or not reason:
            return
        if reason == "refusal":
            raise UpstreamErrorBody(data)  # classify reads the refusal: content_policy
        self.tools.check()
        self.finish_reason = _FINISH_REASONS.get(reason, reason)
        self.finished = True

    def _add_usage(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        # Anthropic counts cached input apart; the prompt is all of it. Counts are cumulative,
        # and a later event may repeat or extend an earlier one.
        counts = self._usage
        for key in (
            "input_tokens",
            "cache_creation_input_tokens",
            "cache_read_input_tokens",
            "output_tokens",
        ):
            if key in usage:
                counts[key] = max(counts.get(key, 0), as_int(usage.get(key)))
        self.usage = Usage(
            prompt_tokens=counts.get("input_tokens", 0)
            + counts.get("cache_creation_input_tokens", 0)
            + counts.get("cache_read_input_tokens", 0),
            completion_tokens=counts.get("output_tokens", 0),
            cached_tokens=counts.get("cache_read_input_tokens", 0),
            cache_creation_tokens=counts.get("cache_creation_input_tokens", 0),
        )


# --- writing the format ---------------------------------------------------------------------


def stop_reason(finish_reason: str) -> str:
    """An OpenAI-vocabulary finish reason as Anthropic's ``stop_reason``."""
    return _STOP_REASONS.get(finish_reason, finish_reason)


def usage_of(usage: Usage) -> dict[str, int]:
    """A ``usage`` object (``input_tokens`` excludes the cached parts, as Anthropic counts)."""
    out = {
        "input_tokens": usage.prompt_tokens - usage.cached_tokens - usage.cache_creation_tokens,
        "output_tokens": usage.completion_tokens,
    }
    if usage.cached_tokens or usage.cache_creation_tokens:
        out["cache_read_input_tokens"] = usage.cached_tokens
        out["cache_creation_input_tokens"] = usage.cache_creation_tokens
    return out


def tool_use_block(call: ToolCall) -> dict[str, Any]:
    """A whole tool call as a ``tool_use`` block."""
    return {"type": "tool_use", "id": call.id, "name": call.name, "input": json.loads(call.arguments)}


def message(
    *,
    id: str,
    model: str,
    text: str,
    finish_reason: str = "stop",
    usage: Usage,
    tool_calls: Sequence[ToolCall] = (),
) -> dict[str, Any]:
    """A whole ``message``."""
    content: list[dict[str, Any]] = [{"type": "text", "text": text}] if text or not tool_calls else []
    content.extend(tool_use_block(call) for call in tool_calls)
    return {
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason(finish_reason),
        "stop_sequence": None,
        "usage": usage_of(usage),
    }


def error_status(kind: str) -> int:
    """The HTTP status of an error kind."""
    return ERRORS[kind][0]


def error_body(
    kind: str, model: str, *, status: int | None = None, retry_after: float | None = None
) -> dict[str, Any]:
    """The error body of an error kind (``{model}`` in its message is ``model``)."""
    _, type_, text = ERRORS[kind]
    error: dict[str, Any] = {"type": type_, "message": text.replace("{model}", model)}
    if kind == "quota":
        error["details"] = {"error_code": "enforced_spend_limit_reached"}
    return {"type": "error", "error": error}


def event(name: str, data: Any) -> bytes:
    """One named SSE event."""
    return encode_event(dumps(data), name)


def opening(
    *, id: str, model: str, prompt_tokens: int, cached_tokens: int = 0, cache_creation_tokens: int = 0
) -> bytes:
    """The events that open a stream: ``message_start`` (its usage as ``usage_of`` counts the
    prompt: cached parts apart), ``content_block_start``, ``ping``."""
    prompt = Usage(
        prompt_tokens=prompt_tokens,
        cached_tokens=cached_tokens,
        cache_creation_tokens=cache_creation_tokens,
    )
    start: dict[str, Any] = {
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {**usage_of(prompt), "output_tokens": 1},
    }
    block = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    return (
        event("message_start", {"type": "message_start", "message": start})
        + event("content_block_start", block)
        + event("ping", {"type": "ping"})
    )


#: ``text_delta`` up to its text: the event, as ``event`` writes it, is formatted around the
#: encoded text instead of building and encoding a dict per delta (the streamed hot path).
_TEXT_DELTA = (
    'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    '"delta":{"type":"text_delta","text":'
)


def text_delta(text: str) -> bytes:
    """The event of one content delta: byte for byte ``event("content_block_delta",
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}})``."""
    return f"{_TEXT_DELTA}{dumps_str(text)}}}}}\n\n".encode()


def tool_use_start(index: int, call_id: str, name: str) -> bytes:
    """The events that end the block before ``index`` and open a ``tool_use`` block."""
    start = {
        "type": "content_block_start",
        "index": index,
        "content_block": {"type": "tool_use", "id": call_id, "name": name, "input": {}},
    }
    return event("content_block_stop", {"type": "content_block_stop", "index": index - 1}) + event(
        "content_block_start", start
    )


def input_json_delta(index: int, partial_json: str) -> bytes:
    """The event of a fragment of a tool call's input."""
    delta = {
        "type": "content_block_delta",
        "index": index,
        "delta": {"type": "input_json_delta", "partial_json": partial_json},
    }
    return event("content_block_delta", delta)


def closing(
    finish_reason: str,
    output_tokens: int,
    *,
    terminator: bool = True,
    last_block: int = 0,
    usage: Usage | None = None,
    extra: Mapping[str, Any] | None = None,
) -> bytes:
    """The events that end a stream: ``content_block_stop`` (of ``last_block``),
    ``message_delta`` (the stop reason and usage: ``output_tokens``, or all of ``usage``
    when given; ``extra`` fields added), ``message_stop``."""
    stop = {"type": "content_block_stop", "index": last_block}
    out = event("content_block_stop", stop) + event(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason(finish_reason), "stop_sequence": None},
            "usage": {"output_tokens": output_tokens} if usage is None else usage_of(usage),
            **(extra or {}),
        },
    )
    if terminator:
        out += event("message_stop", {"type": "message_stop"})
    return out


def error_event(kind: str, model: str) -> bytes:
    """An error inside the 200 stream (``event: error``)."""
    return event("error", error_body(kind, model))


FORMAT = WireFormat(
    name=NAME, error_codes=ERROR_CODES, error_status=error_status, error_body=error_body
)

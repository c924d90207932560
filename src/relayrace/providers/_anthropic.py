"""The Anthropic Messages wire format: request payload, reader, error codes, encoder.

``POST …/v1/messages``. The OpenAI-style request is translated: system and developer messages
become ``system``, consecutive messages of one role are merged (tool results travel as user
text), content parts become content blocks, ``max_tokens`` is always sent (Anthropic requires
it). A streamed answer is a sequence of named events (``message_start``,
``content_block_delta``, ``message_delta``, ``message_stop``, ``ping``, ``error``);
``message_stop`` is the terminator.

A prefill is a trailing assistant message. Anthropic refuses one that ends in whitespace, so the
whitespace is cut from what is sent, and the answer's leading whitespace (which the caller
already has) is cut from what comes back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._failure import Category
from .._values import Request, Usage
from ._errors import MalformedStream, UpstreamErrorBody
from ._format import PREFILL_REFUSED, WireFormat
from ._json import (
    as_int,
    dumps,
    expect_object,
    get,
    load_event,
    max_tokens_of,
    parse_data_url,
    stop_sequences,
    text_of,
)
from ._messages import content_parts, translate_turns
from ._reader import Reader
from ._sse import ServerSentEvent, encode_event

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
_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


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
    body["stream"] = stream
    return body


def translate_messages(
    messages: Any, prefill: str | None = None
) -> tuple[str, list[dict[str, Any]]]:
    """OpenAI-style messages as Anthropic's ``system`` and ``messages``.

    System and developer messages (wherever they are) join ``system``; tool results become
    user text; messages without text are dropped; consecutive messages of one role merge into
    one with several content blocks; the prefill extends the last assistant message or becomes
    one, and the final assistant text loses its trailing whitespace.
    """
    system, turns = translate_turns(
        messages, parts=_blocks, tool_text=_tool_result_text, assistant="assistant", key="content"
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


def _tool_result_text(message: Any) -> str:
    text = text_of(message.get("content"))
    call_id = message.get("tool_call_id")
    return f"[tool result {call_id}]\n{text}" if isinstance(call_id, str) and call_id else text


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

    def event(self, event: ServerSentEvent) -> str | None:
        data = load_event(event)
        kind = data.get("type") or event.event
        if kind == "error" or event.event == "error":
            raise UpstreamErrorBody(data)
        if kind == "message_start":
            message = data.get("message")
            self.answered_by(get(message, "model"))
            self._add_usage(get(message, "usage"))
        elif kind == "content_block_delta":
            delta = data.get("delta")
            if get(delta, "type") == "text_delta":
                return self._text(get(delta, "text"))
        elif kind == "message_delta":
            self._add_usage(data.get("usage"))
            self._stop(get(data, "delta", "stop_reason"), data)
        elif kind == "message_stop":
            self.terminated = True
        # ping, content_block_start / _stop and events yet unknown carry no answer text.
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
        self.finish_reason = _FINISH_REASONS.get(reason, reason)
        self.finished = True

    def _add_usage(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        # Anthropic counts cached input apart; the prompt is all of it. Counts are cumulative,
        # and a later event may repeat or extend an earlier one.
        inputs = sum(
            as_int(usage.get(key))
            for key in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
        )
        self._input_tokens = max(self._input_tokens, inputs)
        self._output_tokens = max(self._output_tokens, as_int(usage.get("output_tokens")))
        self.usage = Usage(prompt_tokens=self._input_tokens, completion_tokens=self._output_tokens)


# --- writing the format ---------------------------------------------------------------------


def stop_reason(finish_reason: str) -> str:
    """An OpenAI-vocabulary finish reason as Anthropic's ``stop_reason``."""
    return _STOP_REASONS.get(finish_reason, finish_reason)


def message(
    *, id: str, model: str, text: str, finish_reason: str = "stop", usage: Usage
) -> dict[str, Any]:
    """A whole ``message``."""
    return {
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": stop_reason(finish_reason),
        "stop_sequence": None,
        "usage": {"input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens},
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


def opening(*, id: str, model: str, prompt_tokens: int) -> bytes:
    """The events that open a stream: ``message_start``, ``content_block_start``, ``ping``."""
    start: dict[str, Any] = {
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": prompt_tokens, "output_tokens": 1},
    }
    block = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    return (
        event("message_start", {"type": "message_start", "message": start})
        + event("content_block_start", block)
        + event("ping", {"type": "ping"})
    )


def text_delta(text: str) -> bytes:
    """The event of one content delta."""
    delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}
    return event("content_block_delta", delta)


def closing(finish_reason: str, output_tokens: int, *, terminator: bool = True) -> bytes:
    """The events that end a stream: ``content_block_stop``, ``message_delta`` (the stop reason
    and usage), ``message_stop``."""
    out = event("content_block_stop", {"type": "content_block_stop", "index": 0}) + event(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason(finish_reason), "stop_sequence": None},
            "usage": {"output_tokens": output_tokens},
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

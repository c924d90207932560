"""``AnthropicClient``: the Anthropic Messages API.

``POST {base_url}/v1/messages`` with ``x-api-key`` and ``anthropic-version``. The OpenAI-style
request is translated: system and developer messages become ``system``, consecutive messages of
one role are merged (tool results travel as user text), content parts become content blocks,
``max_tokens`` is always sent (Anthropic requires it). A streamed answer is a sequence of named
events (``message_start``, ``content_block_delta``, ``message_delta``, ``message_stop``, ``ping``,
``error``); ``message_stop`` is the terminator.

A prefill is a trailing assistant message. Anthropic refuses one that ends in whitespace, so the
whitespace is cut from what is sent, and the answer's leading whitespace (which the caller
already has) is cut from what comes back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import httpx

from .._values import Usage
from ._client import ClientCall
from ._http import (
    HTTPProviderClient,
    MalformedStream,
    Reader,
    ServerSentEvent,
    UpstreamErrorBody,
    as_int,
    expect_object,
    get,
    load_event,
    max_tokens_of,
    options_from_table,
    parse_data_url,
    stop_sequences,
    text_of,
)

if TYPE_CHECKING:
    from .._table import Table

ANTHROPIC_BASE_URL = "https://api.anthropic.com"
ANTHROPIC_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096

# Anthropic-native parameters a request may carry; OpenAI-only ones (n, seed, penalties,
# response_format…) are dropped, because the Messages API rejects fields it does not know.
_NATIVE_PARAMS = ("top_k", "thinking", "metadata", "service_tier", "stop_sequences")

# Anthropic's stop reasons in the OpenAI vocabulary the rest of relayrace speaks.
_FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
}


class AnthropicClient(HTTPProviderClient):
    """A client for the Anthropic Messages API.

    Args:
        base_url: the API root, without ``/v1/messages`` (``https://api.anthropic.com``).
        api_key: the key, sent as ``x-api-key``.
        version: the ``anthropic-version`` header.
        max_tokens: the output limit sent when the request sets none (Anthropic requires one).
        headers: extra headers on every request (``anthropic-beta``…).
        query: query parameters on every request.
        extra_body: fields added to every request body, under what the request sets.
        accepts_continuation: declare that the model continues a trailing assistant message.
        max_connections: the connection pool's size (the actor's ``max_concurrency``).
        connect_timeout: seconds to open a connection (the actor's ``budgets.connect``).
        transport: an ``httpx`` transport to use instead of the network (tests).

    Raises:
        ValueError: an argument is out of range.
    """

    label = "anthropic"

    def __init__(
        self,
        *,
        base_url: str = ANTHROPIC_BASE_URL,
        api_key: str | None = None,
        version: str = ANTHROPIC_VERSION,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        headers: Mapping[str, str] | None = None,
        query: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        accepts_continuation: bool = True,
        max_connections: int = 64,
        connect_timeout: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError("max_tokens: expected a positive integer")
        super().__init__(
            base_url=base_url,
            api_key=api_key,
            auth_headers={"x-api-key": api_key} if api_key else {},
            default_headers={"anthropic-version": version},
            headers=headers,
            query=query,
            extra_body=extra_body,
            accepts_continuation=accepts_continuation,
            max_connections=max_connections,
            connect_timeout=connect_timeout,
            transport=transport,
        )
        self.max_tokens = max_tokens

    @classmethod
    def from_table(
        cls, table: Table, *, max_connections: int = 64, connect_timeout: float = 5.0
    ) -> AnthropicClient:
        """Build from a provider's config table.

        Keys: ``base_url``, ``api_key_env``, ``version``, ``max_tokens``, ``headers``,
        ``query``, ``extra_body``.

        Raises:
            ConfigError: naming the key and what was expected.
        """
        options = options_from_table(
            table,
            base_url=ANTHROPIC_BASE_URL,
            max_connections=max_connections,
            connect_timeout=connect_timeout,
        )
        client = cls(
            version=table.text("version", ANTHROPIC_VERSION),
            max_tokens=table.integer("max_tokens", DEFAULT_MAX_TOKENS, minimum=1),
            **options,
        )
        table.done()
        return client

    def endpoint(self, call: ClientCall) -> str:
        return f"{self.base_url}/v1/messages"

    def payload(self, call: ClientCall) -> dict[str, Any]:
        system, messages = translate_messages(call.request.messages, call.prefill)
        params = call.request.params
        body: dict[str, Any] = dict(self.extra_body)
        body.update({key: params[key] for key in _NATIVE_PARAMS if key in params})
        body["model"] = call.upstream_model
        body["max_tokens"] = max_tokens_of(params, self.max_tokens)
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
        body["stream"] = call.stream
        return body

    def reader(self, call: ClientCall) -> Reader:
        return AnthropicReader(call, strip_leading=_cuts_whitespace(call))


def translate_messages(
    messages: Any, prefill: str | None = None
) -> tuple[str, list[dict[str, Any]]]:
    """OpenAI-style messages as Anthropic's ``system`` and ``messages``.

    System and developer messages (wherever they are) join ``system``; tool results become
    user text; messages without text are dropped; consecutive messages of one role merge into
    one with several content blocks; the prefill extends the last assistant message or becomes
    one, and the final assistant text loses its trailing whitespace.
    """
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        content = message.get("content")
        if role in ("system", "developer"):
            text = text_of(content)
            if text:
                system.append(text)
            continue
        if role == "tool":
            role = "user"
            content = _tool_result_text(message)
        blocks = _blocks(content)
        if not blocks:
            continue
        role = "assistant" if role == "assistant" else "user"
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
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
    return "\n\n".join(system), turns


def _cuts_whitespace(call: ClientCall) -> bool:
    """Whether ``translate_messages`` cut whitespace that ends the text being continued."""
    messages = call.request.messages
    tail = call.prefill or ""
    if messages and messages[-1].get("role") == "assistant":
        tail = text_of(messages[-1].get("content")) + tail
    return bool(tail) and tail != tail.rstrip()


def _tool_result_text(message: Any) -> str:
    text = text_of(message.get("content"))
    call_id = message.get("tool_call_id")
    return f"[tool result {call_id}]\n{text}" if isinstance(call_id, str) and call_id else text


def _blocks(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        return []
    blocks: list[dict[str, Any]] = []
    for part in content:
        if not isinstance(part, Mapping):
            continue
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str) and part["text"]:
            blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            url = get(dict(part), "image_url", "url")
            if not isinstance(url, str):
                url = part.get("image_url")
            if isinstance(url, str):
                data = parse_data_url(url)
                source = (
                    {"type": "base64", "media_type": data[0], "data": data[1]}
                    if data
                    else {"type": "url", "url": url}
                )
                blocks.append({"type": "image", "source": source})
        elif kind in ("image", "document"):
            blocks.append(dict(part))  # already Anthropic-shaped
    return blocks


class AnthropicReader(Reader):
    """Reads Messages API events (streamed) or a message (whole)."""

    def __init__(self, call: ClientCall, *, strip_leading: bool = False):
        super().__init__(call)
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

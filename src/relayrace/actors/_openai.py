"""``OpenAIClient``: OpenAI chat completions, and every server that speaks them.

``POST {base_url}/chat/completions`` with the request's messages and params passed through as
they are (they are OpenAI-shaped already). Streamed answers are SSE chunks ended by
``data: [DONE]``; ``stream_options.include_usage`` asks for a last chunk with the usage.
Works for OpenAI, Azure OpenAI (``auth="api-key"`` and ``query={"api-version": …}``) and any
OpenAI-compatible server (vLLM, Ollama, OpenRouter, LiteLLM…) by its base URL.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

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
    options_from_table,
)

if TYPE_CHECKING:
    from .._table import Table

OPENAI_BASE_URL = "https://api.openai.com/v1"

AUTH_MODES = ("bearer", "api-key")


class OpenAIClient(HTTPProviderClient):
    """A client for OpenAI-compatible chat completions.

    Args:
        base_url: the API root, up to and without ``/chat/completions``
            (``https://api.openai.com/v1``, ``http://localhost:11434/v1``, an Azure deployment
            URL ``https://NAME.openai.azure.com/openai/deployments/DEPLOYMENT``).
        api_key: the key, or ``None`` for a server that needs none.
        auth: how the key is sent: ``bearer`` (``Authorization: Bearer …``) or ``api-key``
            (Azure's ``api-key`` header).
        headers: extra headers on every request (``OpenAI-Organization``, ``HTTP-Referer``…).
        query: query parameters on every request (Azure's ``api-version``).
        extra_body: fields added to every request body, under what the request sets.
        max_tokens: ``max_tokens`` to send when the request sets no limit itself.
        stream_usage: ask for the usage at the end of a stream (``stream_options``); turn off
            for servers that reject the option.
        accepts_continuation: declare that the server continues a trailing assistant message
            (OpenAI itself does not: it answers afresh).
        max_connections: the connection pool's size (the actor's ``max_concurrency``).
        connect_timeout: seconds to open a connection (the actor's ``budgets.connect``).
        transport: an ``httpx`` transport to use instead of the network (tests).

    Raises:
        ValueError: an argument is out of range.
    """

    label = "openai"

    def __init__(
        self,
        *,
        base_url: str = OPENAI_BASE_URL,
        api_key: str | None = None,
        auth: Literal["bearer", "api-key"] = "bearer",
        headers: Mapping[str, str] | None = None,
        query: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        max_tokens: int | None = None,
        stream_usage: bool = True,
        accepts_continuation: bool = False,
        max_connections: int = 64,
        connect_timeout: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        if auth not in AUTH_MODES:
            raise ValueError(f"auth: expected one of {', '.join(AUTH_MODES)}")
        auth_headers: dict[str, str] = {}
        if api_key:
            auth_headers = (
                {"authorization": f"Bearer {api_key}"} if auth == "bearer" else {"api-key": api_key}
            )
        super().__init__(
            base_url=base_url,
            api_key=api_key,
            auth_headers=auth_headers,
            headers=headers,
            query=query,
            extra_body=extra_body,
            accepts_continuation=accepts_continuation,
            max_connections=max_connections,
            connect_timeout=connect_timeout,
            transport=transport,
        )
        self.max_tokens = max_tokens
        self.stream_usage = stream_usage

    @classmethod
    def from_table(
        cls,
        table: Table,
        *,
        base_url: str = OPENAI_BASE_URL,
        max_connections: int = 64,
        connect_timeout: float = 5.0,
    ) -> OpenAIClient:
        """Build from a provider's config table.

        Keys: ``base_url`` (default: ``base_url``), ``api_key_env``, ``auth`` (``bearer`` /
        ``api-key``), ``headers``, ``query``, ``extra_body``, ``max_tokens``, ``stream_usage``.

        Raises:
            ConfigError: naming the key and what was expected.
        """
        options = options_from_table(
            table,
            base_url=base_url,
            max_connections=max_connections,
            connect_timeout=connect_timeout,
        )
        client = cls(
            auth=table.choice("auth", AUTH_MODES, "bearer"),
            max_tokens=table.integer("max_tokens", None, minimum=1),
            stream_usage=table.flag("stream_usage", True),
            **options,
        )
        table.done()
        return client

    def endpoint(self, call: ClientCall) -> str:
        return f"{self.base_url}/chat/completions"

    def payload(self, call: ClientCall) -> dict[str, Any]:
        request = call.request
        messages = [dict(message) for message in request.messages]
        if call.prefill is not None:
            messages.append({"role": "assistant", "content": call.prefill})
        body: dict[str, Any] = {**self.extra_body, **request.params}
        body["model"] = call.upstream_model
        body["messages"] = messages
        if (
            self.max_tokens is not None
            and "max_tokens" not in body
            and "max_completion_tokens" not in body
        ):
            body["max_tokens"] = self.max_tokens
        body["stream"] = call.stream
        if call.stream and self.stream_usage:
            options = body.get("stream_options")
            body["stream_options"] = {
                **(options if isinstance(options, Mapping) else {}),
                "include_usage": True,
            }
        else:
            body.pop("stream_options", None)
        return body

    def reader(self, call: ClientCall) -> Reader:
        return OpenAIReader(call)


class OpenAIReader(Reader):
    """Reads chat completion chunks (streamed) or a chat completion (whole).

    Only the first choice (``index`` 0) is the answer; ``n > 1`` is not merged.
    """

    def event(self, event: ServerSentEvent) -> str | None:
        if event.data.strip() == "[DONE]":
            self.terminated = True
            return None
        if event.event == "error":
            raise UpstreamErrorBody(event.data)
        chunk = load_event(event)
        if chunk.get("error"):
            raise UpstreamErrorBody(chunk)
        self._common(chunk)
        choice = _first_choice(chunk)
        if choice is None:
            return None
        delta = choice.get("delta")
        text = _text(delta) if isinstance(delta, dict) else ""
        self._finish(choice, chunk)
        return text

    def whole(self, body: Any) -> str:
        body = expect_object(body, "response")
        if body.get("error"):
            raise UpstreamErrorBody(body)
        self._common(body)
        choice = _first_choice(body)
        if choice is None:
            raise MalformedStream("malformed_response", "the response has no choices")
        message = choice.get("message")
        text = _text(message) if isinstance(message, dict) else ""
        self._finish(choice, body)
        self.finished = True
        return text

    def _common(self, chunk: dict[str, Any]) -> None:
        self.answered_by(chunk.get("model"))
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.usage = Usage(
                prompt_tokens=as_int(usage.get("prompt_tokens")),
                completion_tokens=as_int(usage.get("completion_tokens")),
            )

    def _finish(self, choice: dict[str, Any], chunk: dict[str, Any]) -> None:
        reason = choice.get("finish_reason")
        if not isinstance(reason, str) or not reason:
            return
        if reason == "content_filter":
            raise UpstreamErrorBody(chunk)  # classify reads the finish reason: content_policy
        if reason == "error":
            # OpenRouter ends a choice this way when the upstream failed mid-answer.
            message = get(choice, "error", "message") or "the provider ended the answer in error"
            raise UpstreamErrorBody({"error": {"type": "stream_error", "message": message}})
        self.finish_reason = reason
        self.finished = True


def _first_choice(chunk: dict[str, Any]) -> dict[str, Any] | None:
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        return None
    for choice in choices:
        if isinstance(choice, dict) and choice.get("index", 0) == 0:
            return choice
    return None


def _text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    # A refusal (structured outputs) is what the model said instead of an answer.
    refusal = message.get("refusal")
    return refusal if isinstance(refusal, str) else ""

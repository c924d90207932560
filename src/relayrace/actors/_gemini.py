"""``GeminiClient``: the Gemini API (Google AI Studio's ``generateContent``).

``POST {base_url}/v1beta/models/{model}:generateContent``, or ``:streamGenerateContent?alt=sse``
for a stream, with the key in the ``x-goog-api-key`` header (never in the URL: URLs end up in
error messages). The OpenAI-style request is translated: system and developer messages become
``systemInstruction``, ``assistant`` becomes ``model``, consecutive messages of one role are
merged, content parts become ``parts``, params become ``generationConfig``.

A Gemini stream has no terminator: each event is a whole ``GenerateContentResponse``, the last
one carries the ``finishReason``, and the body ends. A stream that ends without a finish reason
was cut. A safety ``finishReason`` or a ``promptFeedback.blockReason`` is a ``content_policy``
failure.
"""

from __future__ import annotations

import mimetypes
import urllib.parse
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import httpx

from .._failure import _GEMINI_BLOCKED_FINISH  # one list of blocking reasons, shared with classify
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

GEMINI_BASE_URL = "https://generativelanguage.googleapis.com"
GEMINI_API_VERSION = "v1beta"

# OpenAI-style params and their place in Gemini's generationConfig.
_GENERATION_PARAMS = {
    "temperature": "temperature",
    "top_p": "topP",
    "top_k": "topK",
    "n": "candidateCount",
    "seed": "seed",
    "presence_penalty": "presencePenalty",
    "frequency_penalty": "frequencyPenalty",
}

# Gemini's finish reasons in the OpenAI vocabulary the rest of relayrace speaks.
_FINISH_REASONS = {"STOP": "stop", "MAX_TOKENS": "length"}


class GeminiClient(HTTPProviderClient):
    """A client for the Gemini API.

    Args:
        base_url: the API root, without the version (``https://generativelanguage.googleapis.com``).
        api_key: the key, sent as ``x-goog-api-key``.
        api_version: the path segment before ``models/`` (``v1beta``).
        max_tokens: ``maxOutputTokens`` to send when the request sets no limit itself.
        headers: extra headers on every request.
        query: query parameters on every request.
        extra_body: fields added to every request body (``safetySettings``…), under what the
            request sets.
        accepts_continuation: declare that the model continues a trailing ``model`` turn (off
            by default: Gemini does not promise to).
        max_connections: the connection pool's size (the actor's ``max_concurrency``).
        connect_timeout: seconds to open a connection (the actor's ``budgets.connect``).
        transport: an ``httpx`` transport to use instead of the network (tests).

    Raises:
        ValueError: an argument is out of range.
    """

    label = "gemini"

    def __init__(
        self,
        *,
        base_url: str = GEMINI_BASE_URL,
        api_key: str | None = None,
        api_version: str = GEMINI_API_VERSION,
        max_tokens: int | None = None,
        headers: Mapping[str, str] | None = None,
        query: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        accepts_continuation: bool = False,
        max_connections: int = 64,
        connect_timeout: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        super().__init__(
            base_url=base_url,
            api_key=api_key,
            auth_headers={"x-goog-api-key": api_key} if api_key else {},
            headers=headers,
            query=query,
            extra_body=extra_body,
            accepts_continuation=accepts_continuation,
            max_connections=max_connections,
            connect_timeout=connect_timeout,
            transport=transport,
        )
        self.api_version = api_version.strip("/")
        self.max_tokens = max_tokens

    @classmethod
    def from_table(
        cls, table: Table, *, max_connections: int = 64, connect_timeout: float = 5.0
    ) -> GeminiClient:
        """Build from a provider's config table.

        Keys: ``base_url``, ``api_key_env``, ``api_version``, ``max_tokens``, ``headers``,
        ``query``, ``extra_body``.

        Raises:
            ConfigError: naming the key and what was expected.
        """
        options = options_from_table(
            table,
            base_url=GEMINI_BASE_URL,
            max_connections=max_connections,
            connect_timeout=connect_timeout,
        )
        client = cls(
            api_version=table.text("api_version", GEMINI_API_VERSION),
            max_tokens=table.integer("max_tokens", None, minimum=1),
            **options,
        )
        table.done()
        return client

    def endpoint(self, call: ClientCall) -> str:
        model = call.upstream_model.removeprefix("models/")
        path = f"{self.base_url}/{self.api_version}/models/{urllib.parse.quote(model, safe='')}"
        if call.stream:
            return f"{path}:streamGenerateContent?alt=sse"
        return f"{path}:generateContent"

    def payload(self, call: ClientCall) -> dict[str, Any]:
        system, contents = translate_contents(call.request.messages, call.prefill)
        params = call.request.params
        body: dict[str, Any] = dict(self.extra_body)
        if isinstance(params.get("safetySettings"), list):
            body["safetySettings"] = params["safetySettings"]
        body["contents"] = contents
        if system:
            body["systemInstruction"] = {"parts": [{"text": system}]}
        config: dict[str, Any] = {}
        for source in (self.extra_body.get("generationConfig"), params.get("generationConfig")):
            if isinstance(source, Mapping):
                config.update(source)
        config.update(
            {name: params[key] for key, name in _GENERATION_PARAMS.items() if key in params}
        )
        max_tokens = max_tokens_of(params, self.max_tokens)
        if max_tokens is not None:
            config["maxOutputTokens"] = max_tokens
        stops = stop_sequences(params.get("stop"))
        if stops:
            config["stopSequences"] = stops
        if get(dict(params), "response_format", "type") in ("json_object", "json_schema"):
            config["responseMimeType"] = "application/json"
        if config:
            body["generationConfig"] = config
        return body

    def reader(self, call: ClientCall) -> Reader:
        return GeminiReader(call)


def translate_contents(
    messages: Any, prefill: str | None = None
) -> tuple[str, list[dict[str, Any]]]:
    """OpenAI-style messages as Gemini's system instruction and ``contents``.

    System and developer messages (wherever they are) join the system instruction; tool results
    become user text; messages without parts are dropped; consecutive messages of one role merge;
    the prefill extends the last ``model`` turn or becomes one.
    """
    system: list[str] = []
    contents: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        content = message.get("content")
        if role in ("system", "developer"):
            text = text_of(content)
            if text:
                system.append(text)
            continue
        if role == "tool":
            content = text_of(content)
        parts = _parts(content)
        if not parts:
            continue
        role = "model" if role == "assistant" else "user"
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": role, "parts": parts})
    if prefill:
        if contents and contents[-1]["role"] == "model":
            contents[-1]["parts"].append({"text": prefill})
        else:
            contents.append({"role": "model", "parts": [{"text": prefill}]})
    return "\n\n".join(system), contents


def _parts(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"text": content}] if content else []
    if not isinstance(content, list):
        return []
    parts: list[dict[str, Any]] = []
    for part in content:
        if not isinstance(part, Mapping):
            continue
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str) and part["text"]:
            parts.append({"text": part["text"]})
        elif kind == "image_url":
            url = get(dict(part), "image_url", "url")
            if not isinstance(url, str):
                url = part.get("image_url")
            if isinstance(url, str):
                data = parse_data_url(url)
                if data:
                    parts.append({"inlineData": {"mimeType": data[0], "data": data[1]}})
                else:
                    file: dict[str, str] = {"fileUri": url}
                    guessed = mimetypes.guess_type(urllib.parse.urlsplit(url).path)[0]
                    if guessed:
                        file["mimeType"] = guessed
                    parts.append({"fileData": file})
    return parts


class GeminiReader(Reader):
    """Reads ``GenerateContentResponse`` objects: one per SSE event, or one whole."""

    def event(self, event: ServerSentEvent) -> str | None:
        return self._response(load_event(event))

    def whole(self, body: Any) -> str:
        if isinstance(body, list):  # an array of responses, as without alt=sse
            text = "".join(self._response(expect_object(item, "response")) for item in body)
        else:
            text = self._response(expect_object(body, "response"))
            if not isinstance(body.get("candidates"), list):
                raise MalformedStream("malformed_response", "the response has no candidates")
        self.finished = True
        return text

    def _response(self, data: dict[str, Any]) -> str:
        if data.get("error"):
            raise UpstreamErrorBody(data)
        if get(data, "promptFeedback", "blockReason"):
            raise UpstreamErrorBody(data)  # classify reads the block: content_policy
        self.answered_by(data.get("modelVersion"))
        usage = data.get("usageMetadata")
        if isinstance(usage, dict):
            self.usage = Usage(
                prompt_tokens=as_int(usage.get("promptTokenCount")),
                # Thinking is output the model was paid for, as in OpenAI's completion tokens.
                completion_tokens=as_int(usage.get("candidatesTokenCount"))
                + as_int(usage.get("thoughtsTokenCount")),
            )
        candidate = get(data, "candidates", 0)
        if not isinstance(candidate, dict):
            return ""
        parts = get(candidate, "content", "parts")
        text = "".join(
            part["text"]
            for part in (parts if isinstance(parts, list) else [])
            if isinstance(part, dict)
            and isinstance(part.get("text"), str)
            and not part.get("thought")
        )
        reason = candidate.get("finishReason")
        if isinstance(reason, str) and reason and reason != "FINISH_REASON_UNSPECIFIED":
            if reason in _GEMINI_BLOCKED_FINISH:
                raise UpstreamErrorBody(data)  # classify reads the finish reason: content_policy
            self.finish_reason = _FINISH_REASONS.get(reason, reason.lower())
            self.finished = True
        return text

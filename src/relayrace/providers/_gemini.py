"""The Gemini ``generateContent`` wire format: request payload, reader, error codes, encoder.

``POST …/{version}/models/{model}:generateContent`` (whole) or
``:streamGenerateContent?alt=sse`` (streamed). The OpenAI-style request is translated: system
and developer messages become ``systemInstruction``, ``assistant`` becomes ``model``,
consecutive messages of one role are merged, content parts become ``parts``, params become
``generationConfig``.

A Gemini stream has no terminator: each event is a whole ``GenerateContentResponse``, the last
one carries the ``finishReason``, and the body ends. A stream that ends without a finish reason
was cut. A safety ``finishReason`` or a ``promptFeedback.blockReason`` is a ``content_policy``
failure.
"""

from __future__ import annotations

import json
import mimetypes
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

from .._failure import Category
from .._values import Request, ToolCall, Usage
from ._errors import MalformedStream, UpstreamErrorBody
from ._format import WireFormat
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
from ._messages import call_parts, content_parts, translate_turns
from ._reader import Reader
from ._sse import ServerSentEvent
from ._tools import chosen_function, function_tools, made_id

NAME = "gemini"
API_VERSION = "v1beta"

#: ``error.status`` / ``ErrorInfo.reason`` values and their category.
ERROR_CODES: dict[str, Category] = {
    "resource_exhausted": Category.RATE_LIMIT,
    "unavailable": Category.PROVIDER_5XX,
    "internal": Category.PROVIDER_5XX,
    "deadline_exceeded": Category.TIMEOUT,
    "unauthenticated": Category.AUTH,
    "permission_denied": Category.AUTH,
    "not_found": Category.MODEL_NOT_FOUND,
    "unimplemented": Category.MODEL_NOT_FOUND,
    "api_key_invalid": Category.AUTH,
}

#: ``finishReason`` values that mean the answer was withheld by a safety or policy filter.
BLOCKED_FINISH = frozenset(
    {
        "SAFETY",
        "RECITATION",
        "BLOCKLIST",
        "PROHIBITED_CONTENT",
        "SPII",
        "IMAGE_SAFETY",
        "IMAGE_PROHIBITED_CONTENT",
    }
)

#: error kind (``relayrace.providers.ERROR_KINDS``) → (status, STATUS, message).
ERRORS: dict[str, tuple[int, str, str]] = {
    "rate_limit": (429, "RESOURCE_EXHAUSTED", "Resource has been exhausted (e.g. check quota)."),
    "quota": (
        429,
        "RESOURCE_EXHAUSTED",
        "You exceeded your current quota, please check your plan and billing details.",
    ),
    "server": (500, "INTERNAL", "An internal error has occurred. Please retry."),
    "unavailable": (503, "UNAVAILABLE", "The service is currently unavailable."),
    "overloaded": (503, "UNAVAILABLE", "The model is overloaded. Please try again later."),
    "unauthorized": (401, "UNAUTHENTICATED", "API key not valid. Please pass a valid API key."),
    "forbidden": (403, "PERMISSION_DENIED", "The caller does not have permission."),
    "not_found": (
        404,
        "NOT_FOUND",
        "models/{model} is not found for API version v1beta, or is not supported for "
        "generateContent.",
    ),
    "context_length": (
        400,
        "INVALID_ARGUMENT",
        "The input token count (1048577) exceeds the maximum number of tokens allowed "
        "(1048576).",
    ),
    "content_policy": (400, "INVALID_ARGUMENT", "The request was blocked by the content filter."),
    "prefill": (400, "INVALID_ARGUMENT", "The conversation must end with a user turn."),
    "bad_request": (400, "INVALID_ARGUMENT", "{model}"),
}

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

# Gemini's finish reasons in the OpenAI vocabulary the rest of relayrace speaks, and back.
_FINISH_REASONS = {"STOP": "stop", "MAX_TOKENS": "length"}
# tool_choice → functionCallingConfig.mode
_CALLING_MODES = {"auto": "AUTO", "required": "ANY", "none": "NONE"}
_NATIVE_FINISH = {"stop": "STOP", "length": "MAX_TOKENS"}


# --- the request ----------------------------------------------------------------------------


def path(model: str, *, stream: bool, api_version: str = API_VERSION) -> str:
    """The endpoint's path under the API root."""
    model = urllib.parse.quote(model.removeprefix("models/"), safe="")
    base = f"/{api_version}/models/{model}"
    return f"{base}:streamGenerateContent?alt=sse" if stream else f"{base}:generateContent"


def payload(
    request: Request,
    *,
    prefill: str | None = None,
    extra_body: Mapping[str, Any] | None = None,
    max_tokens: int | None = None,
) -> dict[str, Any]:
    """The JSON body of a ``generateContent`` request (the model and the stream flag are in the
    path, see ``path``).

    Args:
        request: the caller's request.
        prefill: text the answer must continue.
        extra_body: fields under what the request sets (its ``generationConfig`` is merged).
        max_tokens: ``maxOutputTokens`` when the request sets no limit itself.
    """
    extra = dict(extra_body or {})
    system, contents = translate_contents(request.messages, prefill)
    params = request.params
    body: dict[str, Any] = dict(extra)
    if isinstance(params.get("safetySettings"), list):
        body["safetySettings"] = params["safetySettings"]
    body["contents"] = contents
    if system:
        body["systemInstruction"] = {"parts": [{"text": system}]}
    config: dict[str, Any] = {}
    for source in (extra.get("generationConfig"), params.get("generationConfig")):
        if isinstance(source, Mapping):
            config.update(source)
    config.update({name: params[key] for key, name in _GENERATION_PARAMS.items() if key in params})
    limit = max_tokens_of(params, max_tokens)
    if limit is not None:
        config["maxOutputTokens"] = limit
    stops = stop_sequences(params.get("stop"))
    if stops:
        config["stopSequences"] = stops
    response_format = get(dict(params), "response_format", "type")
    if response_format in ("json_object", "json_schema"):
        config["responseMimeType"] = "application/json"
    if response_format == "json_schema":
        schema = get(dict(params), "response_format", "json_schema", "schema")
        if isinstance(schema, Mapping):
            config["responseSchema"] = schema
    _add_tools(body, params)
    if config:
        body["generationConfig"] = config
    return body


def _add_tools(body: dict[str, Any], params: Mapping[str, Any]) -> None:
    functions = function_tools(params)
    if not functions:
        return
    body["tools"] = [
        {
            "functionDeclarations": [
                {key: function[key] for key in ("name", "description", "parameters") if key in function}
                for function in functions
            ]
        }
    ]
    named = chosen_function(params)
    choice = params.get("tool_choice")
    if named is not None:
        body["toolConfig"] = {
            "functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": [named]}
        }
    elif isinstance(choice, str) and choice in _CALLING_MODES:
        body["toolConfig"] = {"functionCallingConfig": {"mode": _CALLING_MODES[choice]}}


def translate_contents(
    messages: Any, prefill: str | None = None
) -> tuple[str, list[dict[str, Any]]]:
    """OpenAI-style messages as Gemini's system instruction and ``contents``.

    System and developer messages (wherever they are) join the system instruction; tool calls
    become ``functionCall`` parts and tool results ``functionResponse`` parts of a user turn
    (named by the call they answer; a result that is no JSON object is wrapped as
    ``{"result": …}``); messages without parts are dropped; consecutive messages of one role merge;
    the prefill extends the last ``model`` turn or becomes one.
    """
    system, contents = translate_turns(
        messages,
        parts=_parts,
        tool_call=_function_call,
        tool_result=_function_response,
        assistant="model",
        key="parts",
    )
    if prefill:
        if contents and contents[-1]["role"] == "model":
            contents[-1]["parts"].append({"text": prefill})
        else:
            contents.append({"role": "model", "parts": [{"text": prefill}]})
    return system, contents


def _function_call(call: Mapping[str, Any]) -> dict[str, Any]:
    _, name, arguments = call_parts(call)
    return {"functionCall": {"name": name, "args": arguments}}


def _function_response(message: Mapping[str, Any], name: str) -> dict[str, Any]:
    text = text_of(message.get("content"))
    try:
        result: Any = json.loads(text)
    except ValueError:
        result = text
    if not isinstance(result, dict):
        result = {"result": result}
    return {"functionResponse": {"name": name, "response": result}}


def _image_part(url: str) -> dict[str, Any]:
    data = parse_data_url(url)
    if data:
        return {"inlineData": {"mimeType": data[0], "data": data[1]}}
    file: dict[str, str] = {"fileUri": url}
    guessed = mimetypes.guess_type(urllib.parse.urlsplit(url).path)[0]
    if guessed:
        file["mimeType"] = guessed
    return {"fileData": file}


def _parts(content: Any) -> list[dict[str, Any]]:
    return content_parts(content, text=lambda text: {"text": text}, image=_image_part)


# --- the response ---------------------------------------------------------------------------


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
            thoughts = as_int(usage.get("thoughtsTokenCount"))
            self.usage = Usage(
                prompt_tokens=as_int(usage.get("promptTokenCount")),
                # Thinking is output the model was paid for, as in OpenAI's completion tokens.
                completion_tokens=as_int(usage.get("candidatesTokenCount")) + thoughts,
                cached_tokens=as_int(usage.get("cachedContentTokenCount")),
                reasoning_tokens=thoughts,
            )
        candidate = get(data, "candidates", 0)
        if not isinstance(candidate, dict):
            return ""
        parts = get(candidate, "content", "parts")
        texts: list[str] = []
        for part in parts if isinstance(parts, list) else []:
            if not isinstance(part, dict):
                continue
            if isinstance(part.get("text"), str) and not part.get("thought"):
                texts.append(part["text"])
            elif "functionCall" in part:
                self._call(part["functionCall"])
        reason = candidate.get("finishReason")
        if isinstance(reason, str) and reason and reason != "FINISH_REASON_UNSPECIFIED":
            if reason in BLOCKED_FINISH:
                raise UpstreamErrorBody(data)  # classify reads the finish reason: content_policy
            self.tools.check()
            self.finish_reason = _FINISH_REASONS.get(reason, reason.lower())
            if reason == "STOP" and self.tools.count:
                self.finish_reason = "tool_calls"
            self.finished = True
        return "".join(texts)

    def _call(self, call: Any) -> None:
        # Gemini sends whole calls, without ids (or with its own, newer models).
        if not isinstance(call, dict):
            raise MalformedStream("malformed_tool_call", "a functionCall that is not an object")
        arguments = call.get("args", {})
        if not isinstance(arguments, dict):
            raise MalformedStream("malformed_tool_call", "functionCall args that are no object")
        text = dumps(arguments)
        name = call.get("name")
        index = self.tools.count
        call_id = call.get("id") or made_id(index, name if isinstance(name, str) else "", text)
        self.tools.add(self.tools.start(index, call_id, name), text)


# --- writing the format ---------------------------------------------------------------------


def finish_reason_of(finish_reason: str) -> str:
    """An OpenAI-vocabulary finish reason as Gemini's ``finishReason``."""
    if finish_reason == "tool_calls":
        return "STOP"
    return _NATIVE_FINISH.get(finish_reason, finish_reason.upper())


def usage_of(usage: Usage) -> dict[str, int]:
    """A ``usageMetadata`` object (``candidatesTokenCount`` excludes the thinking)."""
    out = {
        "promptTokenCount": usage.prompt_tokens,
        "candidatesTokenCount": usage.completion_tokens - usage.reasoning_tokens,
        "totalTokenCount": usage.prompt_tokens + usage.completion_tokens,
    }
    if usage.reasoning_tokens:
        out["thoughtsTokenCount"] = usage.reasoning_tokens
    if usage.cached_tokens:
        out["cachedContentTokenCount"] = usage.cached_tokens
    return out


def response(
    *,
    id: str,
    model: str,
    text: str,
    finish_reason: str | None = None,
    usage: Usage | None = None,
    tool_calls: Sequence[ToolCall] = (),
) -> dict[str, Any]:
    """One ``GenerateContentResponse``: a stream event, or (with a finish reason) the last one
    or a whole answer. Tool calls are written as ``functionCall`` parts (without ids: Gemini
    sends none), and a finish reason ``tool_calls`` as ``STOP``."""
    parts: list[dict[str, Any]] = [{"text": text}] if text or not tool_calls else []
    parts.extend(
        {"functionCall": {"name": call.name, "args": json.loads(call.arguments)}}
        for call in tool_calls
    )
    candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"}}
    if finish_reason is not None:
        candidate["finishReason"] = finish_reason_of(finish_reason)
    candidate["index"] = 0
    chunk: dict[str, Any] = {"candidates": [candidate]}
    if usage is not None:
        chunk["usageMetadata"] = usage_of(usage)
    chunk["modelVersion"] = model
    chunk["responseId"] = id
    return chunk


def blocked(*, id: str, model: str, prompt_tokens: int, reason: str = "SAFETY") -> dict[str, Any]:
    """A response whose prompt a safety filter blocked (a 200, as Gemini does it)."""
    return {
        "promptFeedback": {
            "blockReason": reason,
            "safetyRatings": [{"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH"}],
        },
        "usageMetadata": {"promptTokenCount": prompt_tokens, "totalTokenCount": prompt_tokens},
        "modelVersion": model,
        "responseId": id,
    }


def error_status(kind: str) -> int:
    """The HTTP status of an error kind."""
    return ERRORS[kind][0]


def error_body(
    kind: str, model: str, *, status: int | None = None, retry_after: float | None = None
) -> dict[str, Any]:
    """The error body of an error kind (``{model}`` in its message is ``model``).

    Args:
        kind: the error kind.
        model: fills ``{model}`` (for ``bad_request``: the whole message).
        status: the numeric ``code`` (the HTTP status sent; the kind's own by default).
        retry_after: seconds for a ``RetryInfo`` detail.
    """
    default, code, text = ERRORS[kind]
    error: dict[str, Any] = {
        "code": default if status is None else status,
        "message": text.replace("{model}", model),
        "status": code,
    }
    details: list[dict[str, Any]] = []
    if kind in ("rate_limit", "quota"):
        quota = "GenerateRequestsPerMinutePerProjectPerModel"
        if kind == "quota":
            quota = "GenerateRequestsPerDayPerProjectPerModel-FreeTier"
        details.append(
            {
                "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                "violations": [{"quotaMetric": "generate_content_requests", "quotaId": quota}],
            }
        )
    elif kind == "unauthorized":
        details.append(
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "API_KEY_INVALID",
                "domain": "googleapis.com",
            }
        )
    if retry_after is not None:
        details.append(
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{retry_after:g}s"}
        )
    if details:
        error["details"] = details
    return {"error": error}


class Framer:
    """Frames a stream of responses: SSE events (``alt=sse``), or one JSON array.

    Args:
        sse: write SSE events (else the elements of a JSON array).
    """

    __slots__ = ("sse", "framed")

    def __init__(self, sse: bool):
        self.sse = sse
        self.framed = 0  # responses written so far

    @property
    def media_type(self) -> bytes:
        return b"text/event-stream" if self.sse else b"application/json"

    def frame(self, data: bytes) -> bytes:
        """One response's JSON (``data``, already encoded) as the next element."""
        self.framed += 1
        if self.sse:
            return b"data: " + data + b"\r\n\r\n"
        return (b"[" if self.framed == 1 else b",\r\n") + data

    def write(self, value: Any) -> bytes:
        """One response as the next element."""
        return self.frame(dumps(value).encode())

    def end(self) -> bytes:
        """What ends the body (the array's ``]``; nothing for SSE)."""
        if self.sse:
            return b""
        return b"[]" if self.framed == 0 else b"]"


FORMAT = WireFormat(
    name=NAME, error_codes=ERROR_CODES, error_status=error_status, error_body=error_body
)

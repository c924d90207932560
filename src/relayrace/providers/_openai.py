"""The OpenAI chat completions wire format: request payload, reader, error codes, encoder.

``POST …/chat/completions`` with the request's messages and params passed through as they are
(they are OpenAI-shaped already). Streamed answers are SSE chunks ended by ``data: [DONE]``;
``stream_options.include_usage`` asks for a last chunk with the usage.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .._failure import Category
from .._values import Choice, Request, ToolCall, ToolCallDelta, Usage, tool_calls_of
from ._errors import MalformedStream, UpstreamErrorBody, check_text
from ._format import PREFILL_REFUSED, WireFormat
from ._json import as_int, dumps, dumps_str, expect_object, get, load_event
from ._reader import Reader
from ._sse import ServerSentEvent, encode_event

NAME = "openai"

#: the path of the endpoint, under the API root.
PATH = "/chat/completions"

#: ``error.code`` / ``error.type`` values (Azure adds ``innererror.code``) and their category.
ERROR_CODES: dict[str, Category] = {
    "rate_limit_exceeded": Category.RATE_LIMIT,
    "insufficient_quota": Category.QUOTA_EXHAUSTED,
    "billing_hard_limit_reached": Category.QUOTA_EXHAUSTED,
    "billing_not_active": Category.QUOTA_EXHAUSTED,
    "context_length_exceeded": Category.CONTEXT_LENGTH,
    "model_not_found": Category.MODEL_NOT_FOUND,
    "invalid_api_key": Category.AUTH,
    "account_deactivated": Category.AUTH,
    "unsupported_country_region_territory": Category.AUTH,
    "content_filter": Category.CONTENT_POLICY,
    "content_policy_violation": Category.CONTENT_POLICY,
    "responsibleaipolicyviolation": Category.CONTENT_POLICY,
    "server_error": Category.PROVIDER_5XX,
}

#: error kind (``relayrace.providers.ERROR_KINDS``) → (status, type, code, message).
ERRORS: dict[str, tuple[int, str, str | None, str]] = {
    "rate_limit": (429, "requests", "rate_limit_exceeded", "Rate limit reached for requests to {model}."),
    "quota": (
        429,
        "insufficient_quota",
        "insufficient_quota",
        "You exceeded your current quota, please check your plan and billing details.",
    ),
    "server": (500, "server_error", None, "The server had an error while processing your request."),
    "unavailable": (503, "server_error", None, "Service unavailable."),
    "overloaded": (503, "server_error", None, "The engine is currently overloaded, please try again later."),
    "unauthorized": (401, "invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    "forbidden": (
        403,
        "invalid_request_error",
        "unsupported_country_region_territory",
        "Country, region, or territory not supported.",
    ),
    "not_found": (
        404,
        "invalid_request_error",
        "model_not_found",
        "The model `{model}` does not exist or you do not have access to it.",
    ),
    "context_length": (
        400,
        "invalid_request_error",
        "context_length_exceeded",
        "This model's maximum context length is 8192 tokens. However, your messages "
        "resulted in 9000 tokens. Please reduce the length of the messages.",
    ),
    "content_policy": (
        400,
        "invalid_request_error",
        "content_policy_violation",
        "Your request was rejected as a result of our safety system.",
    ),
    "prefill": (400, "invalid_request_error", None, PREFILL_REFUSED),
    "bad_request": (400, "invalid_request_error", None, "{model}"),
}

# OpenAI's own limit on n; a choice index past it is ignored (never a reader per index).
_MAX_N = 128

#: the stream's terminator.
DONE = b"data: [DONE]\n\n"


# --- the request ----------------------------------------------------------------------------


def payload(
    request: Request,
    *,
    model: str,
    stream: bool,
    prefill: str | None = None,
    extra_body: Mapping[str, Any] | None = None,
    max_tokens: int | None = None,
    stream_usage: bool = True,
) -> dict[str, Any]:
    """The JSON body of a chat completion request.

    Args:
        request: the caller's request (its params are passed through).
        model: the upstream model.
        stream: ask for a stream.
        prefill: text the answer must continue (sent as a trailing assistant message).
        extra_body: fields under what the request sets.
        max_tokens: sent when the request sets no limit itself.
        stream_usage: ask for the usage at the end of a stream (``stream_options``).
    """
    messages = [dict(message) for message in request.messages]
    if prefill is not None:
        messages.append({"role": "assistant", "content": prefill})
    body: dict[str, Any] = {**(extra_body or {}), **request.params}
    body["model"] = model
    body["messages"] = messages
    if max_tokens is not None and "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = max_tokens
    body["stream"] = stream
    if stream and stream_usage:
        options = body.get("stream_options")
        body["stream_options"] = {
            **(options if isinstance(options, Mapping) else {}),
            "include_usage": True,
        }
    else:
        body.pop("stream_options", None)
    return body


# --- the response ---------------------------------------------------------------------------


class OpenAIReader(Reader):
    """Reads chat completion chunks (streamed) or a chat completion (whole).

    The first choice (``index`` 0) is the answer; the others (``n > 1``) are read apart, by a
    reader each, and given whole by ``other_choices``. A streamed
    tool call is a new call when its fragment carries an id the current call at its upstream
    index does not have, so that an upstream reusing index 0 (Ollama) never merges two calls.
    """

    def __init__(self, model: str):
        super().__init__(model)
        # upstream index → (its call's id, our index)
        self._calls: dict[Any, tuple[Any, int]] = {}
        # the other choices (n > 1), each read by a reader of its own, and their text
        self._others: dict[int, OpenAIReader] = {}
        self._texts: list[str] = []

    def event(self, event: ServerSentEvent) -> str | None:
        data = event.data
        if "[DONE]" in data and data.strip() == "[DONE]":
            self.terminated = True
            return None
        if event.event == "error":
            raise UpstreamErrorBody(data)
        chunk = load_event(event)
        if chunk.get("error"):
            raise UpstreamErrorBody(chunk)
        # The fast path, most chunks of a stream: one choice, index 0, text only (no tool call,
        # refusal, log probabilities, finish reason or usage), the model already known. What
        # it returns is what the general path below returns for such a chunk.
        choices = chunk.get("choices")
        model = chunk.get("model")
        if (
            type(choices) is list
            and len(choices) == 1
            and chunk.get("usage") is None
            and (model == self.model or not model or type(model) is not str)
        ):
            choice = choices[0]
            if (
                type(choice) is dict
                and choice.get("finish_reason") is None
                and choice.get("logprobs") is None
            ):
                index = choice.get("index", 0)
                delta = choice.get("delta")
                if (
                    index == 0
                    and type(index) is int
                    and type(delta) is dict
                    and delta.get("tool_calls") is None
                    and delta.get("refusal") is None
                ):
                    content = delta.get("content")
                    return content if type(content) is str else ""
        self._common(chunk)
        text = ""
        for index, choice in _choices(chunk):
            if index == 0:
                text = self._choice(choice, chunk, "delta")
            else:
                other = self._other(index)
                other._texts.append(other._choice(choice, chunk, "delta"))
        return text

    def whole(self, body: Any) -> str:
        body = expect_object(body, "response")
        if body.get("error"):
            raise UpstreamErrorBody(body)
        self._common(body)
        text: str | None = None
        for index, choice in _choices(body):
            if index == 0:
                text = self._choice(choice, body, "message")
                self.tools.check()
            else:
                other = self._other(index)
                other._texts.append(other._choice(choice, body, "message"))
                other.tools.check()
        if text is None:
            raise MalformedStream("malformed_response", "the response has no choices")
        self.finished = True
        return text

    def other_choices(self) -> list[Choice]:
        out = []
        for index, other in sorted(self._others.items()):
            other.tools.check()
            out.append(
                Choice(
                    index=index,
                    text="".join(other._texts),
                    tool_calls=tool_calls_of(other.tools.pending),
                    finish_reason=other.finish_reason,
                    refusal=other.refusal,
                    logprobs=None if other.logprobs is None else {"content": other.logprobs},
                )
            )
        return out

    def _other(self, index: int) -> OpenAIReader:
        other = self._others.get(index)
        if other is None:
            other = self._others[index] = OpenAIReader(self.model)
        return other

    def _choice(self, choice: dict[str, Any], chunk: dict[str, Any], key: str) -> str:
        """Read one choice (its ``delta`` streamed, its ``message`` whole); return its text."""
        message = choice.get(key)
        text = ""
        if isinstance(message, dict):
            text = _content(message)
            self._refusal(message)
            calls = message.get("tool_calls")
            if isinstance(calls, list):
                for number, call in enumerate(calls):
                    if key == "delta":
                        self._fragment(call)
                    else:
                        self._whole_call(number, call)
        self.add_logprobs(choice.get("logprobs"))
        self._finish(choice, chunk)
        return text

    def _whole_call(self, number: int, call: Any) -> None:
        if not isinstance(call, dict):
            raise MalformedStream("malformed_tool_call", "a tool call that is not an object")
        function = call.get("function")
        function = function if isinstance(function, dict) else {}
        index = self.tools.start(number, _id(call.get("id")), function.get("name"))
        self.tools.add(index, function.get("arguments"))

    def _fragment(self, call: Any) -> None:
        if not isinstance(call, dict):
            raise MalformedStream("malformed_tool_call", "a tool-call fragment that is not an object")
        upstream = call.get("index", 0)
        call_id = _id(call.get("id"))
        function = call.get("function")
        function = function if isinstance(function, dict) else {}
        current = self._calls.get(upstream)
        if current is None or (call_id is not None and call_id != current[0]):
            index = self.tools.start((upstream, self.tools.count), call_id, function.get("name"))
            self._calls[upstream] = (call_id, index)
        else:
            index = current[1]
        arguments = function.get("arguments")
        if arguments is not None:
            self.tools.add(index, arguments)

    def _refusal(self, message: dict[str, Any]) -> None:
        refusal = message.get("refusal")
        if isinstance(refusal, str) and refusal:
            self.refusal = check_text((self.refusal or "") + refusal, "a refusal")

    def _common(self, chunk: dict[str, Any]) -> None:
        self.answered_by(chunk.get("model"))
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.usage = Usage(
                prompt_tokens=as_int(usage.get("prompt_tokens")),
                completion_tokens=as_int(usage.get("completion_tokens")),
                cached_tokens=as_int(get(usage, "prompt_tokens_details", "cached_tokens")),
                reasoning_tokens=as_int(
                    get(usage, "completion_tokens_details", "reasoning_tokens")
                ),
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
        self.tools.check()
        self.finish_reason = reason
        self.finished = True


def _id(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _choices(chunk: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """A chunk's choices with their indexes (only the first is the answer unless ``n > 1``)."""
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        return []
    out = []
    for choice in choices:
        if isinstance(choice, dict):
            index = choice.get("index", 0)
            if isinstance(index, int) and not isinstance(index, bool) and 0 <= index < _MAX_N:
                out.append((index, choice))
    return out


def _content(message: dict[str, Any]) -> str:
    content = message.get("content")
    return content if isinstance(content, str) else ""


# --- writing the format ---------------------------------------------------------------------


def usage_of(usage: Usage) -> dict[str, Any]:
    """A ``usage`` object (with its details where a count is reported)."""
    return usage.to_dict()


def completion(
    *,
    id: str,
    created: int,
    model: str,
    text: str,
    finish_reason: str = "stop",
    usage: Usage | None = None,
    tool_calls: Sequence[ToolCall] = (),
    refusal: str | None = None,
    logprobs: Sequence[Any] | None = None,
    choices: Sequence[Choice] = (),
) -> dict[str, Any]:
    """A whole ``chat.completion`` (``choices``: those past the first, for ``n > 1``)."""
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": refusal}
    if tool_calls:
        message["content"] = text or None
        message["tool_calls"] = [call.to_dict() for call in tool_calls]
    first = {
        "index": 0,
        "message": message,
        "logprobs": None if logprobs is None else {"content": list(logprobs)},
        "finish_reason": finish_reason,
    }
    return {
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [first, *(_choice_of(choice) for choice in choices)],
        "usage": None if usage is None else usage_of(usage),
        "system_fingerprint": None,
    }


def _choice_of(choice: Choice) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": choice.text, "refusal": None}
    if choice.tool_calls:
        message["tool_calls"] = [call.to_dict() for call in choice.tool_calls]
    return {
        "index": choice.index,
        "message": message,
        "logprobs": choice.logprobs,
        "finish_reason": choice.finish_reason or "stop",
    }


def error_status(kind: str) -> int:
    """The HTTP status of an error kind."""
    return ERRORS[kind][0]


def error_body(
    kind: str, model: str, *, status: int | None = None, retry_after: float | None = None
) -> dict[str, Any]:
    """The error body of an error kind (``{model}`` in its message is ``model``; for
    ``bad_request``, ``model`` is the whole message)."""
    _, type_, code, message = ERRORS[kind]
    param = "messages" if kind in ("context_length", "prefill") else None
    return {
        "error": {
            "message": message.replace("{model}", model),
            "type": type_,
            "param": param,
            "code": code,
        }
    }


def event(data: Any) -> bytes:
    """One SSE event carrying ``data`` as JSON."""
    return encode_event(dumps(data))


class StreamEncoder:
    """The ``chat.completion.chunk`` events of one streamed answer.

    ``content`` is the hot path: the SSE event of one content delta, byte for byte what
    ``event(chunk(model, {"content": text}, None))`` writes, formatted around the encoded text
    instead of building and encoding a dict per delta.

    Args:
        chunk_id: the ``id`` of every chunk (``chatcmpl-…``).
        created: the ``created`` time of every chunk (epoch seconds).
        include_usage: the client asked for ``stream_options.include_usage``: every chunk
            carries ``"usage": null`` and a last chunk carries the usage.
    """

    __slots__ = ("chunk_id", "created", "include_usage", "_head", "_end", "_model", "_prefix")

    def __init__(self, chunk_id: str, created: int, include_usage: bool):
        self.chunk_id = chunk_id
        self.created = created
        self.include_usage = include_usage
        self._head = (
            f'data: {{"id":{dumps(chunk_id)},"object":"chat.completion.chunk",'
            f'"created":{dumps(created)},"model":'
        )
        self._end = ',"usage":null}\n\n' if include_usage else "}\n\n"
        self._model: str | None = None
        self._prefix = ""

    def chunk(self, model: str, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        """One chunk as a dict (to add fields to before ``event``)."""
        body: dict[str, Any] = {
            "id": self.chunk_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if self.include_usage:
            body["usage"] = None
        return body

    def content(self, model: str, text: str, *, first: bool = False) -> bytes:
        """The event of one content delta (``first``: it also says the role)."""
        if model != self._model:
            self._model = model
            self._prefix = (
                f'{self._head}{dumps(model)},"system_fingerprint":null,'
                '"choices":[{"index":0,"delta":{'
            )
        role = '"role":"assistant",' if first else ""
        return (
            f'{self._prefix}{role}"content":{dumps_str(text)}}},'
            f'"logprobs":null,"finish_reason":null}}]{self._end}'
        ).encode()

    def tool_calls(
        self,
        model: str,
        fragments: Sequence[ToolCallDelta],
        *,
        upstream_index: Callable[[int], int] | None = None,
    ) -> bytes:
        """The event of tool-call fragments (``upstream_index``: the index to write for each of
        ours; the mock uses it to reuse index 0 the way some upstreams do)."""
        items = []
        for fragment in fragments:
            item = fragment.to_dict()
            if upstream_index is not None:
                item["index"] = upstream_index(fragment.index)
            items.append(item)
        return event(self.chunk(model, {"tool_calls": items}, None))

    def logprobs(self, model: str, text: str, content: Sequence[Any]) -> bytes:
        """The event of a content delta with its log probabilities."""
        body = self.chunk(model, {"content": text}, None)
        body["choices"][0]["logprobs"] = {"content": list(content)}
        return event(body)

    def other_choice(self, model: str, index: int, text: str, finish: str | None) -> bytes:
        """The event of a content delta of choice ``index`` (``n > 1``)."""
        body = self.chunk(model, {"content": text}, finish)
        body["choices"][0]["index"] = index
        return event(body)

    def refusal(self, model: str, text: str) -> bytes:
        """The event of a refusal delta."""
        return event(self.chunk(model, {"refusal": text}, None))

    def usage_chunk(self, model: str, usage: Usage | None) -> dict[str, Any]:
        """The last chunk of a stream that asked for the usage: no choices, the usage."""
        body = self.chunk(model, {}, None)
        body["choices"] = []
        body["usage"] = None if usage is None else usage_of(usage)
        return body

    def opening(self, model: str) -> bytes:
        """The first event: the role, empty content."""
        return event(self.chunk(model, {"role": "assistant", "content": "", "refusal": None}, None))

    def closing(
        self, model: str, finish_reason: str, usage: Usage | None, *, terminator: bool = True
    ) -> bytes:
        """The events that end a stream: the finish reason, the usage if asked, ``[DONE]``."""
        out = event(self.chunk(model, {}, finish_reason))
        if self.include_usage:
            out += event(self.usage_chunk(model, usage))
        return out + DONE if terminator else out

    def error(self, kind: str, model: str) -> bytes:
        """An error inside the 200 stream (an ``{"error": …}`` chunk)."""
        return event(error_body(kind, model))


FORMAT = WireFormat(
    name=NAME, error_codes=ERROR_CODES, error_status=error_status, error_body=error_body
)

"""A fault-injecting mock LLM provider: a real HTTP/1.1 server on trio sockets and h11.

One server speaks three wire formats at once:

- OpenAI: ``POST /v1/chat/completions`` (also ``/chat/completions``), JSON or SSE
  (``stream: true``; a usage chunk when ``stream_options.include_usage``; ``data: [DONE]``).
- Anthropic: ``POST /v1/messages``, JSON or SSE (``message_start`` … ``message_stop``).
- Gemini: ``POST /v1beta/models/{model}:generateContent`` and
  ``:streamGenerateContent?alt=sse`` (without ``alt=sse``: a streamed JSON array).

Every answer carries the model name that was asked for and a usage block: the prompt tokens are
the words of the request's text, the completion tokens the words of the answer
(``SCRIPTED_ANSWER``, 9 words, repeated ``repeat`` times).

The scenario grammar
--------------------

The model name picks the behaviour, so one server serves every scenario at once::

    model    := scenario ("," key "=" value)*
    examples    ok   ok,chunks=20,delay=0.01   rate-limit,retry_after=2   flaky,tag=east

An ``x-mock-scenario`` request header, in the same grammar, overrides the model name (the answer
still names the model asked for). Commas survive in a Gemini URL path; the path segment is
percent-decoded. An unknown scenario is a 404 model-not-found; an unknown or invalid parameter
is a 400. Delays are seconds (trio time, so a ``MockClock`` drives them). Answers carry the
headers ``x-mock-scenario`` (the scenario that ran) and ``x-mock-attempt`` (the count for this
model name). ``GET /v1/models`` lists the scenarios, ``GET /health`` answers ``{"status": "ok"}``.

=================  ==========================================================================
scenario           behaviour
=================  ==========================================================================
``ok``             the answer in ``chunks`` pieces, ``delay`` apart
``slow``           ``ok`` whose first token comes after ``first_delay`` (default 30 s): a stream
                   sends its headers at once, then nothing until then
``rate-limit``     429, rate limited; a ``Retry-After`` header only with ``retry_after``
``quota``          429, quota / credit spent (``insufficient_quota`` and its equivalents)
``server-error``   500
``flaky``          ``server-error`` with ``times=1``: 500 once, then healthy
``unavailable``    503
``overloaded``     overloaded: 529 ``overloaded_error`` (Anthropic), 503 "overloaded" (others)
``unauthorized``   401
``forbidden``      403
``not-found``      404, model not found
``context-length`` 400 ``context_length_exceeded``
``content-policy`` 400 content-policy rejection (Gemini: a 200 with ``promptFeedback.blockReason
                   = SAFETY``, as Gemini does it)
``no-prefill``     400 when the last message is the assistant's (Gemini: ``model``), else ``ok``
``reset``          the connection is reset (RST) before any header
``hang``           the request is read and never answered
``cut``            the stream stops after ``after`` chunks: the connection is closed without a
                   terminator (``clean=1``: the HTTP body ends properly, still without one);
                   not streaming: the JSON body is cut in half
``stall``          after ``after`` chunks the stream stalls ``stall`` seconds (default 30), then
                   finishes normally
``malformed``      after ``after`` chunks one chunk of broken JSON, then the rest normally;
                   not streaming: a 200 whose JSON body is cut in half
``no-done``        the stream finishes (finish reason, usage) but sends no ``[DONE]`` /
                   ``message_stop`` (Gemini has no terminator: a normal stream)
``stream-error``   after ``after`` chunks an error inside the 200 stream (Anthropic
                   ``event: error``, an OpenAI ``data: {"error": …}`` chunk, a Gemini error
                   chunk), of kind ``error`` (default ``overloaded``); not streaming: that error
                   as an HTTP status
``flapping``       503 for the first ``down`` seconds (default 5) after the server started (or
                   ``reset()``), then healthy; with ``up``, down and up alternate
=================  ==========================================================================

Parameters (any scenario takes any of them; those that do not apply are ignored):

- ``chunks`` (5), ``delay`` (0), ``first_delay`` (0), ``repeat`` (1): the healthy answer.
- ``head_delay`` (0): wait before anything is sent, whatever the scenario.
- ``times``: a fault scenario fails only the first ``times`` requests for this model name (a
  counter per model name, see ``MockProvider.reset``), then answers healthily.
- ``status``: replace the HTTP status of an error; ``retry_after`` (whole seconds, rounded up),
  ``retry_after_ms``, ``should_retry`` (``x-should-retry``): headers sent with an error (Gemini
  also gets a ``RetryInfo`` detail for ``retry_after``).
- ``after`` (2), ``stall`` (30), ``clean`` (0), ``error`` (``overloaded``; one of
  ``rate_limit quota server unavailable overloaded unauthorized forbidden not_found
  context_length content_policy``): the stream faults.
- ``down`` (5), ``up``: ``flapping``.
- ``tag``: ignored; gives a scenario its own name, hence its own ``times`` counter.

The log
-------

Every request to an API path is an attempt: a ``MockAttempt`` is appended to ``MockProvider.log``
when it arrives (``outcome="pending"``) and replaced when it ends. Outcomes: ``ok``, ``error``
(an HTTP error status, see ``status``), ``blocked`` (Gemini content policy), ``reset``, ``hang``
(never answered: it ended when the client closed, see ``client_closed_at``), ``cut``,
``malformed``, ``no-done``, ``stream-error``, ``cancelled`` (the client closed the connection
before the answer was complete) and ``aborted`` (the server shut down first).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import signal
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, NoReturn
from urllib.parse import unquote

import attrs
import h11
import trio

from ._scripted import SCRIPTED_ANSWER, split_text

_SCENARIO_HEADER = b"x-mock-scenario"

_MAX_BODY = 16 * 1024 * 1024
_RECEIVE_SIZE = 65536
_SPEC_CACHE_LIMIT = 4096

# --- scenarios ---------------------------------------------------------------------------------

# Scenarios that answer with an error of a kind (see _ERRORS), and the aliases with defaults.
_ERROR_SCENARIOS = {
    "rate-limit": "rate_limit",
    "quota": "quota",
    "server-error": "server",
    "unavailable": "unavailable",
    "overloaded": "overloaded",
    "unauthorized": "unauthorized",
    "forbidden": "forbidden",
    "not-found": "not_found",
    "context-length": "context_length",
    "content-policy": "content_policy",
}
_OTHER_SCENARIOS = (
    "ok",
    "no-prefill",
    "reset",
    "hang",
    "cut",
    "stall",
    "malformed",
    "no-done",
    "stream-error",
    "flapping",
)
_ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "slow": ("ok", {"first_delay": 30.0}),
    "flaky": ("server-error", {"times": 1}),
}
SCENARIOS: tuple[str, ...] = tuple(sorted({*_ERROR_SCENARIOS, *_OTHER_SCENARIOS, *_ALIASES}))


def _seconds(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise ValueError("expected a number of seconds, 0 or more")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("expected a whole number, 0 or more")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("expected a whole number, 1 or more")
    return value


def _status(text: str) -> int:
    value = int(text)
    if not 100 <= value <= 599:
        raise ValueError("expected an HTTP status from 100 to 599")
    return value


def _flag(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected 1 or 0 (true or false)")


def _error_kind(text: str) -> str:
    if text not in _USER_ERRORS:
        raise ValueError(f"expected one of {', '.join(sorted(_USER_ERRORS))}")
    return text


_PARAMS: dict[str, Callable[[str], Any]] = {
    "chunks": _positive,
    "delay": _seconds,
    "first_delay": _seconds,
    "head_delay": _seconds,
    "repeat": _positive,
    "times": _count,
    "status": _status,
    "retry_after": _seconds,
    "retry_after_ms": _count,
    "should_retry": _flag,
    "after": _count,
    "stall": _seconds,
    "clean": _flag,
    "error": _error_kind,
    "down": _seconds,
    "up": _seconds,
    "tag": str,
}


@attrs.frozen(kw_only=True)
class MockScenario:
    """A parsed model name: the scenario and its parameters (see the module docstring)."""

    name: str
    kind: str
    chunks: int = 5
    delay: float = 0.0
    first_delay: float = 0.0
    head_delay: float = 0.0
    repeat: int = 1
    times: int | None = None
    status: int | None = None
    retry_after: float | None = None
    retry_after_ms: int | None = None
    should_retry: bool | None = None
    after: int = 2
    stall: float = 30.0
    clean: bool = False
    error: str = "overloaded"
    down: float = 5.0
    up: float | None = None
    tag: str | None = None

    @classmethod
    def parse(cls, spec: str) -> MockScenario:
        """Parse ``scenario,key=value,...``.

        Raises:
            LookupError: the scenario is unknown.
            ValueError: a parameter is unknown, repeated or invalid (the message says which).
        """
        name, *items = (item.strip() for item in spec.split(","))
        name = name.lower()
        kind, defaults = _ALIASES.get(name, (name, {}))
        if kind not in _ERROR_SCENARIOS and kind not in _OTHER_SCENARIOS:
            raise LookupError(f"unknown mock scenario {name!r}; known: {', '.join(SCENARIOS)}")
        params = dict(defaults)
        seen: set[str] = set()
        for item in items:
            key, sep, text = item.partition("=")
            key = key.strip().lower()
            if not sep or key not in _PARAMS:
                raise ValueError(
                    f"mock scenario parameter {item!r}: expected key=value, keys: {', '.join(_PARAMS)}"
                )
            if key in seen:
                raise ValueError(f"mock scenario parameter {key!r} given twice")
            seen.add(key)
            try:
                params[key] = _PARAMS[key](text.strip())
            except ValueError as exc:
                raise ValueError(f"mock scenario parameter {key}={text!r}: {exc}") from None
        return cls(name=name, kind=kind, **params)


def mock_model(scenario: str, **params: Any) -> str:
    """Spell a model name for the mock: ``mock_model("rate-limit", retry_after=2)`` is
    ``"rate-limit,retry_after=2"``. Booleans become ``1`` / ``0``."""
    items = [scenario]
    for key, value in params.items():
        if isinstance(value, bool):
            value = int(value)
        items.append(f"{key}={value}")
    return ",".join(items)


# --- error bodies ------------------------------------------------------------------------------


@attrs.frozen
class _ErrorText:
    """One kind of error in each format: (status, type, code, message) for OpenAI, (status,
    type, message) for Anthropic, (status, STATUS, message) for Gemini. ``{model}`` is filled in."""

    openai: tuple[int, str, str | None, str]
    anthropic: tuple[int, str, str]
    gemini: tuple[int, str, str]


_ERRORS: dict[str, _ErrorText] = {
    "rate_limit": _ErrorText(
        (429, "requests", "rate_limit_exceeded", "Rate limit reached for requests to {model}."),
        (429, "rate_limit_error", "Number of requests has exceeded your rate limit for {model}."),
        (429, "RESOURCE_EXHAUSTED", "Resource has been exhausted (e.g. check quota)."),
    ),
    "quota": _ErrorText(
        (
            429,
            "insufficient_quota",
            "insufficient_quota",
            "You exceeded your current quota, please check your plan and billing details.",
        ),
        (429, "rate_limit_error", "You have reached your specified API usage limits."),
        (
            429,
            "RESOURCE_EXHAUSTED",
            "You exceeded your current quota, please check your plan and billing details.",
        ),
    ),
    "server": _ErrorText(
        (500, "server_error", None, "The server had an error while processing your request."),
        (500, "api_error", "Internal server error"),
        (500, "INTERNAL", "An internal error has occurred. Please retry."),
    ),
    "unavailable": _ErrorText(
        (503, "server_error", None, "Service unavailable."),
        (503, "api_error", "Service unavailable"),
        (503, "UNAVAILABLE", "The service is currently unavailable."),
    ),
    "overloaded": _ErrorText(
        (503, "server_error", None, "The engine is currently overloaded, please try again later."),
        (529, "overloaded_error", "Overloaded"),
        (503, "UNAVAILABLE", "The model is overloaded. Please try again later."),
    ),
    "unauthorized": _ErrorText(
        (401, "invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
        (401, "authentication_error", "invalid x-api-key"),
        (401, "UNAUTHENTICATED", "API key not valid. Please pass a valid API key."),
    ),
    "forbidden": _ErrorText(
        (
            403,
            "invalid_request_error",
            "unsupported_country_region_territory",
            "Country, region, or territory not supported.",
        ),
        (403, "permission_error", "Your API key does not have permission to use {model}."),
        (403, "PERMISSION_DENIED", "The caller does not have permission."),
    ),
    "not_found": _ErrorText(
        (
            404,
            "invalid_request_error",
            "model_not_found",
            "The model `{model}` does not exist or you do not have access to it.",
        ),
        (404, "not_found_error", "model: {model}"),
        (
            404,
            "NOT_FOUND",
            "models/{model} is not found for API version v1beta, or is not supported for "
            "generateContent.",
        ),
    ),
    "context_length": _ErrorText(
        (
            400,
            "invalid_request_error",
            "context_length_exceeded",
            "This model's maximum context length is 8192 tokens. However, your messages "
            "resulted in 9000 tokens. Please reduce the length of the messages.",
        ),
        (400, "invalid_request_error", "prompt is too long: 210000 tokens > 200000 maximum"),
        (
            400,
            "INVALID_ARGUMENT",
            "The input token count (1048577) exceeds the maximum number of tokens allowed "
            "(1048576).",
        ),
    ),
    "content_policy": _ErrorText(
        (
            400,
            "invalid_request_error",
            "content_policy_violation",
            "Your request was rejected as a result of our safety system.",
        ),
        (400, "invalid_request_error", "Output blocked by content filtering policy"),
        (400, "INVALID_ARGUMENT", "The request was blocked by the content filter."),
    ),
    "prefill": _ErrorText(
        (
            400,
            "invalid_request_error",
            None,
            "This model does not support assistant message prefill. "
            "The conversation must end with a user message.",
        ),
        (
            400,
            "invalid_request_error",
            "This model does not support assistant message prefill. "
            "The conversation must end with a user message.",
        ),
        (400, "INVALID_ARGUMENT", "The conversation must end with a user turn."),
    ),
    "bad_request": _ErrorText(
        (400, "invalid_request_error", None, "{model}"),
        (400, "invalid_request_error", "{model}"),
        (400, "INVALID_ARGUMENT", "{model}"),
    ),
}

# Kinds a user may pick for `error=`: the ones with a scenario of their own.
_USER_ERRORS = frozenset(_ERROR_SCENARIOS.values())


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


# --- wire formats ------------------------------------------------------------------------------


class _Reply:
    """What one answer needs while it is written (one per attempt)."""

    __slots__ = (
        "model",
        "id",
        "created",
        "text",
        "prompt_tokens",
        "completion_tokens",
        "include_usage",
        "sse",
        "framed",
    )

    def __init__(self, model: str, seq: int, text: str, prompt: int, completion: int) -> None:
        self.model = model
        self.id = f"mock{seq}"
        self.created = int(time.time())  # a wire field (epoch seconds), not a clock we wait on
        self.text = text
        self.prompt_tokens = prompt
        self.completion_tokens = completion
        self.include_usage = False
        self.sse = True
        self.framed = 0  # events written so far (Gemini's JSON-array mode needs to know)


class _Format:
    """How one provider spells answers, streams and errors."""

    name = ""
    stream_type = b"text/event-stream; charset=utf-8"

    def error_body(self, kind: str, status: int, model: str, sc: MockScenario | None) -> Any:
        raise NotImplementedError

    def error_status(self, kind: str) -> int:
        raise NotImplementedError

    def answer(self, r: _Reply) -> Any:
        raise NotImplementedError

    def stream_open(self, r: _Reply) -> bytes:
        return b""

    def stream_text(self, r: _Reply, piece: str) -> bytes:
        raise NotImplementedError

    def stream_close(self, r: _Reply, terminator: bool) -> bytes:
        raise NotImplementedError

    def stream_error(self, r: _Reply, kind: str) -> bytes:
        raise NotImplementedError

    def malformed(self, r: _Reply) -> bytes:
        raise NotImplementedError

    def stream_end(self, r: _Reply) -> bytes:
        """Bytes that end the body whatever happened (Gemini's JSON array needs its ``]``)."""
        return b""


class _OpenAI(_Format):
    name = "openai"

    def error_status(self, kind: str) -> int:
        return _ERRORS[kind].openai[0]

    def error_body(self, kind: str, status: int, model: str, sc: MockScenario | None) -> Any:
        _, type_, code, message = _ERRORS[kind].openai
        param = "messages" if kind in ("context_length", "prefill") else None
        return {
            "error": {
                "message": message.replace("{model}", model),
                "type": type_,
                "param": param,
                "code": code,
            }
        }

    def answer(self, r: _Reply) -> Any:
        return {
            "id": f"chatcmpl-{r.id}",
            "object": "chat.completion",
            "created": r.created,
            "model": r.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": r.text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": self._usage(r),
            "system_fingerprint": None,
        }

    @staticmethod
    def _usage(r: _Reply) -> dict[str, int]:
        return {
            "prompt_tokens": r.prompt_tokens,
            "completion_tokens": r.completion_tokens,
            "total_tokens": r.prompt_tokens + r.completion_tokens,
        }

    def _chunk(self, r: _Reply, delta: dict[str, Any], finish: str | None = None) -> bytes:
        chunk: dict[str, Any] = {
            "id": f"chatcmpl-{r.id}",
            "object": "chat.completion.chunk",
            "created": r.created,
            "model": r.model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if r.include_usage:
            chunk["usage"] = None
        return b"data: " + _dumps(chunk) + b"\n\n"

    def stream_open(self, r: _Reply) -> bytes:
        return self._chunk(r, {"role": "assistant", "content": "", "refusal": None})

    def stream_text(self, r: _Reply, piece: str) -> bytes:
        return self._chunk(r, {"content": piece})

    def stream_close(self, r: _Reply, terminator: bool) -> bytes:
        out = self._chunk(r, {}, "stop")
        if r.include_usage:
            usage = {
                "id": f"chatcmpl-{r.id}",
                "object": "chat.completion.chunk",
                "created": r.created,
                "model": r.model,
                "system_fingerprint": None,
                "choices": [],
                "usage": self._usage(r),
            }
            out += b"data: " + _dumps(usage) + b"\n\n"
        if terminator:
            out += b"data: [DONE]\n\n"
        return out

    def stream_error(self, r: _Reply, kind: str) -> bytes:
        body = self.error_body(kind, self.error_status(kind), r.model, None)
        return b"data: " + _dumps(body) + b"\n\n"

    def malformed(self, r: _Reply) -> bytes:
        return (
            b'data: {"id":"chatcmpl-' + r.id.encode() + b'","choices":[{"delta":{"content":"br\n\n'
        )


class _Anthropic(_Format):
    name = "anthropic"

    def error_status(self, kind: str) -> int:
        return _ERRORS[kind].anthropic[0]

    def error_body(self, kind: str, status: int, model: str, sc: MockScenario | None) -> Any:
        _, type_, message = _ERRORS[kind].anthropic
        error: dict[str, Any] = {"type": type_, "message": message.replace("{model}", model)}
        if kind == "quota":
            error["details"] = {"error_code": "enforced_spend_limit_reached"}
        return {"type": "error", "error": error}

    def answer(self, r: _Reply) -> Any:
        return {
            "id": f"msg_{r.id}",
            "type": "message",
            "role": "assistant",
            "model": r.model,
            "content": [{"type": "text", "text": r.text}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": r.prompt_tokens, "output_tokens": r.completion_tokens},
        }

    @staticmethod
    def _event(name: bytes, data: Any) -> bytes:
        return b"event: " + name + b"\ndata: " + _dumps(data) + b"\n\n"

    def stream_open(self, r: _Reply) -> bytes:
        message: dict[str, Any] = {
            "id": f"msg_{r.id}",
            "type": "message",
            "role": "assistant",
            "model": r.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": r.prompt_tokens, "output_tokens": 1},
        }
        return (
            self._event(b"message_start", {"type": "message_start", "message": message})
            + self._event(
                b"content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            )
            + self._event(b"ping", {"type": "ping"})
        )

    def stream_text(self, r: _Reply, piece: str) -> bytes:
        return self._event(
            b"content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": piece},
            },
        )

    def stream_close(self, r: _Reply, terminator: bool) -> bytes:
        out = self._event(
            b"content_block_stop", {"type": "content_block_stop", "index": 0}
        ) + self._event(
            b"message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": r.completion_tokens},
            },
        )
        if terminator:
            out += self._event(b"message_stop", {"type": "message_stop"})
        return out

    def stream_error(self, r: _Reply, kind: str) -> bytes:
        return self._event(b"error", self.error_body(kind, self.error_status(kind), r.model, None))

    def malformed(self, r: _Reply) -> bytes:
        return (
            b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
            b'"delta":{"type":"text_del\n\n'
        )


class _Gemini(_Format):
    name = "gemini"
    stream_type = b"text/event-stream"

    def error_status(self, kind: str) -> int:
        return _ERRORS[kind].gemini[0]

    def error_body(self, kind: str, status: int, model: str, sc: MockScenario | None) -> Any:
        _, code, message = _ERRORS[kind].gemini
        error: dict[str, Any] = {
            "code": status,
            "message": message.replace("{model}", model),
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
        if sc is not None and sc.retry_after is not None:
            details.append(
                {
                    "@type": "type.googleapis.com/google.rpc.RetryInfo",
                    "retryDelay": f"{sc.retry_after:g}s",
                }
            )
        if details:
            error["details"] = details
        return {"error": error}

    @staticmethod
    def _usage(r: _Reply) -> dict[str, int]:
        return {
            "promptTokenCount": r.prompt_tokens,
            "candidatesTokenCount": r.completion_tokens,
            "totalTokenCount": r.prompt_tokens + r.completion_tokens,
        }

    def _chunk(self, r: _Reply, text: str, finish: bool) -> dict[str, Any]:
        candidate: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"}}
        if finish:
            candidate["finishReason"] = "STOP"
        candidate["index"] = 0
        chunk: dict[str, Any] = {"candidates": [candidate]}
        if finish:
            chunk["usageMetadata"] = self._usage(r)
        chunk["modelVersion"] = r.model
        chunk["responseId"] = r.id
        return chunk

    def blocked(self, r: _Reply) -> Any:
        return {
            "promptFeedback": {
                "blockReason": "SAFETY",
                "safetyRatings": [
                    {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH"}
                ],
            },
            "usageMetadata": {
                "promptTokenCount": r.prompt_tokens,
                "totalTokenCount": r.prompt_tokens,
            },
            "modelVersion": r.model,
            "responseId": r.id,
        }

    def frame(self, r: _Reply, data: bytes) -> bytes:
        r.framed += 1
        if r.sse:
            return b"data: " + data + b"\r\n\r\n"
        return (b"[" if r.framed == 1 else b",\r\n") + data

    def answer(self, r: _Reply) -> Any:
        return self._chunk(r, r.text, True)

    def stream_text(self, r: _Reply, piece: str) -> bytes:
        return self.frame(r, _dumps(self._chunk(r, piece, False)))

    def stream_close(self, r: _Reply, terminator: bool) -> bytes:
        return self.frame(r, _dumps(self._chunk(r, "", True)))

    def stream_error(self, r: _Reply, kind: str) -> bytes:
        body = self.error_body(kind, self.error_status(kind), r.model, None)
        return self.frame(r, _dumps(body))

    def malformed(self, r: _Reply) -> bytes:
        return self.frame(r, b'{"candidates":[{"content":{"parts":[{"text":"br')

    def stream_end(self, r: _Reply) -> bytes:
        if r.sse:
            return b""
        return b"[]" if r.framed == 0 else b"]"


_OPENAI = _OpenAI()
_ANTHROPIC = _Anthropic()
_GEMINI = _Gemini()


def _count_words(node: Any) -> int:
    if isinstance(node, str):
        return len(node.split())
    if isinstance(node, list):
        return sum(_count_words(item) for item in node)
    if isinstance(node, dict):
        return sum(_count_words(node[key]) for key in ("content", "text", "parts") if key in node)
    return 0


# --- the log -----------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class MockAttempt:
    """One request the mock saw, and how it ended.

    Attributes:
        seq: its place in the log (0 for the first since the server started or ``reset()``).
        connection: the connection it came on (1 for the first accepted).
        format: ``openai``, ``anthropic``, ``gemini``, or ``other`` for an unknown path.
        path: the request target without its query.
        model: the model name asked for (``""`` if none).
        scenario: the scenario that ran (its name as written, e.g. ``flaky``), ``""`` if none.
        attempt: how many requests this model name (or ``x-mock-scenario``) has had, this one
            included.
        stream: whether a stream was asked for.
        started_at: ``trio.current_time()`` when the request had arrived.
        ended_at: when the mock was done with it (``None`` while pending).
        outcome: see the module docstring; ``pending`` while it runs.
        status: the HTTP status sent, ``None`` if none was.
        chunks: the text chunks (deltas) sent.
        client_closed_at: when the client closed the connection, if it did before the end.
        request: the parsed JSON body (not compared, not shown).
    """

    seq: int
    connection: int
    format: str
    path: str
    model: str
    scenario: str
    attempt: int
    stream: bool
    started_at: float
    ended_at: float | None = None
    outcome: str = "pending"
    status: int | None = None
    chunks: int = 0
    client_closed_at: float | None = None
    request: Any = attrs.field(default=None, eq=False, repr=False)


class _ClientGone(Exception):
    """The client closed the connection while the mock was still answering."""


class _Plan:
    """A parsed scenario and its answer, cached per model name."""

    __slots__ = ("scenario", "text", "pieces", "words")

    def __init__(self, scenario: MockScenario) -> None:
        self.scenario = scenario
        self.text = " ".join([SCRIPTED_ANSWER] * scenario.repeat)
        self.pieces = split_text(self.text, scenario.chunks)
        self.words = len(self.text.split())


# --- the server --------------------------------------------------------------------------------


class MockProvider:
    """The mock provider's state: the log, the per-model counters and the connection counts.

    Start it with ``serve_mock_provider()``, or ``await nursery.start(MockProvider().serve)``.

    Attributes:
        log: every attempt, in arrival order (``MockAttempt``).
        open_connections: connections open now.
        accepted: connections accepted since the server started.
        errors: unexpected exceptions inside the mock (bugs), as text; a connection that hits one
            is closed, the server goes on. Tests should expect it to stay empty.
    """

    def __init__(self) -> None:
        self.log: list[MockAttempt] = []
        self.open_connections = 0
        self.accepted = 0
        self.errors: list[str] = []
        self._counters: dict[str, int] = {}
        self._plans: dict[str, _Plan] = {}
        self._epoch = 0.0
        self._base_url: str | None = None

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT``, once serving.

        Raises:
            RuntimeError: the server has not started.
        """
        if self._base_url is None:
            raise RuntimeError("the mock provider is not serving yet")
        return self._base_url

    def reset(self) -> None:
        """Start a new log and new per-model counters, and restart the ``flapping`` clock.

        The connection counts are not touched; attempts still running are written to the old log.
        """
        self.log = []
        self._counters = {}
        self._epoch = trio.current_time()

    def attempts(self, model: str | None = None) -> list[MockAttempt]:
        """The log, or the attempts for one model name."""
        return [a for a in self.log if model is None or a.model == model]

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        task_status: trio.TaskStatus[MockProvider] = trio.TASK_STATUS_IGNORED,
    ) -> NoReturn:
        """Listen on ``host:port`` (0: any free port) and serve until cancelled.

        Reports ``self`` to ``nursery.start`` once listening.

        Raises:
            RuntimeError: this provider is already serving.
            OSError: the address cannot be bound.
        """
        if self._base_url is not None:
            raise RuntimeError("this mock provider is already serving")
        listeners = await trio.open_tcp_listeners(port, host=host)
        try:
            address = listeners[0].socket.getsockname()
            bound = address[0] if ":" not in address[0] else f"[{address[0]}]"
            self._base_url = f"http://{bound}:{address[1]}"
            self._epoch = trio.current_time()
            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, self._handle, listeners)
                task_status.started(self)
                await trio.sleep_forever()
        finally:
            self._base_url = None
            for listener in listeners:
                await trio.aclose_forcefully(listener)

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.accepted += 1
        self.open_connections += 1
        connection = _Connection(self, stream, self.accepted)
        try:
            await connection.run()
        except Exception as exc:
            # A bug in the mock must not take the server (and every other test client) down.
            self.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            self.open_connections -= 1
            await trio.aclose_forcefully(stream)

    # --- called by connections ---

    def _plan(self, spec: str) -> _Plan:
        plan = self._plans.get(spec)
        if plan is None:
            plan = _Plan(MockScenario.parse(spec))
            if len(self._plans) >= _SPEC_CACHE_LIMIT:
                self._plans.clear()
            self._plans[spec] = plan
        return plan

    def _count(self, spec: str) -> int:
        n = self._counters.get(spec, 0) + 1
        self._counters[spec] = n
        return n


class _Connection:
    """One client connection: reads requests with h11, answers them one after another."""

    __slots__ = ("mock", "stream", "id", "h11", "out", "body", "closed", "gone_at")

    def __init__(self, mock: MockProvider, stream: trio.SocketStream, connection_id: int) -> None:
        self.mock = mock
        self.stream = stream
        self.id = connection_id
        self.h11 = h11.Connection(h11.SERVER)
        self.out: list[bytes] = []  # bytes h11 has framed, to send at the next flush
        self.body: list[bytes] = []  # body bytes not yet given to h11
        self.closed = False  # we closed the socket (cut, reset)
        self.gone_at: float | None = None  # when the client's end was seen closed

    # --- bytes in and out ---

    async def _receive(self) -> bytes:
        try:
            data = await self.stream.receive_some(_RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data and self.gone_at is None:
            self.gone_at = trio.current_time()
        return data

    async def _next_event(self) -> Any:
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                self.h11.receive_data(await self._receive())
                continue
            return event

    def _send(self, event: Any) -> None:
        data = self.h11.send(event)
        if data:
            self.out.append(data)

    def _gone(self) -> _ClientGone:
        if self.gone_at is None:
            self.gone_at = trio.current_time()
        return _ClientGone()

    async def _flush(self) -> None:
        self._seal()
        if not self.out:
            return
        data = b"".join(self.out)
        self.out.clear()
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise self._gone() from None

    async def _pause(self, seconds: float) -> None:
        """Send what is pending, then wait ``seconds`` while watching for the client to close.

        Waiting on the socket rather than sleeping notices a close without a second task.

        Raises:
            _ClientGone: the client closed the connection.
        """
        if seconds <= 0:
            return
        await self._flush()
        with trio.move_on_after(seconds):
            while True:
                data = await self._receive()
                if not data:
                    raise self._gone()
                self.h11.receive_data(data)  # a pipelined request: kept for the next cycle

    async def _close(self, reset: bool = False) -> None:
        if reset:
            # SO_LINGER with a zero timeout: close() sends RST instead of FIN.
            self.stream.socket.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
        self.closed = True
        await trio.aclose_forcefully(self.stream)

    def _respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes | None) -> None:
        if body is not None:
            headers.append((b"content-length", str(len(body)).encode()))
        self._send(h11.Response(status_code=status, headers=headers))
        if body:
            self._send(h11.Data(data=body))
        if body is not None:
            self._send(h11.EndOfMessage())

    # --- the request loop ---

    async def run(self) -> None:
        while True:
            try:
                event = await self._next_event()
                if not isinstance(event, h11.Request):
                    return  # ConnectionClosed (or PAUSED after a protocol switch we refuse)
                body: list[bytes] = []
                size = 0
                while True:
                    part = await self._next_event()
                    if isinstance(part, h11.Data):
                        size += len(part.data)
                        if size > _MAX_BODY:
                            await self._refuse(413, "request body too large")
                            return
                        body.append(bytes(part.data))
                    elif isinstance(part, h11.EndOfMessage):
                        break
                    else:
                        return  # the client went away mid-request
            except h11.RemoteProtocolError as exc:
                await self._refuse(exc.error_status_hint, f"malformed HTTP request: {exc}")
                return
            await self._answer(event, b"".join(body))
            if self.closed or self.h11.our_state is not h11.DONE:
                return
            if self.h11.their_state is not h11.DONE:
                return
            try:
                self.h11.start_next_cycle()
            except h11.LocalProtocolError:
                return

    async def _refuse(self, status: int, message: str) -> None:
        """Answer a request h11 could not read, then close (the log gets an ``other`` attempt).

        A request cut short by the client's close is logged as ``cancelled``, unanswered.
        """
        now = trio.current_time()
        gone = self.gone_at is not None
        self.mock.log.append(
            MockAttempt(
                seq=len(self.mock.log),
                connection=self.id,
                format="other",
                path="",
                model="",
                scenario="",
                attempt=0,
                stream=False,
                started_at=now,
                ended_at=now,
                outcome="cancelled" if gone else "error",
                status=None if gone else status,
                client_closed_at=self.gone_at,
            )
        )
        if gone or self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = _dumps(_OPENAI.error_body("bad_request", status, message, None))
        with contextlib.suppress(h11.LocalProtocolError):
            self._respond(status, [(b"content-type", b"application/json")], body)
        with contextlib.suppress(_ClientGone):
            await self._flush()

    async def _answer(self, request: h11.Request, body: bytes) -> None:
        target = request.target.decode("latin-1")
        path, _, query = target.partition("?")
        method = request.method
        if method == b"HEAD":  # a HEAD response has no body, which h11 enforces
            self._send(h11.Response(status_code=405, headers=[(b"content-length", b"0")]))
            self._send(h11.EndOfMessage())
            await self._flush()
            return
        fmt: _Format | None = None
        model = ""
        stream = False
        if path in ("/v1/chat/completions", "/chat/completions"):
            fmt = _OPENAI
        elif path == "/v1/messages":
            fmt = _ANTHROPIC
        elif path.startswith(("/v1beta/models/", "/v1/models/")):
            model, _, action = path.partition("/models/")[2].rpartition(":")
            if action in ("generateContent", "streamGenerateContent"):
                fmt = _GEMINI
                model = unquote(model)
                stream = action == "streamGenerateContent"
        elif method == b"GET" and path in ("/v1/models", "/models"):
            data = [{"id": name, "object": "model", "owned_by": "mock"} for name in SCENARIOS]
            self._json(200, {"object": "list", "data": data})
            await self._flush()
            return
        elif method == b"GET" and path == "/health":
            self._json(200, {"status": "ok"})
            await self._flush()
            return

        mock = self.mock
        log = mock.log
        seq = len(log)
        now = trio.current_time()
        record = MockAttempt(
            seq=seq,
            connection=self.id,
            format=fmt.name if fmt is not None else "other",
            path=path,
            model=model,
            scenario="",
            attempt=0,
            stream=stream,
            started_at=now,
        )
        log.append(record)
        state = _Outcome()
        try:
            if fmt is None:
                status = 404 if method in (b"GET", b"POST") else 405
                message = f"unknown path {path!r} (method {method.decode('latin-1')})"
                self._json(status, _OPENAI.error_body("bad_request", status, message, None))
                state.finish("error", status)
                await self._flush()
                return
            if method != b"POST":
                message = f"{path} takes POST"
                self._json(405, fmt.error_body("bad_request", 405, message, None))
                state.finish("error", 405)
                await self._flush()
                return
            await self._attempt(fmt, request, body, model, stream, query, record, log, seq, state)
        except _ClientGone:
            if state.outcome == "pending":
                state.outcome = "cancelled"
        finally:
            if state.outcome == "pending":
                state.outcome = "aborted"
            log[seq] = attrs.evolve(
                state.record or record,
                ended_at=trio.current_time(),
                outcome=state.outcome,
                status=state.status,
                chunks=state.chunks,
                client_closed_at=self.gone_at,
            )

    def _json(
        self, status: int, value: Any, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        headers = headers or []
        headers.append((b"content-type", b"application/json"))
        self._respond(status, headers, _dumps(value))

    async def _attempt(
        self,
        fmt: _Format,
        request: h11.Request,
        body: bytes,
        model: str,
        stream: bool,
        query: str,
        record: MockAttempt,
        log: list[MockAttempt],
        seq: int,
        state: _Outcome,
    ) -> None:
        mock = self.mock
        problem: str | None
        try:
            payload = json.loads(body)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            payload = None
            problem = f"We could not parse the JSON body of your request: {exc}"
        else:
            problem = _check_payload(fmt, payload)
        if payload is not None and problem is None and fmt is not _GEMINI:
            model = payload["model"]
            stream = payload.get("stream") is True
        if problem is not None:
            state.record = attrs.evolve(record, model=model, stream=stream, request=payload)
            log[seq] = state.record
            self._json(400, fmt.error_body("bad_request", 400, problem, None))
            state.finish("error", 400)
            await self._flush()
            return

        spec = model
        for name, value in request.headers:
            if name == _SCENARIO_HEADER:
                spec = value.decode("utf-8", "replace")
        plan: _Plan | None = None
        problem_kind = "bad_request"
        try:
            plan = mock._plan(spec)
        except LookupError as exc:
            problem_kind, problem = "not_found", str(exc.args[0])
        except ValueError as exc:
            problem = str(exc)
        attempt = mock._count(spec)
        state.record = attrs.evolve(
            record,
            model=model,
            stream=stream,
            scenario=plan.scenario.name if plan is not None else "",
            attempt=attempt,
            request=payload,
        )
        log[seq] = state.record
        if plan is None:
            if problem_kind == "not_found":
                status = fmt.error_status("not_found")
                body_value = fmt.error_body("not_found", status, model, None)
                # Keep the provider's wording, and say what the mock knows.
                _append_message(body_value, f" ({problem})")
            else:
                status = 400
                body_value = fmt.error_body("bad_request", status, problem or "", None)
            self._json(status, body_value)
            state.finish("error", status)
            await self._flush()
            return
        sc = plan.scenario

        reply = _Reply(
            model,
            seq,
            plan.text,
            max(1, _prompt_words(fmt, payload)),
            plan.words,
        )
        if fmt is _OPENAI:
            options = payload.get("stream_options")
            reply.include_usage = isinstance(options, dict) and options.get("include_usage") is True
        elif fmt is _GEMINI:
            reply.sse = "alt=sse" in query.split("&")

        await self._pause(sc.head_delay)
        fault = _fault(mock, fmt, sc, attempt, payload)
        extra = [
            (b"x-mock-scenario", sc.name.encode()),
            (b"x-mock-attempt", str(attempt).encode()),
        ]
        if fault in _ERRORS:
            self._error(fmt, fault, sc, reply, extra, state)
            await self._flush()
            return
        if fault == "reset":
            state.finish("reset", None)
            await self._close(reset=True)
            return
        if fault == "hang":
            state.outcome = "hang"
            await self._pause(math.inf)
            return  # unreachable: the pause ends when the client closes
        if fault == "blocked":
            assert isinstance(fmt, _Gemini)
            if stream:
                self._respond(200, [(b"content-type", _stream_type(fmt, reply)), *extra], None)
                self._data(fmt.frame(reply, _dumps(fmt.blocked(reply))))
                self._data(fmt.stream_end(reply))
                self._end()
            else:
                self._json(200, fmt.blocked(reply), extra)
            state.finish("blocked", 200)
            await self._flush()
            return
        if stream:
            await self._stream(fmt, sc, plan, reply, fault, extra, state)
        else:
            await self._whole(fmt, sc, plan, reply, fault, extra, state)

    def _error(
        self,
        fmt: _Format,
        kind: str,
        sc: MockScenario,
        reply: _Reply,
        headers: list[tuple[bytes, bytes]],
        state: _Outcome,
    ) -> None:
        status = sc.status or fmt.error_status(kind)
        if sc.retry_after is not None:
            headers.append((b"retry-after", str(math.ceil(sc.retry_after)).encode()))
        if sc.retry_after_ms is not None:
            headers.append((b"retry-after-ms", str(sc.retry_after_ms).encode()))
        if sc.should_retry is not None:
            headers.append((b"x-should-retry", b"true" if sc.should_retry else b"false"))
        self._json(status, fmt.error_body(kind, status, reply.model, sc), headers)
        state.finish("error", status)

    async def _stream(
        self,
        fmt: _Format,
        sc: MockScenario,
        plan: _Plan,
        reply: _Reply,
        fault: str | None,
        extra: list[tuple[bytes, bytes]],
        state: _Outcome,
    ) -> None:
        pieces = plan.pieces
        after = min(sc.after, len(pieces)) if fault is not None else -1
        outcome = "no-done" if fault == "no-done" else "ok"
        self._respond(200, [(b"content-type", _stream_type(fmt, reply)), *extra], None)
        state.status = 200
        await self._pause(sc.first_delay)
        opened = False
        for i in range(len(pieces) + 1):
            if i == after:
                if fault == "cut":
                    if not sc.clean:
                        await self._flush()
                        state.finish("cut", 200)
                        await self._close()
                        return
                    self._data(fmt.stream_end(reply))
                    self._end()
                    state.finish("cut", 200)
                    await self._flush()
                    return
                if fault == "stall":
                    await self._pause(sc.stall)
                elif fault in ("malformed", "stream-error"):
                    if not opened:
                        opened = True
                        self._data(fmt.stream_open(reply))
                    if fault == "malformed":
                        self._data(fmt.malformed(reply))
                        outcome = "malformed"
                    else:
                        self._data(fmt.stream_error(reply, sc.error))
                        self._data(fmt.stream_end(reply))
                        self._end()
                        state.finish("stream-error", 200)
                        await self._flush()
                        return
            if i == len(pieces):
                break
            if i:
                await self._pause(sc.delay)
            if not opened:
                opened = True
                self._data(fmt.stream_open(reply))
            self._data(fmt.stream_text(reply, pieces[i]))
            state.chunks += 1
        if not opened:
            self._data(fmt.stream_open(reply))
        self._data(fmt.stream_close(reply, fault != "no-done"))
        self._data(fmt.stream_end(reply))
        self._end()
        await self._flush()
        state.finish(outcome, 200)

    def _data(self, data: bytes) -> None:
        """Queue body bytes; those queued between two waits go out as one HTTP chunk (one h11
        event instead of one per SSE event: h11's bookkeeping is most of the mock's CPU)."""
        if data:
            self.body.append(data)

    def _seal(self) -> None:
        if self.body:
            data = b"".join(self.body)
            self.body.clear()
            self._send(h11.Data(data=data))

    def _end(self) -> None:
        self._seal()
        self._send(h11.EndOfMessage())

    async def _whole(
        self,
        fmt: _Format,
        sc: MockScenario,
        plan: _Plan,
        reply: _Reply,
        fault: str | None,
        extra: list[tuple[bytes, bytes]],
        state: _Outcome,
    ) -> None:
        wait = sc.first_delay + sc.delay * (len(plan.pieces) - 1)
        if fault == "stall":
            wait += sc.stall
        await self._pause(wait)
        if fault == "stream-error":
            self._error(fmt, sc.error, sc, reply, extra, state)
            await self._flush()
            return
        body = _dumps(fmt.answer(reply))
        headers = [(b"content-type", b"application/json"), *extra]
        if fault == "cut" and not sc.clean:
            headers.append((b"content-length", str(len(body)).encode()))
            self._send(h11.Response(status_code=200, headers=headers))
            self.out.append(body[: len(body) // 2])  # raw: h11 would refuse a short body
            await self._flush()
            state.finish("cut", 200)
            await self._close()
            return
        outcome = "ok"
        if fault in ("cut", "malformed"):
            body = body[: len(body) // 2]
            outcome = "cut" if fault == "cut" else "malformed"
        else:
            state.chunks = 1
        self._respond(200, headers, body)
        await self._flush()
        state.finish(outcome, 200)


class _Outcome:
    """How the attempt is going: written as it goes, read when it ends."""

    __slots__ = ("outcome", "status", "chunks", "record")

    def __init__(self) -> None:
        self.outcome = "pending"
        self.status: int | None = None
        self.chunks = 0
        self.record: MockAttempt | None = None

    def finish(self, outcome: str, status: int | None) -> None:
        self.outcome = outcome
        self.status = status


def _stream_type(fmt: _Format, reply: _Reply) -> bytes:
    return fmt.stream_type if reply.sse else b"application/json"


def _append_message(body: Any, text: str) -> None:
    error = body.get("error")
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        error["message"] += text


def _check_payload(fmt: _Format, payload: Any) -> str | None:
    """What is wrong with a request body, or ``None``."""
    if not isinstance(payload, dict):
        return "the request body must be a JSON object"
    if fmt is _GEMINI:
        contents = payload.get("contents")
        if not isinstance(contents, list) or not contents:
            return "contents: expected a non-empty list"
        return None
    if not isinstance(payload.get("model"), str):
        return "model: expected a string"
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages: expected a non-empty list"
    return None


def _prompt_words(fmt: _Format, payload: dict[str, Any]) -> int:
    if fmt is _GEMINI:
        return _count_words(payload.get("contents")) + _count_words(
            payload.get("systemInstruction")
        )
    words = _count_words(payload.get("messages"))
    if fmt is _ANTHROPIC:
        words += _count_words(payload.get("system"))
    return words


def _ends_with_assistant(fmt: _Format, payload: dict[str, Any]) -> bool:
    turns = payload.get("contents" if fmt is _GEMINI else "messages")
    last = turns[-1] if isinstance(turns, list) and turns else None
    role = last.get("role") if isinstance(last, dict) else None
    return role == ("model" if fmt is _GEMINI else "assistant")


def _fault(
    mock: MockProvider, fmt: _Format, sc: MockScenario, attempt: int, payload: dict[str, Any]
) -> str | None:
    """What this attempt does: an error kind, a fault name, or ``None`` for a healthy answer."""
    kind = sc.kind
    if kind == "ok":
        return None
    if kind == "flapping":
        elapsed = trio.current_time() - mock._epoch
        if sc.up is not None and sc.down + sc.up > 0:
            elapsed %= sc.down + sc.up
        return "unavailable" if elapsed < sc.down else None
    if kind == "no-prefill":
        return "prefill" if _ends_with_assistant(fmt, payload) else None
    if sc.times is not None and attempt > sc.times:
        return None
    error = _ERROR_SCENARIOS.get(kind)
    if error == "content_policy" and fmt is _GEMINI:
        return "blocked"
    return error or kind


# --- entry points ------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serve_mock_provider(
    host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[MockProvider]:
    """Run a mock provider for the body of the ``async with``; stop it (and close every
    connection it holds) on exit.

    Args:
        host: the address to listen on.
        port: the port; 0 picks a free one (see ``MockProvider.base_url``).

    Raises:
        OSError: the address cannot be bound.
    """
    mock = MockProvider()
    async with trio.open_nursery() as nursery:
        await nursery.start(mock.serve, host, port)
        try:
            yield mock
        finally:
            nursery.cancel_scope.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the mock provider as a process: print its URL, serve until interrupted."""
    parser = argparse.ArgumentParser(
        prog="relayrace mock-provider",
        description="A fault-injecting mock LLM provider (OpenAI, Anthropic and Gemini wire "
        "formats). The model name picks the scenario, e.g. 'ok,chunks=20,delay=0.01' or "
        "'rate-limit,retry_after=2'. Scenarios: " + ", ".join(SCENARIOS) + ".",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8900, help="port (0: any free port)")
    args = parser.parse_args(argv)

    async def run() -> int:
        mock = MockProvider()
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                try:
                    await nursery.start(mock.serve, args.host, args.port)
                except OSError as exc:
                    print(
                        f"relayrace mock-provider: cannot listen on {args.host}:{args.port}: {exc}",
                        file=sys.stderr,
                    )
                    return 1
                print(mock.base_url, flush=True)
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break
        return 0

    return trio.run(run)


if __name__ == "__main__":
    sys.exit(main())

"""``classify``: a provider's error (HTTP status, error body, headers) as a ``Failure``.

Pure: it never does I/O and never raises. The providers' own error codes come from their wire
formats (``FORMATS``); what is read from headers (``Retry-After``, rate-limit resets) from
``relayrace._failure``.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from .._failure import (
    Category,
    Failure,
    failure_code,
    failure_message,
    lower_headers,
    parse_rate_limit_reset,
    parse_retry_after,
    parse_should_retry,
)
from ._gemini import BLOCKED_FINISH
from ._registry import FORMATS

_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None



# `error.code` / `error.type` / `error.status` values that name a category outright (lower case),
# from every format's table.
_CODE_CATEGORIES: dict[str, Category] = {
    code: category for fmt in FORMATS.values() for code, category in fmt.error_codes.items()
}

# Codes that only say "the request was refused": providers use them for several 4xx statuses,
# so the status decides, and only without one do they mean a bad request.
_GENERIC_CODES = frozenset(
    {
        "invalid_request_error",
        "invalid_request",
        "invalid_argument",
        "failed_precondition",
        "out_of_range",
    }
)

_STATUS_CATEGORIES: dict[int, Category] = {
    400: Category.BAD_REQUEST,
    401: Category.AUTH,
    402: Category.QUOTA_EXHAUSTED,
    403: Category.AUTH,
    404: Category.MODEL_NOT_FOUND,
    408: Category.TIMEOUT,
    413: Category.BAD_REQUEST,
    422: Category.BAD_REQUEST,
    429: Category.RATE_LIMIT,
    500: Category.PROVIDER_5XX,
    502: Category.PROVIDER_5XX,
    503: Category.PROVIDER_5XX,
    504: Category.PROVIDER_5XX,
    529: Category.OVERLOADED,
}

_QUOTA_TEXT = re.compile(
    r"exceeded your current quota|insufficient[_ ]quota|credit balance|spend(?:ing)? limit"
    r"|billing hard limit|billing_not_active|billing is not active|enable billing"
    r"|out of credits|insufficient (?:credits|balance|funds)|payment required"
)
_CONTEXT_TEXT = re.compile(
    r"context[_ ](?:length|window|limit)|prompt is too long|input is too long"
    r"|too many (?:input )?tokens|input token count|maximum number of tokens"
)
_CONTENT_TEXT = re.compile(
    r"content[_ ](?:filter|policy|management policy)|safety (?:system|filter)"
    r"|responsibleaipolicyviolation"
)
_AUTH_TEXT = re.compile(
    r"api key not valid|invalid api key|incorrect api key|api_key_invalid|invalid x-api-key"
)
_OVERLOADED_TEXT = re.compile(r"overload")
# A Gemini free-tier quota of zero never refills, whatever the quota's period.
_ZERO_LIMIT_TEXT = re.compile(r"\blimit: 0\b")
_GEMINI_STATUS = re.compile(r"[A-Z][A-Z_]*")


@attrs.frozen(kw_only=True)
class _ErrorBody:
    """What a provider's error body says, whatever its shape."""

    codes: tuple[str, ...] = ()  # most specific first
    message: str = ""
    is_error: bool = False  # the body is an error object (not just any text)
    blocked: bool = False  # a content filter withheld the prompt or the answer
    quota_ids: tuple[str, ...] = ()  # Gemini QuotaFailure violations
    retry_delay: float | None = None  # Gemini RetryInfo


def classify(
    *,
    status: int | None = None,
    body: Any = None,
    headers: Mapping[str, str] | None = None,
    provider: str | None = None,
    now: float | None = None,
    secrets: Iterable[str] = (),
) -> Failure:
    """Classify a provider error.

    The error body decides first (OpenAI ``error.code`` / ``error.type``, Anthropic
    ``error.type``, Gemini ``error.status``, content-filter markers inside a 200 stream), then
    the HTTP status. Never raises, whatever it is given.

    Args:
        status: the HTTP status (``None`` for an error that arrived inside a 200 stream).
        body: the parsed JSON error body (a dict), or its raw text (JSON, an SSE event or prose).
        headers: the response headers (any case).
        provider: the actor name to stamp on the failure.
        now: the wall-clock time (epoch seconds) used to read an HTTP-date ``Retry-After`` and
            timestamped reset headers; ``time.time()`` if omitted.
        secrets: strings to mask in the message, beyond the key shapes ``redact`` always masks.

    Returns:
        The classified ``Failure``.
    """
    if not isinstance(status, int) or isinstance(status, bool):
        status = None
    lowered = lower_headers(headers)
    if now is None:
        now = time.time()

    error = _read_body(body)
    category = _categorize(status, error)

    retry_after = parse_retry_after(lowered, now)
    if retry_after is None:
        retry_after = error.retry_delay
    if retry_after is None and category in (Category.RATE_LIMIT, Category.OVERLOADED):
        retry_after = parse_rate_limit_reset(lowered, now)

    message = failure_message(
        error.message or (f"HTTP {status}" if status is not None else ""), secrets
    )

    # The code is the provider's text too, and leaves the process the same ways as the message
    # (errors, events, HTTP error bodies): a provider that echoes the key in `error.code` must
    # not get it out. Codes are short identifiers; a masked one stays a clear placeholder.
    code = failure_code(error.codes[0], secrets) if error.codes else None

    return Failure(
        category=category,
        code=code,
        status=status,
        message=message,
        retry_after=retry_after,
        provider=provider,
        should_retry=parse_should_retry(lowered.get("x-should-retry")),
    )


def _categorize(status: int | None, error: _ErrorBody) -> Category:
    if error.blocked:
        return Category.CONTENT_POLICY
    in_stream = status is None or 200 <= status < 300
    category = next(
        (_CODE_CATEGORIES[c] for c in map(str.lower, error.codes) if c in _CODE_CATEGORIES), None
    )
    if category is None and status is not None:
        category = _STATUS_CATEGORIES.get(status)
    if category is None and any(code.lower() in _GENERIC_CODES for code in error.codes):
        category = Category.BAD_REQUEST
    if category is None:
        # Text or an error object arriving inside a 200 is an error event in the stream.
        stream_error = in_stream and (error.is_error or bool(error.message))
        category = Category.STREAM_ERROR if stream_error else Category.UNKNOWN
    return _refine(category, error)


def _refine(category: Category, error: _ErrorBody) -> Category:
    """Tell apart what a code or status alone cannot, from the message and the details."""
    text = error.message.lower()
    if category is Category.RATE_LIMIT:
        if "resource_exhausted" in map(str.lower, error.codes):
            # Gemini says "exceeded your current quota" for per-minute limits too; only a daily
            # quota (or a zero one) is spent for long.
            spent = any("perday" in quota.lower() for quota in error.quota_ids)
            if spent or _ZERO_LIMIT_TEXT.search(text):
                return Category.QUOTA_EXHAUSTED
        elif _QUOTA_TEXT.search(text):
            return Category.QUOTA_EXHAUSTED
    elif category is Category.BAD_REQUEST:
        if _CONTEXT_TEXT.search(text):
            return Category.CONTEXT_LENGTH
        if _CONTENT_TEXT.search(text):
            return Category.CONTENT_POLICY
        if _QUOTA_TEXT.search(text):
            return Category.QUOTA_EXHAUSTED
        if _AUTH_TEXT.search(text):
            return Category.AUTH
    elif category in (Category.PROVIDER_5XX, Category.STREAM_ERROR, Category.UNKNOWN):
        if _OVERLOADED_TEXT.search(text):
            return Category.OVERLOADED
    return category


# --- reading error bodies ---------------------------------------------------------------------


def _read_body(body: Any, depth: int = 0) -> _ErrorBody:
    if isinstance(body, bytes | bytearray):
        body = bytes(body).decode("utf-8", errors="replace")
    if isinstance(body, str):
        parsed = _parse_text(body)
        if parsed is None:
            return _ErrorBody(message=body.strip())
        body = parsed
    if isinstance(body, list):
        # Gemini sometimes wraps its error (and each stream chunk) in an array.
        body = next((item for item in body if isinstance(item, dict)), None)
    if not isinstance(body, dict):
        return _ErrorBody()

    error = body.get("error")
    if error is None and body.get("type") == "error":
        error = body  # OpenAI Responses stream: {"type": "error", "code": ..., "message": ...}
    if error is None and body.get("type") == "response.failed":
        response = body.get("response")
        error = response.get("error") if isinstance(response, dict) else None
    if isinstance(error, str):
        return _ErrorBody(message=error, is_error=True)
    if isinstance(error, dict):
        return _read_error(error, depth)
    chunk = _read_stream_chunk(body)
    if chunk.blocked:
        return chunk
    # Gateways and proxies in front of a provider often answer {"message": ...} / {"detail": ...}.
    message = next((m for m in (body.get("message"), body.get("detail")) if isinstance(m, str)), "")
    return _ErrorBody(message=message)


def _read_error(error: dict[Any, Any], depth: int) -> _ErrorBody:
    message = error.get("message")
    message = message if isinstance(message, str) else ""
    if depth < 2 and message.lstrip().startswith(("{", "[")):
        # Some SDKs and proxies wrap the provider's JSON error in another error's message.
        inner = _read_body(message, depth + 1)
        if inner.is_error:
            return inner

    codes: list[str] = []
    quota_ids: list[str] = []
    retry_delay: float | None = None
    details = error.get("details")
    if isinstance(details, dict):  # Anthropic: {"error_code": "enforced_spend_limit_reached"}
        _add_code(codes, details.get("error_code"))
    elif isinstance(details, list):  # Gemini: google.rpc status details
        for detail in details:
            if not isinstance(detail, dict):
                continue
            if retry_delay is None and "retryDelay" in detail:
                retry_delay = _parse_proto_duration(detail["retryDelay"])
            _add_code(codes, detail.get("reason"))  # ErrorInfo, e.g. API_KEY_INVALID
            violations = detail.get("violations")
            if isinstance(violations, list):
                quota_ids += (
                    v["quotaId"]
                    for v in violations
                    if isinstance(v, dict) and isinstance(v.get("quotaId"), str)
                )
    inner_error = error.get("innererror")
    if isinstance(inner_error, dict):  # Azure OpenAI content filter
        _add_code(codes, inner_error.get("code"))
    _add_code(codes, error.get("code"))
    _add_code(codes, error.get("type"))
    status = error.get("status")
    if isinstance(status, str) and _GEMINI_STATUS.fullmatch(status):
        _add_code(codes, status)
    return _ErrorBody(
        codes=tuple(codes),
        message=message,
        is_error=True,
        quota_ids=tuple(quota_ids),
        retry_delay=retry_delay,
    )


def _read_stream_chunk(chunk: dict[Any, Any]) -> _ErrorBody:
    """Find a content-filter stop in a successful-looking chunk."""
    feedback = chunk.get("promptFeedback")
    if isinstance(feedback, dict):
        reason = feedback.get("blockReason")
        if isinstance(reason, str) and reason:
            detail = feedback.get("blockReasonMessage")
            message = detail if isinstance(detail, str) and detail else f"prompt blocked: {reason}"
            return _ErrorBody(codes=(reason,), message=message, blocked=True)
    for candidate in _dicts(chunk.get("candidates")):
        reason = candidate.get("finishReason")
        if isinstance(reason, str) and reason in BLOCKED_FINISH:
            return _ErrorBody(codes=(reason,), message=f"answer blocked: {reason}", blocked=True)
    for choice in _dicts(chunk.get("choices")):
        if choice.get("finish_reason") == "content_filter":
            message = "answer stopped by the content filter"
            return _ErrorBody(codes=("content_filter",), message=message, blocked=True)
    delta = chunk.get("delta")
    stop_reason = delta.get("stop_reason") if isinstance(delta, dict) else chunk.get("stop_reason")
    if stop_reason == "refusal":  # Anthropic's classifiers stopped the answer
        return _ErrorBody(codes=("refusal",), message="answer refused", blocked=True)
    return _ErrorBody()


def _parse_text(text: str) -> Any:
    """Parse a JSON body or the JSON data of an SSE event; ``None`` if it is neither."""
    stripped = text.strip()
    if stripped.startswith(("{", "[")):
        return _load_json(stripped)
    datas = [line[5:].strip() for line in stripped.splitlines() if line.startswith("data:")]
    for data in datas:
        parsed = _load_json(data)
        if isinstance(parsed, dict | list):
            return parsed
    return None


def _load_json(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        return None


def _add_code(codes: list[str], value: Any) -> None:
    # Gemini's numeric `code` repeats the HTTP status; it is not a code worth keeping.
    if isinstance(value, str) and value.strip() and not value.strip().isdigit():
        if value not in codes:
            codes.append(value)


def _dicts(value: Any) -> list[dict[Any, Any]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []




def _parse_proto_duration(value: Any) -> float | None:
    """Read a protobuf ``Duration``: ``"30s"`` in JSON, or ``{"seconds", "nanos"}``."""
    if isinstance(value, str):
        number, unit = value.strip()[:-1], value.strip()[-1:]
        return _finite(float(number)) if unit == "s" and _NUMBER.fullmatch(number) else None
    if isinstance(value, dict):
        seconds, nanos = value.get("seconds", 0), value.get("nanos", 0)
        if isinstance(seconds, int | str) and isinstance(nanos, int):
            try:
                total = float(int(seconds)) + nanos / 1e9
            except (ValueError, OverflowError):
                return None
            return _finite(total) if total >= 0 else None
    return None

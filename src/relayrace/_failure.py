"""Failure categories, the ``Failure`` value, and reading the wait a provider asks for from its
response headers.

Routing decides on ``Failure.category`` only. ``classify`` (``relayrace.providers``), which
reads the providers' error bodies, builds failures from these pieces.
"""

from __future__ import annotations

import datetime
import email.utils
import enum
import math
import re
import time
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from ._redact import redact


class Category(enum.Enum):
    """Why an attempt failed. Routing decides on this alone."""

    RATE_LIMIT = "rate_limit"
    QUOTA_EXHAUSTED = "quota_exhausted"
    OVERLOADED = "overloaded"
    PROVIDER_5XX = "provider_5xx"
    TIMEOUT = "timeout"
    NETWORK = "network"
    STREAM_ERROR = "stream_error"
    AUTH = "auth"
    MODEL_NOT_FOUND = "model_not_found"
    CONTEXT_LENGTH = "context_length"
    CONTENT_POLICY = "content_policy"
    BAD_REQUEST = "bad_request"
    LOCAL_CAPACITY = "local_capacity"
    CANCELLED = "cancelled"
    UNKNOWN = "unknown"


@attrs.frozen(kw_only=True)
class RateLimits:
    """A provider's own account of its limits, from the headers of one response (read by
    ``relayrace._ratelimit.read_rate_limits``).

    Attributes:
        remaining_requests / remaining_tokens: what the provider says is left (``None``: not
            said).
        reset_requests / reset_tokens: seconds until that limit is whole again (``None``: not
            said).
    """

    remaining_requests: int | None = None
    remaining_tokens: int | None = None
    reset_requests: float | None = None
    reset_tokens: float | None = None


@attrs.frozen(kw_only=True)
class Failure:
    """One classified failure.

    Attributes:
        category: the routing category.
        code: the provider's error code or type (``insufficient_quota``), or our own code.
        status: the HTTP status, if there was one.
        message: a human-readable message, with secrets redacted.
        retry_after: seconds the provider asked us to wait, if it said.
        provider: the name of the actor the failure came from (``None`` for our own side).
        should_retry: the provider's ``x-should-retry`` header, if it sent one.
        limits: what the rate-limit headers of the provider's error answer said (``None``: none,
            unreadable ones, or a failure of our own making); the admission learns them as a
            success's. Only the provider's response headers are read into it.
    """

    category: Category
    code: str | None = None
    status: int | None = None
    message: str = ""
    retry_after: float | None = None
    provider: str | None = None
    should_retry: bool | None = None
    limits: RateLimits | None = None

    def with_provider(self, provider: str) -> Failure:
        return attrs.evolve(self, provider=provider)

    def to_dict(self) -> dict[str, Any]:
        return {
            "category": self.category.value,
            "code": self.code,
            "status": self.status,
            "message": self.message,
            "retry_after": self.retry_after,
            "provider": self.provider,
        }


# --- the text of a failure ---------------------------------------------------------------------

_MESSAGE_LIMIT = 500
_CODE_LIMIT = 200


def failure_message(message: str, secrets: Iterable[str] = ()) -> str:
    """A provider's message as a ``Failure`` carries it: secrets masked (``redact`` masks the key
    shapes it knows, and ``secrets``), at most 500 characters.

    A failure's text leaves the process (errors, events, HTTP error bodies).
    """
    message = redact(message, secrets)
    if len(message) > _MESSAGE_LIMIT:
        message = message[: _MESSAGE_LIMIT - 3] + "..."
    return message


def failure_code(code: str, secrets: Iterable[str] = ()) -> str:
    """A provider's error code as a ``Failure`` carries it: masked like the message (a provider
    that echoes the key in ``error.code`` must not get it out), at most 200 characters."""
    return redact(code, secrets)[:_CODE_LIMIT]


# --- reading headers --------------------------------------------------------------------------

_SECONDS = re.compile(r"\d+(?:\.\d+)?")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s|us|µs|ns)")
_DURATION = re.compile(rf"(?:{_DURATION_PART.pattern})+")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}

# (reset header, remaining header) pairs; a reset is read as a wait only for a rate limit.
_OPENAI_RESETS = tuple(
    (f"x-ratelimit-reset-{kind}", f"x-ratelimit-remaining-{kind}")
    for kind in ("requests", "tokens")
)
_ANTHROPIC_RESETS = tuple(
    (f"anthropic-ratelimit-{kind}-reset", f"anthropic-ratelimit-{kind}-remaining")
    for kind in ("requests", "tokens", "input-tokens", "output-tokens")
)


def parse_retry_after(headers: Mapping[str, str] | None, now: float | None = None) -> float | None:
    """Read the wait a provider asked for, from ``retry-after-ms`` then ``Retry-After``.

    ``Retry-After`` may be seconds (fractions allowed) or an HTTP-date. Unreadable values are
    ignored.

    Args:
        headers: the response headers (any case).
        now: the wall-clock time (epoch seconds) an HTTP-date is measured from;
            ``time.time()`` if omitted.

    Returns:
        The wait in seconds (never negative), or ``None`` if no header gave one.
    """
    lowered = lower_headers(headers)
    millis = _parse_seconds(lowered.get("retry-after-ms"))
    if millis is not None:
        return millis / 1000
    value = lowered.get("retry-after")
    if value is None:
        return None
    seconds = _parse_seconds(value)
    if seconds is not None:
        return seconds
    return _seconds_until(_parse_http_date(value), now)


def parse_rate_limit_reset(
    headers: Mapping[str, str] | None, now: float | None = None
) -> float | None:
    """Read when a provider's rate limit resets, from its ``*-reset`` headers.

    Understands OpenAI's ``x-ratelimit-reset-requests`` / ``-tokens`` (durations such as ``6m0s``)
    and Anthropic's ``anthropic-ratelimit-*-reset`` (RFC 3339 timestamps). When a limit reports
    nothing remaining, only the spent limits count; otherwise the latest reset is taken, since
    waiting for an earlier one may just hit the other limit.

    Args:
        headers: the response headers (any case).
        now: the wall-clock time (epoch seconds) timestamps are measured from;
            ``time.time()`` if omitted.

    Returns:
        The wait in seconds (never negative), or ``None`` if no header gave one.
    """
    lowered = lower_headers(headers)
    waits: list[tuple[float, bool]] = []
    for reset, remaining in _OPENAI_RESETS:
        wait = _parse_duration(lowered.get(reset))
        if wait is not None:
            waits.append((wait, lowered.get(remaining, "").strip() == "0"))
    for reset, remaining in _ANTHROPIC_RESETS:
        wait = _seconds_until(_parse_timestamp(lowered.get(reset)), now)
        if wait is not None:
            waits.append((wait, lowered.get(remaining, "").strip() == "0"))
    spent = [wait for wait, exhausted in waits if exhausted]
    return max(spent or [wait for wait, _ in waits], default=None)


def lower_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    """The string headers, their names in lower case (``{}`` for ``None``)."""
    if headers is None:
        return {}
    return {
        key.lower(): value
        for key, value in headers.items()
        if isinstance(key, str) and isinstance(value, str)
    }


def parse_should_retry(value: str | None) -> bool | None:
    """Read an ``x-should-retry`` header (``true`` / ``false``); ``None`` if absent or unreadable."""
    if value is None:
        return None
    return {"true": True, "false": False}.get(value.strip().lower())


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _parse_seconds(value: str | None) -> float | None:
    if value is None or not _SECONDS.fullmatch(value.strip()):
        return None
    return _finite(float(value))


def _parse_duration(value: str | None) -> float | None:
    """Read a Go-style duration (``1h2m3.5s``, ``20ms``)."""
    if value is None or not _DURATION.fullmatch(value := value.strip()):
        return None
    total = sum(float(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION_PART.findall(value))
    return _finite(total)


def _parse_http_date(value: str) -> float | None:
    try:
        moment = email.utils.parsedate_to_datetime(value)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.UTC)
        return moment.timestamp()
    except (TypeError, ValueError, OverflowError, IndexError):
        return None


def _parse_timestamp(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        moment = datetime.datetime.fromisoformat(value.strip())
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.UTC)
        return moment.timestamp()
    except (ValueError, OverflowError):
        return None


def _seconds_until(moment: float | None, now: float | None) -> float | None:
    if moment is None:
        return None
    wait = moment - (time.time() if now is None else now)
    return max(0.0, wait) if math.isfinite(wait) else None

"""Failure categories, the ``Failure`` value, and classification of provider errors.

``classify`` is pure: it looks at an HTTP status, a parsed error body and the response headers
and returns a ``Failure``. Routing decides on ``Failure.category`` only.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

import attrs


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
    """

    category: Category
    code: str | None = None
    status: int | None = None
    message: str = ""
    retry_after: float | None = None
    provider: str | None = None
    should_retry: bool | None = None

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


def classify(
    *,
    status: int | None = None,
    body: Any = None,
    headers: Mapping[str, str] | None = None,
    provider: str | None = None,
    now: float | None = None,
) -> Failure:
    """Classify a provider error.

    Args:
        status: the HTTP status (``None`` for an error that arrived inside a 200 stream).
        body: the parsed JSON error body (a dict), or its raw text.
        headers: the response headers (any case).
        provider: the actor name to stamp on the failure.
        now: the wall-clock time (epoch seconds) used to read an HTTP-date ``Retry-After``.

    Returns:
        The classified ``Failure``.
    """
    raise NotImplementedError  # implemented in the classification change

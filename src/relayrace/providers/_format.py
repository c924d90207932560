"""What every wire format offers the rest of relayrace (``WireFormat``), and the named kinds of
provider error every format's encoder can write (the mock provider answers with them)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import attrs

from .._failure import Category

#: error kind → the category its body (with its status) classifies to, in every format.
ERROR_KINDS: dict[str, Category] = {
    "rate_limit": Category.RATE_LIMIT,
    "quota": Category.QUOTA_EXHAUSTED,
    "server": Category.PROVIDER_5XX,
    "unavailable": Category.PROVIDER_5XX,
    "overloaded": Category.OVERLOADED,
    "unauthorized": Category.AUTH,
    "forbidden": Category.AUTH,
    "not_found": Category.MODEL_NOT_FOUND,
    "context_length": Category.CONTEXT_LENGTH,
    "content_policy": Category.CONTENT_POLICY,
    "prefill": Category.BAD_REQUEST,
    "bad_request": Category.BAD_REQUEST,
}

#: the message of a prefill refusal (OpenAI and Anthropic word it alike).
PREFILL_REFUSED = (
    "This model does not support assistant message prefill. "
    "The conversation must end with a user message."
)


class ErrorBody(Protocol):
    """Writes the error body of an error kind (see each format's ``error_body``)."""

    def __call__(
        self, kind: str, model: str, *, status: int | None = ..., retry_after: float | None = ...
    ) -> dict[str, Any]: ...


@attrs.frozen(kw_only=True)
class WireFormat:
    """One provider's wire format, as the registry lists it.

    Attributes:
        name: the format's name (``openai``), as the mock provider's log and the config say it.
        error_codes: the provider's error codes / types (lower case) and the category each
            names outright; ``classify`` reads every format's.
        error_status: the HTTP status of an error kind (``ERROR_KINDS``).
        error_body: the error body of an error kind.
    """

    name: str
    error_codes: Mapping[str, Category]
    error_status: Callable[[str], int]
    error_body: ErrorBody
